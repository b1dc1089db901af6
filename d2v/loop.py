"""The one training loop (pretraining and fine-tuning): accumulate, clip, step, hook, log, checkpoint.

The step does no host sync: metrics stay tensors and are summed on the device; they are read once per
``log_every`` steps (one ``.tolist()``), which is also when the non-finite guard looks at them. Every
optimizer step reseeds torch from ``(seed, step, rank)``, so dropout / LayerDrop draws do not depend on
where a run was interrupted and resumed (the data position is restored by ``EpochStream``); Python's and
NumPy's global RNGs too, so the RNG states a checkpoint saves are the same in every process (a new process
starts them from OS entropy, which would make ``train_state.pt`` differ between two runs of the same params).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from d2v import distributed
from d2v.config import ConfigError
from d2v.precision import Precision, autocast_dtype


class TrainingHalted(ValueError):
    """The run stopped itself (non-finite loss, collapse); the message says what to try.

    A ValueError so the CLI prints the message instead of a traceback.
    """


@dataclass(frozen=True)
class LoopConfig:
    """What the pretrain and finetune sections share: the loop, the loader, the hardware."""

    steps: int = 1000
    """Optimizer updates."""
    batch_size: int = 8
    """Samples per optimizer update over all ranks and accumulation micro-steps (split evenly)."""
    grad_accum: int = 1
    """Micro-batches accumulated per update (fairseq ``update_freq``)."""
    precision: Precision = "bf16"
    """'bf16': autocast on CUDA and on CPUs with bf16 hardware (AMX / AVX512-BF16), fp32 elsewhere; the EMA
    teacher's weights, the targets and the loss stay fp32 (``autocast_dtype``). 'fp32': no autocast."""
    compile: bool = False
    """``torch.compile`` the model's whole forward (student, teacher targets, decoder or head, loss) before
    training (``d2v.runner.compile_model``). Batches smaller than the configured one (a loader worker's last
    of an epoch) run eagerly rather than recompile (``train_step``)."""
    parallel: distributed.Parallel = "ddp"
    """Multi-GPU strategy under torchrun: 'ddp', or 'fsdp' (FSDP2 ``fully_shard``, for the large preset)."""
    dist_timeout_s: float = distributed.TIMEOUT_S
    """Under torchrun: how long a collective waits for the other ranks before the run fails (the process
    group's ``timeout``). Long enough for the legitimate waits (rank 0 writing a checkpoint to shared storage
    while the others wait at a barrier, a first ``compile``, a slow shard from object storage); short enough
    that a run with a hung or lost node fails, and torchrun restarts it, within half an hour rather than idling
    for hours. Leaves the trained weights unchanged."""
    log_every: int = 10
    """Read the metrics (one host sync), log them and run the guards every this many updates."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many updates (and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest k checkpoints."""
    num_workers: int = 0
    """DataLoader worker processes."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer of the shard reader."""
    max_len: int | None = None
    """Crop length of an example in the modality's raw unit (audio samples, text tokens); None: loader's."""

    min_steps: ClassVar[int] = 1
    """The fewest ``steps`` a section accepts (pretraining from a published model takes 0: use it as is)."""

    def __post_init__(self) -> None:
        # messages name keys relative to this section; from_dict puts the section's path in front
        if self.steps < self.min_steps:
            raise ConfigError(f"steps must be >= {self.min_steps}, got {self.steps}")
        for name in (
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size must be a multiple of grad_accum ({self.grad_accum}), got {self.batch_size}"
            )


class EpochStream:
    """Endless batches from ``make_loader(epoch)``, epoch after epoch; ``position`` restores it.

    Resuming recreates the loader of the saved epoch (same seed -> same order) and skips the batches the
    interrupted run had consumed.
    """

    def __init__(self, make_loader: Callable[[int], Any], epoch: int = 0, index: int = 0) -> None:
        self.make_loader, self.epoch, self.index = make_loader, epoch, 0
        self._it = iter(make_loader(epoch))
        for _ in range(index):
            next(self)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            try:
                batch = next(self._it)
                self.index += 1
                return batch
            except StopIteration:
                self.epoch, self.index = self.epoch + 1, 0
                self._it = iter(self.make_loader(self.epoch))
        raise ValueError(
            f"the loader of epoch {self.epoch} yields no batches: too few samples for one batch?"
        )


class Stopwatch:
    """Wall seconds a run has trained, carried across resumes in the train state (``<stage>/seconds``)."""

    def __init__(self) -> None:
        self.restart(0.0)

    def restart(self, before: float) -> None:
        """Count on from ``before`` seconds (what the checkpoint a run resumes from had measured)."""
        self.before, self.started = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


def reseed(seed: int) -> None:
    """torch (CPU and CUDA), Python's and NumPy's global RNGs from one seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved (non-blocking); other entries (e.g. transcripts) kept as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["inputs"])


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, Any]],
    sums: dict[str, Tensor],
    *,
    params: list[Tensor],
    grad_accum: int,
    clip_norm: float | None | Callable[[], float | None],
    device: torch.device,
    amp: torch.dtype | None,
    grad_norm: bool,
    compiled_batch: int | None = None,
    grad_metrics: Callable[[], dict[str, Tensor]] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> int:
    """One optimizer update: ``grad_accum`` forward/backward micro-steps, clipping, AdamW, LR schedule.

    Adds the metrics (detached tensors, no host sync) into ``sums``, and the gradient norm as
    ``sums["grad_norm"]`` when clipping or when ``grad_norm`` asks for it; returns the samples seen.
    ``compiled_batch``: the micro-batch size of a compiled model. A smaller batch (each loader worker's last
    of an epoch) runs eagerly: a new batch size would recompile the whole graph (27-61 s on CPU for the tiny
    and small image presets, about a minute on a GPU) and leave every later step on the recompiled graph,
    dynamic in the batch size. ``clip_norm`` may be a function, asked once the update's batches went
    through (joint pretraining clips with the norm of the update's modality); ``grad_metrics()``, when
    given, reads the accumulated gradients before clipping and its tensors, one value per update, are added
    into ``sums`` (scaled by ``grad_accum``, as the loop's means divide by the micro-steps).
    ``after_backward()``, when given, runs after every micro-step's backward; the gradients it reads are
    then synchronised across ranks at every micro-step, not only at the last one.
    """
    n = 0
    for micro in range(grad_accum):
        batch = to_device(next(batches), device)
        short = compiled_batch is not None and batch_size(batch) < compiled_batch
        with (
            distributed.grad_sync(model, micro == grad_accum - 1 or after_backward is not None),
            torch.autocast(device.type, amp or torch.bfloat16, enabled=amp is not None),
            torch.compiler.set_stance("force_eager") if short else contextlib.nullcontext(),
        ):
            loss, metrics = model(batch)
            (loss / grad_accum).backward()
        if after_backward is not None:
            after_backward()
        for k, v in metrics.items():
            sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        n += batch_size(batch)
    if grad_metrics is not None:
        for k, v in grad_metrics().items():
            v = v * grad_accum
            sums[k] = sums[k] + v if k in sums else v
    if callable(clip_norm):
        clip_norm = clip_norm()
    if clip_norm is not None:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    elif grad_norm:
        sums["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return n


def run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, Any]],
    cfg: LoopConfig,
    *,
    clip_norm: float | None | Callable[[], float | None],
    device: torch.device,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    after_step: Callable[[int], dict[str, float]] | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_save: Callable[[int], None] | None = None,
    grad_metrics: Callable[[], dict[str, Tensor]] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train from ``start_step`` to ``cfg.steps``; returns the last logged metrics.

    ``model(batch) -> (loss, metrics)``; ``after_step(step)`` runs after each optimizer step (the EMA) and
    returns scalars to log (tau); ``on_log(step, metrics)`` may raise ``TrainingHalted``; ``on_save(step)``
    runs every ``checkpoint_every`` steps and at the end, always right after a log (so a checkpoint is only
    written once its metrics passed the guards). ``clip_norm``, ``grad_metrics`` and ``after_backward``: see
    ``train_step``.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    amp = autocast_dtype(cfg.precision, device)
    compiled_batch = cfg.batch_size // (cfg.grad_accum * world_size) if cfg.compile else None
    sums: dict[str, Tensor] = {}
    extra: dict[str, float] = {}
    last: dict[str, float] = {}
    n_steps, n_samples, t0 = 0, 0, time.perf_counter()
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=rank != 0,
        dynamic_ncols=True,
        desc="train",
        mininterval=1.0,
    )
    for step in range(start_step, cfg.steps):
        reseed(step_seed(seed, step, rank))
        done = step + 1
        logging = done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == cfg.steps
        lr = max(g["lr"] for g in opt.param_groups)  # the LR of this step (a Python float: no sync)
        n_samples += train_step(
            model, opt, sched, batches, sums, params=params, grad_accum=cfg.grad_accum, clip_norm=clip_norm,
            device=device, amp=amp, grad_norm=logging, compiled_batch=compiled_batch, grad_metrics=grad_metrics,
            after_backward=after_backward,
        ) * world_size  # fmt: skip
        if after_step is not None:
            extra = after_step(done)
        n_steps += 1
        bar.update(1)
        if not logging:
            continue
        grad_norm = sums.pop("grad_norm")
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        names = sorted(sums)
        # one host sync per log: the metric means since the last log, then this step's gradient norm
        means = torch.stack([sums[k] for k in names]) / (n_steps * cfg.grad_accum)
        values = distributed.all_reduce_mean(torch.cat([means, grad_norm.float().reshape(1)])).tolist()
        elapsed = time.perf_counter() - t0
        last = {**dict(zip([*names, "grad_norm"], values)), **extra}
        last["lr"] = lr
        if not math.isfinite(last["loss"]) or not math.isfinite(last["grad_norm"]):
            raise TrainingHalted(
                f"non-finite loss/gradient (loss {last['loss']}, grad norm {last['grad_norm']}) "
                f"by step {done}; "
                f"try a lower learning rate, a longer warm-up, gradient clipping (optim.clip_norm) or "
                f"precision: fp32"
            )
        sps = n_samples / max(elapsed, 1e-9)
        if on_log is not None:
            on_log(done, {**last, "samples_per_s": sps})
        shown = {k: f"{v:.5g}" for k, v in extra.items()}
        bar.set_postfix(loss=f"{last['loss']:.4g}", lr=f"{last['lr']:.2e}", **shown, samples_s=f"{sps:.1f}")
        sums, n_steps, n_samples, t0 = {}, 0, 0, time.perf_counter()
        if on_save is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            on_save(done)
    bar.close()
    return last
