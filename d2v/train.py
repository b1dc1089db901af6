"""The ``pretrain`` stage: data2vec pretraining of one modality, resumable, with collapse guards.

``d2v pretrain <m>`` reads ``model.<m>`` and ``pretrain.<m>``, trains on ``<paths.shards>/<m>/pretrain``,
checkpoints to ``<paths.checkpoints>/pretrain/<m>/step-*`` and writes ``<paths.metrics>/pretrain/<m>.json``
(flat ``pretrain/*`` scalars) and the loss curve ``<paths.plots>/pretrain/<m>.csv``. A rerun of a killed
run continues from its last checkpoint. ``torchrun --nproc-per-node N -m d2v pretrain <m>`` runs DDP.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2v import checkpoint, distributed, loop, tracking
from d2v.config import PathsConfig, section, to_dict
from d2v.model import Data2Vec, ema_decay
from d2v.optim import OptimConfig, build_optimizer, build_scheduler
from d2v.transformer import Block

CURVE_FIELDS = ("step", "loss", "target_var", "pred_var", "lr", "tau")
RESUME_NEUTRAL = ("log_every", "checkpoint_every", "keep_checkpoints")
"""Stage-config fields that do not change the trained weights: a change keeps the run resumable."""


@dataclass(frozen=True)
class PretrainConfig(loop.LoopConfig):
    """The ``pretrain.<modality>`` section (per-modality defaults are set in params.yaml)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW + LR schedule + clipping (reference §2.2-2.5)."""
    guard_after: int = 5000
    """Collapse guards start after this many updates ([FS] 5,000)."""
    min_target_var: float = 0.1
    """Stop if the teacher targets' std falls below this ([FS] ``min_target_var``, reference §1.9)."""
    min_pred_var: float = 0.01
    """Stop if the student predictions' std falls below this ([FS] ``min_pred_var``)."""
    length_buckets: int = 0
    """k > 1: batch together examples of similar length (pools of k batches sorted by length). Speech needs
    it: every row is trimmed to the batch's smallest masked count (fairseq ``require_same_masks``), so one
    short clip in a batch of long ones masks ~10% instead of ~49% of frames (measured; fairseq buckets too)."""
    resampled: bool = False
    """Draw shards with replacement, ``epoch_len`` batches per epoch: for many ranks and few shards."""
    epoch_len: int | None = None
    """Batches per epoch and rank (needed with ``resampled``); None: one pass over the shards."""


# ------------------------------------------------------------------------------------------- pieces


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each Transformer block in place (state-dict names unchanged)."""
    for m in model.modules():
        if isinstance(m, Block):
            m.compile()


def collapse_check(step: int, metrics: dict[str, float], cfg: PretrainConfig) -> str | None:
    """What collapsed, with what to try, or None (only after ``guard_after`` updates)."""
    if step < cfg.guard_after:
        return None
    for key, low in (("target_var", cfg.min_target_var), ("pred_var", cfg.min_pred_var)):
        if metrics[key] < low:
            return (
                f"representation collapse at step {step}: {key} = {metrics[key]:.4g} < {low} "
                f"(reference §1.9). Try a lower learning rate (optim.lr), a longer warm-up (optim.warmup), "
                f"or a higher teacher decay (model.<m>.ema.tau0 / tau_end)"
            )
    return None


def train_state(
    model: nn.Module, opt, sched, stream: loop.EpochStream, step: int, history: list, seconds: float
) -> dict:
    """What a resume needs besides the weights; the data position of every rank (a collective)."""
    return {
        "step": step,
        "seconds": seconds,
        "optimizer": distributed.optimizer_state(model, opt),
        "scheduler": sched.state_dict(),
        "rng": checkpoint.rng_state(),
        "data": distributed.gather_objects(stream.position()),
        "history": history,
    }


def saver(
    wrapped: nn.Module, opt, sched, stream: loop.EpochStream, history: list, run_dir: Path, meta: dict,
    cfg: loop.LoopConfig, info: distributed.DistInfo, files: dict | None, clock: loop.Stopwatch,
) -> Callable[[int], None]:  # fmt: skip
    """The loop's ``on_save``: weights + train state, written by rank 0 only, atomically."""

    def on_save(done: int) -> None:
        sd = distributed.model_state(wrapped)  # a collective under FSDP: every rank calls it
        st = train_state(wrapped, opt, sched, stream, done, history, clock.seconds())
        if info.is_main:
            checkpoint.save(run_dir, done, sd, meta, st, keep=cfg.keep_checkpoints, files=files)
        distributed.barrier()

    return on_save


def data_position(state: dict[str, Any], info: distributed.DistInfo) -> dict[str, int]:
    """This rank's saved data position (rank 0's if the world size changed; epoch 0 for a new run)."""
    saved = state.get("data") or [{}]
    return saved[info.rank] if len(saved) == info.world_size else saved[0]


def resume(model: nn.Module, opt, sched, run_dir: Path) -> dict[str, Any] | None:
    """Load the latest checkpoint of ``run_dir`` into model/optimizer/scheduler; its train state or None."""
    last = checkpoint.latest(run_dir)
    if last is None:
        return None
    distributed.load_model_state(model, checkpoint.load_weights(last))
    state = checkpoint.load_train_state(last)
    distributed.load_optimizer_state(model, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    return state


def write_outputs(
    history: list[dict[str, float]], metrics_file: Path, curve_file: Path, prefix: str, fields=CURVE_FIELDS,
    *, seconds: float, batch_size: int,
) -> dict:  # fmt: skip
    """Flat ``<prefix>/*`` metrics JSON and the loss-curve CSV for DVC plots.

    The metrics are the last logged values, the steps, and the run's wall seconds of training (summed over
    resumes; setup and data preparation excluded) with the samples/s they imply (``batch_size`` per step).
    """
    last = history[-1] if history else {}
    metrics = {f"{prefix}/{k}": v for k, v in last.items() if k != "step"}
    steps = metrics[f"{prefix}/steps"] = int(last.get("step", 0))
    metrics[f"{prefix}/seconds"] = seconds
    metrics[f"{prefix}/samples_per_s"] = steps * batch_size / seconds if seconds > 0 else 0.0
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    curve_file.parent.mkdir(parents=True, exist_ok=True)
    with curve_file.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in fields if not history or k in history[0]])
        w.writeheader()
        for row in history:
            w.writerow({k: row[k] for k in w.fieldnames})
    return metrics


# -------------------------------------------------------------------------------------------- stage


def pretrain(
    model: Data2Vec,
    cfg: PretrainConfig,
    make_loader: Callable[[int], Iterable[dict[str, Any]]],
    run_dir: str | Path,
    meta: dict[str, Any],
    *,
    seed: int = 0,
    info: distributed.DistInfo | None = None,
    tracker: tracking.NullTracker | None = None,
    files: dict[str, Path] | None = None,
    after_step: Callable[[int], None] | None = None,
    clock: loop.Stopwatch | None = None,
) -> list[dict[str, float]]:
    """Pretrain ``model`` to ``cfg.steps`` updates, resuming from ``run_dir``; returns the logged history.

    ``make_loader(epoch)`` yields this rank's batches of one epoch (deterministic per epoch). ``meta`` goes
    into every checkpoint's meta.json and ``files`` are copied next to the weights. ``after_step`` is a test
    hook run after each update. ``clock`` ends up holding the run's training seconds (resumes included).
    """
    info = info or distributed.DistInfo()
    tracker = tracker or tracking.NullTracker()
    run_dir = Path(run_dir)
    if info.is_main:
        checkpoint.clean_stale(run_dir)
    model.to(info.device)
    if cfg.compile:
        compile_blocks(model)
    wrapped = distributed.wrap(model, info, cfg.parallel)
    opt = build_optimizer(distributed.unwrap(wrapped), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.steps)
    state = resume(wrapped, opt, sched, run_dir) or {}
    step, history = state.get("step", 0), state.get("history", [])
    stream = loop.EpochStream(make_loader, **data_position(state, info))
    clock = clock or loop.Stopwatch()
    clock.restart(state.get("seconds", 0.0))
    d2v_model = distributed.unwrap(wrapped)

    def ema(done: int) -> dict[str, float]:
        tau = ema_decay(done, d2v_model.ema)
        d2v_model.ema_step(tau)  # after every optimizer step, in fp32 (§1.2)
        if after_step is not None:
            after_step(done)
        return {"tau": tau}

    def on_log(done: int, m: dict[str, float]) -> None:
        row = {"step": done, **{k: m[k] for k in CURVE_FIELDS[1:]}}
        history.append(row)
        tracker.log({f"pretrain/{k}": v for k, v in m.items()}, step=done)
        problem = collapse_check(done, m, cfg)
        if problem:
            raise loop.TrainingHalted(problem)

    with halt_note(run_dir):
        loop.run(
            wrapped, opt, sched, stream, cfg, clip_norm=cfg.optim.clip_norm, device=info.device, seed=seed,
            start_step=step, rank=info.rank, world_size=info.world_size, after_step=ema, on_log=on_log,
            on_save=saver(wrapped, opt, sched, stream, history, run_dir, meta, cfg, info, files, clock),
        )  # fmt: skip
    return history


@contextlib.contextmanager
def halt_note(run_dir: Path) -> Iterator[None]:
    """Add the last good checkpoint (never one written after the problem) to a ``TrainingHalted``."""
    try:
        yield
    except loop.TrainingHalted as e:
        last = checkpoint.latest(run_dir)
        where = (
            f"the last good checkpoint is {last}; rerunning the stage resumes from it"
            if last
            else "no checkpoint was written yet"
        )
        raise loop.TrainingHalted(f"{e}. Stopped: {where}.") from None


# ---------------------------------------------------------------------------------------------- CLI


def stage_paths(params: dict[str, Any], modality: str) -> dict[str, Path]:
    paths = section(params, "paths", PathsConfig)
    return {
        "shards": Path(paths.shards) / modality,  # split "pretrain": <shards>/<m>/pretrain-*.tar
        "run_dir": Path(paths.checkpoints) / "pretrain" / modality,
        "metrics": Path(paths.metrics) / "pretrain" / f"{modality}.json",
        "curve": Path(paths.plots) / "pretrain" / f"{modality}.csv",
    }


def preprocessing_files(manifest: dict[str, Any], shard_dir: Path) -> dict[str, Path]:
    """Files the manifest's preprocessing section names (e.g. the tokenizer): copied into each checkpoint."""
    prep = manifest.get("preprocessing") or {}
    return {
        Path(v).name: shard_dir / v for v in prep.values() if isinstance(v, str) and (shard_dir / v).is_file()
    }


def resume_relevant(cfg: Any) -> dict[str, Any]:
    """The stage config without the fields that leave the weights unchanged (``RESUME_NEUTRAL``)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUME_NEUTRAL}


def per_rank_batch(batch_size: int, grad_accum: int, info: distributed.DistInfo, where: str) -> int:
    n = grad_accum * info.world_size
    if batch_size % n:
        raise ValueError(
            f"{where}.batch_size={batch_size} does not split into {info.world_size} rank(s) x {grad_accum} "
            f"micro-step(s); use a multiple of {n}"
        )
    return batch_size // n


def cli_pretrain(params: dict[str, Any], args) -> int:
    """``d2v pretrain <modality>``: config, shards and an existing checkpoint are checked before any work."""
    from d2v.data.loader import build_loader, read_manifest
    from d2v.modalities import get

    m = args.modality
    mod = get(m)
    model_cfg = mod.model_config((params.get("model") or {}).get(m), f"model.{m}")
    cfg = section(params, "pretrain", PretrainConfig, m)
    seed = int(params.get("seed", 0))
    p = stage_paths(params, m)
    manifest = read_manifest(p["shards"])
    fingerprint = {
        "model_config": to_dict(model_cfg), "config": resume_relevant(cfg), "seed": seed,
        "data": checkpoint.file_sha256(p["shards"] / "manifest.json"),
    }  # fmt: skip
    info = distributed.init()
    per_rank = per_rank_batch(cfg.batch_size, cfg.grad_accum, info, f"pretrain.{m}")
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = mod.build_pretrain_model(model_cfg)

    def make_loader(epoch: int):
        return build_loader(
            p["shards"], "pretrain", model_cfg, batch_size=per_rank, mode="pretrain", seed=seed,
            num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, max_len=cfg.max_len,
            resampled=cfg.resampled, epoch_len=cfg.epoch_len, rank=info.rank, world_size=info.world_size,
            epoch=epoch, length_buckets=cfg.length_buckets,
        )  # fmt: skip

    make_loader(0)  # fail now (empty split, model/shard mismatch) rather than after the model is built
    checkpoint.prepare_run_dir(p["run_dir"], m, "pretrain", fingerprint, remove=info.is_main)
    distributed.barrier()
    meta = {
        "modality": m, "kind": "pretrain", "model_config": to_dict(model_cfg), "encoder_prefix": "student.",
        "config": to_dict(cfg), "seed": seed, "preprocessing": manifest.get("preprocessing"),
        "fingerprint": fingerprint,
    }  # fmt: skip
    run_config = {"model": to_dict(model_cfg), "pretrain": to_dict(cfg), "seed": seed,
                  "profile": params.get("profile")}  # fmt: skip
    tracker = tracking.start(params, "pretrain", m, config=run_config, rank=info.rank)
    clock = loop.Stopwatch()
    try:
        history = pretrain(model, cfg, make_loader, p["run_dir"], meta, seed=seed, info=info, tracker=tracker,
                           files=preprocessing_files(manifest, p["shards"]), clock=clock)  # fmt: skip
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    if info.is_main:
        metrics = write_outputs(
            history, p["metrics"], p["curve"], "pretrain", seconds=clock.seconds(), batch_size=cfg.batch_size
        )
        tracker.summary(metrics)
        if tracker.log_checkpoints:
            tracker.artifact(checkpoint.latest(p["run_dir"]), f"pretrain-{m}", "model")
        loss = metrics.get("pretrain/loss", float("nan"))
        print(f"pretrain {m}: {metrics['pretrain/steps']} steps, loss {loss:.4f}; checkpoints in "
              f"{p['run_dir']}, metrics in {p['metrics']}")  # fmt: skip
    tracker.finish()
    distributed.cleanup()
    return 0
