"""The ``pretrain`` stage: data2vec pretraining of one modality, resumable, with collapse guards.

``d2v pretrain <m>`` reads ``model.<m>`` and ``pretrain.<m>``, trains on ``<paths.shards>/<m>/pretrain``,
checkpoints to ``<paths.checkpoints>/pretrain/<m>/step-*`` and writes ``<paths.metrics>/pretrain/<m>.json``
(flat ``pretrain/*`` scalars) and the loss curve ``<paths.plots>/pretrain/<m>.csv``. A rerun of a killed
run continues from its last checkpoint. ``torchrun --nproc-per-node N -m d2v pretrain <m>`` runs DDP.
What pretraining adds to the shared runner (``d2v.runner``): the EMA teacher update after every step and
the collapse guards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from d2v import distributed, initialize, loop, runner, tracking
from d2v.config import ConfigError, PathsConfig, section, to_dict
from d2v.data.loader import LoaderSpec, build_loader, read_manifest
from d2v.data.remote import shard_location
from d2v.data.shards import manifest_sha256, preprocessing_files
from d2v.data2vec import Data2Vec, ema_decay
from d2v.modalities import get
from d2v.optim import OptimConfig

CURVE_FIELDS = ("step", "loss", "target_var", "pred_var", "lr", "tau")


@dataclass(frozen=True)
class PretrainConfig(loop.LoopConfig):
    """The ``pretrain.<modality>`` section (per-modality defaults are set in params.yaml)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW + LR schedule + clipping (spec §2.2-2.5)."""
    guard_after: int = 5000
    """Collapse guards start after this many updates ([FS] 5,000)."""
    min_target_var: float = 0.1
    """Stop if the teacher targets' std falls below this ([FS] ``min_target_var``, spec §1.9)."""
    min_pred_var: float = 0.01
    """Stop if the student predictions' std falls below this ([FS] ``min_pred_var``)."""
    min_len: int | None = None
    """Skip pretraining examples shorter than this (audio: samples). [FS] drops clips under 2 s
    (``min_sample_size: 32000``): its masks (spans of 10 frames, ~49 % masked) assume context around them.
    None (the demo: most embedded recordings are single words) keeps every clip."""
    length_buckets: int = 0
    """k > 1: batch together examples of similar length (pools of k batches sorted by length). Speech needs
    it: every row is trimmed to the batch's smallest masked count (fairseq ``require_same_masks``), so one
    short clip in a batch of long ones masks ~10% instead of ~49% of frames (measured; fairseq buckets too)."""
    resampled: bool = False
    """Draw shards with replacement, ``epoch_len`` batches per epoch: for many ranks and few shards."""
    epoch_len: int | None = None
    """Batches per epoch and rank (needed with ``resampled``); None: one pass over the shards."""
    init: str | None = None
    """A Hugging Face data2vec folder (e.g. ``facebook/data2vec-audio-base``, downloaded once; a
    fine-tuned one's head is ignored) or a d2v checkpoint: the student starts from its encoder and the
    teacher as its copy (continued, "domain-adaptive" pretraining; ``d2v.initialize``). With ``steps: 0``
    the stage writes it as a d2v checkpoint unchanged. Put it under ``<paths.published>/<m>/``, which
    dvc.yaml lists as a dependency. None: random init."""

    min_steps: ClassVar[int] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps == 0 and self.init is None:
            raise ConfigError("steps must be >= 1, got 0 (0 means: use init as is, and init is not set)")
        if self.min_len is not None and self.min_len < 1:
            raise ConfigError(f"min_len must be >= 1 or null, got {self.min_len}")


def collapse_check(step: int, metrics: dict[str, float], cfg: PretrainConfig) -> str | None:
    """What collapsed, with what to try, or None (only after ``guard_after`` updates)."""
    if step < cfg.guard_after:
        return None
    for key, low in (("target_var", cfg.min_target_var), ("pred_var", cfg.min_pred_var)):
        if metrics[key] < low:
            return (
                f"representation collapse at step {step}: {key} = {metrics[key]:.4g} < {low} "
                f"(spec §1.9). Try a lower learning rate (optim.lr), a longer warm-up (optim.warmup), "
                f"or a higher teacher decay (model.<m>.ema.tau0 / tau_end)"
            )
    return None


def pretrain_job(
    model: Data2Vec,
    cfg: PretrainConfig,
    make_loader: Callable[[int], Iterable[dict[str, Any]]],
    run_dir: str | Path,
    meta: dict[str, Any],
    *,
    files: dict[str, Path | bytes] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> runner.Job:
    """What pretraining adds to the runner: the EMA step after every update, the collapse guards.

    ``after_step`` is a test hook run after each update (after the EMA).
    """

    def ema(done: int) -> dict[str, float]:
        tau = ema_decay(done, model.ema)
        model.ema_step(tau)  # after every optimizer step, in fp32 (§1.2)
        if after_step is not None:
            after_step(done)
        return {"tau": tau}

    return runner.Job(
        "pretrain", model, cfg, make_loader, Path(run_dir), meta, CURVE_FIELDS, files=files, after_step=ema,
        check=lambda step, m: collapse_check(step, m, cfg),
    )  # fmt: skip


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
    files: dict[str, Path | bytes] | None = None,
    after_step: Callable[[int], None] | None = None,
    clock: loop.Stopwatch | None = None,
) -> list[dict[str, float]]:
    """Pretrain ``model`` to ``cfg.steps`` updates, resuming from ``run_dir``; returns the logged history.

    ``make_loader(epoch)`` yields this rank's batches of one epoch; ``meta`` goes into every checkpoint's
    meta.json and ``files`` are copied next to the weights (see ``d2v.runner.fit``).
    """
    job = pretrain_job(model, cfg, make_loader, run_dir, meta, files=files, after_step=after_step)
    return runner.fit(job, seed=seed, info=info, tracker=tracker, clock=clock)


# ---------------------------------------------------------------------------------------------- CLI


def pretrain_loader(
    cfg: PretrainConfig,
    shard_dir: Any,
    model_cfg: Any,
    seed: int,
    info: distributed.DistInfo,
    grad_accum: int,
    where: str,
) -> Callable[[int], Iterable[dict[str, Any]]]:
    """``make_loader(epoch)`` of this rank's pretraining batches (``cfg.batch_size`` over all ranks and
    ``grad_accum`` micro-steps); the first epoch's loader is built once here, so that an empty split or a
    model/shard mismatch fails before any model is built."""
    per_rank = runner.per_rank_batch(cfg.batch_size, grad_accum, info, where)
    spec = LoaderSpec(
        batch_size=per_rank, mode="pretrain", seed=seed, num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer, max_len=cfg.max_len, min_len=cfg.min_len,
        resampled=cfg.resampled, epoch_len=cfg.epoch_len, rank=info.rank, world_size=info.world_size,
        length_buckets=cfg.length_buckets,
    )  # fmt: skip

    def make_loader(epoch: int):
        return build_loader(shard_dir, "pretrain", model_cfg, replace(spec, epoch=epoch))

    make_loader(0)
    return make_loader


def init_outside_published(init: str, paths: PathsConfig, modality: str) -> str | None:
    """A warning when ``init`` is outside ``<paths.published>/<m>``, the folder dvc.yaml tracks."""
    tracked = (Path(paths.published) / modality).resolve()
    if tracked == Path(init).resolve() or tracked in Path(init).resolve().parents:
        return None
    return (
        f"pretrain.{modality}.init: {init} is outside {paths.published}/{modality}, the folder dvc.yaml "
        "lists as this stage's dependency: DVC will not rerun the stage when that folder changes"
    )


def param_counts(encoder: Any) -> dict[str, int]:
    """``encoder_params``: every parameter of the encoder that fine-tuning loads; ``stack_params``: those of
    its Transformer blocks (the part a joint model shares between modalities)."""
    stack = getattr(encoder, encoder.stack_attr)
    return {
        "encoder_params": sum(p.numel() for p in encoder.parameters()),
        "stack_params": sum(p.numel() for p in stack.parameters()),
    }


def cli_pretrain(params: dict[str, Any], args) -> int:
    """``d2v pretrain <modality>``: config, shards and an existing checkpoint are checked before any work."""
    m = args.modality
    mod = get(m)
    cfg = section(params, "pretrain", PretrainConfig, m)
    src = initialize.init_source(cfg.init, m)
    model_cfg = initialize.model_config((params.get("model") or {}).get(m), m, src)
    seed = int(params.get("seed", 0))
    paths = section(params, "paths", PathsConfig)
    shard_dir = shard_location(paths.shards, m)  # split "pretrain": <shards>/<m>/pretrain-*.tar (or a URL)
    manifest = read_manifest(shard_dir)
    if src is not None:
        initialize.check_preprocessing(src, manifest, shard_dir)
    info = distributed.init(timeout_s=cfg.dist_timeout_s)
    make_loader = pretrain_loader(cfg, shard_dir, model_cfg, seed, info, cfg.grad_accum, f"pretrain.{m}")
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = mod.build_pretrain_model(model_cfg)
    init = None
    if src is not None:
        initialize.start_from(model, src)
        init = src.record()
        if info.is_main:
            for note in (initialize.head_note(src), init_outside_published(cfg.init, paths, m)):
                if note:
                    print(note)
    meta = {
        "modality": m, "kind": "pretrain", "model_config": to_dict(model_cfg), "encoder_prefix": "student.",
        "config": to_dict(cfg), "seed": seed, "preprocessing": manifest.get("preprocessing"), "init": init,
    }  # fmt: skip
    fingerprint = {
        "model_config": to_dict(model_cfg), "config": runner.resume_relevant(cfg), "seed": seed,
        "data": manifest_sha256(shard_dir),
        "init": init["sha256"] if init else None,
    }  # fmt: skip
    run_dir = Path(paths.checkpoints) / "pretrain" / m
    job = pretrain_job(model, cfg, make_loader, run_dir, meta,
                       files=preprocessing_files(manifest, shard_dir))  # fmt: skip
    started = param_counts(model.student)
    if src is not None:
        started |= {
            "init": str(src.path), "init_model_type": src.model_type,
            "init_size": f"{model_cfg.transformer.depth} x {model_cfg.transformer.dim}",
        }  # fmt: skip
    outputs = runner.Outputs(
        Path(paths.metrics) / "pretrain" / f"{m}.json", Path(paths.plots) / "pretrain" / f"{m}.csv",
        batch_size=cfg.batch_size, info=started,
    )  # fmt: skip
    runner.run_stage(
        job, params=params, modality=m, fingerprint=fingerprint, outputs=outputs, seed=seed, info=info,
        run_config={"model": to_dict(model_cfg), "pretrain": to_dict(cfg)},
    )  # fmt: skip
    return 0
