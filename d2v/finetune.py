"""The ``finetune`` stage: a task head on the pretrained (or a freshly initialised) encoder, same loop.

``d2v finetune <m> [--budget B] [--seed S] [--init pretrained|scratch]`` reads ``model.<m>`` and
``finetune.<m>``, loads the encoder of ``<paths.checkpoints>/pretrain/<m>`` (``--init scratch``: the same
architecture, random init, same schedule: the baseline), builds the task model with the modality's
``build_finetune_model``, and trains on the task's train split with a label budget (labels per class, or a
fraction). Checkpoints go to ``<paths.checkpoints>/finetune/<m>/<run>`` and metrics to
``<paths.metrics>/finetune/<m>/<run>.json`` with ``<run>`` = ``b<budget>-s<seed>-<pretrained|scratch>``.
No EMA; layer-wise LR decay (``optim.layer_decay``, images 0.65 [DV]); the encoder can be frozen for the
first ``freeze_encoder_steps`` updates (fairseq ``freeze_finetune_updates``); the audio conv feature
encoder is always frozen by its head module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from d2v import checkpoint, distributed, loop, tracking
from d2v.config import ConfigError, PathsConfig, section, to_dict
from d2v.heads import FinetuneMask, FinetuneModel, HeadConfig
from d2v.optim import OptimConfig, build_optimizer, build_scheduler
from d2v.train import (
    compile_blocks,
    data_position,
    halt_note,
    per_rank_batch,
    preprocessing_files,
    resume,
    resume_relevant,
    saver,
    write_outputs,
)  # fmt: skip

Budget = int | float
CURVE_FIELDS = ("step", "loss", "accuracy", "lr")


@dataclass(frozen=True)
class FinetuneConfig(loop.LoopConfig):
    """The ``finetune.<modality>`` section (per-modality values are set in params.yaml)."""

    steps: int = 500
    """Optimizer updates."""
    batch_size: int = 16
    """Samples per update over all ranks and accumulation micro-steps."""
    keep_checkpoints: int = 1
    """Keep the newest k checkpoints."""
    task: Literal["classification", "ctc"] = "classification"
    """Which labelled task of the shards: 'classification' (every modality) or 'ctc' (speech, letters)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup=0.1))
    """AdamW + schedule (reference §3: speech tri-stage 10/40/50 %, final 0.05; vision cosine with
    layer_decay 0.65; text 6 % warm-up)."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Task-head options (dropout, label smoothing, audio projector width)."""
    freeze_encoder_steps: int = 0
    """Train only the head for this many updates first (fairseq ``freeze_finetune_updates``)."""
    mask: FinetuneMask | None = None
    """Mask the input while fine-tuning (speech only: wav2vec 2.0 fine-tuning, kept by data2vec); None: off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_encoder_steps < 0:
            raise ConfigError(f"finetune.freeze_encoder_steps must be >= 0, got {self.freeze_encoder_steps}")


@dataclass(frozen=True)
class SweepConfig:
    """The ``sweep`` section: the ``finetune@<m>-<budget>-<seed>-<init>`` matrix of dvc.yaml.

    One list for every modality (labels per class compare across them); ``evaluate@<m>`` scores exactly
    these runs, so a run removed from the sweep is never read even if its folder is still there.
    """

    budgets: tuple[Budget, ...] = (5, 50)
    """Label budgets: an int is labels per class, a float in (0, 1] a fraction of the train split."""
    seeds: tuple[int, ...] = (0,)
    """Fine-tuning seeds (head init, data order, dropout)."""
    inits: tuple[Literal["pretrained", "scratch"], ...] = ("pretrained", "scratch")
    """'pretrained': start from the pretrain stage's encoder; 'scratch': same architecture, random init."""

    def __post_init__(self) -> None:
        if not self.budgets or not self.seeds or not self.inits:
            raise ConfigError("sweep: budgets, seeds and inits need at least one entry each")
        for b in self.budgets:
            check_budget(b, "sweep.budgets")


def check_budget(b: Budget, where: str) -> None:
    if isinstance(b, bool) or (isinstance(b, int) and b < 1) or (isinstance(b, float) and not 0.0 < b <= 1.0):
        raise ConfigError(
            f"{where}: {b!r} is not a label budget (an int >= 1 per class, or a fraction in (0, 1])"
        )


def parse_budget(text: str | None, default: Budget) -> Budget:
    """``--budget``: '10' -> 10 labels per class, '0.1' -> 10 % of each class, None -> ``default``."""
    if text is None:
        return default
    try:
        b: Budget = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ValueError(
            f"--budget {text!r}: expected labels per class (e.g. 10) or a fraction (e.g. 0.1)"
        ) from None
    check_budget(b, "--budget")
    return b


def run_name(budget: Budget, seed: int, init: Literal["pretrained", "scratch"]) -> str:
    """``b10-s0-pretrained``, ``b0.1-s2-scratch``: the folder / metrics name of one fine-tuning run."""
    return f"b{budget}-s{seed}-{init}"


def build_finetune_model(modality: str, encoder, task: str, num_classes: int | None, head: HeadConfig):
    """The modality's ``build_finetune_model`` (exported by the package, or from its ``heads`` module)."""
    from d2v.modalities import get

    mod = get(modality)
    build = getattr(mod, "build_finetune_model", None)
    if build is None:
        build = importlib.import_module(f"{mod.__name__}.heads").build_finetune_model
    return build(encoder, task, num_classes, head)


# -------------------------------------------------------------------------------------------- stage


def finetune(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    make_loader,
    run_dir: str | Path,
    meta: dict[str, Any],
    *,
    seed: int = 0,
    info: distributed.DistInfo | None = None,
    tracker: tracking.NullTracker | None = None,
    files: dict[str, Path] | None = None,
    clock: loop.Stopwatch | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` to ``cfg.steps`` updates, resuming from ``run_dir``; returns the logged history.

    ``clock`` ends up holding the run's training seconds (resumes included).
    """
    info = info or distributed.DistInfo()
    tracker = tracker or tracking.NullTracker()
    run_dir = Path(run_dir)
    if info.is_main:
        checkpoint.clean_stale(run_dir)
    model.set_encoder_trainable(True)  # the optimizer and DDP see every trainable tensor from the start
    model.to(info.device)
    if cfg.compile:
        compile_blocks(model)
    wrapped = distributed.wrap(model, info, cfg.parallel)
    opt = build_optimizer(model, cfg.optim, model.layer_ids(), model.encoder.transformer.depth)
    sched = build_scheduler(opt, cfg.optim, cfg.steps)
    state = resume(wrapped, opt, sched, run_dir) or {}
    step, history = state.get("step", 0), state.get("history", [])
    stream = loop.EpochStream(make_loader, **data_position(state, info))
    clock = clock or loop.Stopwatch()
    clock.restart(state.get("seconds", 0.0))
    model.set_encoder_trainable(step >= cfg.freeze_encoder_steps)

    def unfreeze(done: int) -> dict[str, float]:
        if done == cfg.freeze_encoder_steps:
            model.set_encoder_trainable(True)
        return {}

    def on_log(done: int, m: dict[str, float]) -> None:
        history.append({"step": done, **{k: m[k] for k in CURVE_FIELDS[1:] if k in m}})
        tracker.log({f"finetune/{k}": v for k, v in m.items()}, step=done)

    with halt_note(run_dir):
        loop.run(
            wrapped, opt, sched, stream, cfg, clip_norm=cfg.optim.clip_norm, device=info.device, seed=seed,
            start_step=step, rank=info.rank, world_size=info.world_size, after_step=unfreeze, on_log=on_log,
            on_save=saver(wrapped, opt, sched, stream, history, run_dir, meta, cfg, info, files, clock),
        )  # fmt: skip
    return history


# ---------------------------------------------------------------------------------------------- CLI


def task_info(manifest: dict[str, Any], task: str, shard_dir: Path) -> tuple[str, int | None, dict[str, Any]]:
    """``(train split, num_classes or None for CTC, the manifest's task entry)``."""
    tasks = manifest.get("tasks") or {}
    if task not in tasks:
        raise ValueError(
            f"{shard_dir}: the shards have no {task!r} task (they have {sorted(tasks)}); "
            f"set finetune.<m>.task to one of those"
        )
    entry = tasks[task]
    split = next(s for s in entry["splits"] if s.endswith("train"))
    return split, (len(entry["labels"]) if entry.get("target") == "label" else None), entry


def cli_finetune(params: dict[str, Any], args) -> int:
    """``d2v finetune <m>``: checkpoint, shards and budget are checked before any work."""
    from d2v.data.loader import build_loader, read_manifest
    from d2v.modalities import get

    m = args.modality
    mod = get(m)
    model_cfg = mod.model_config((params.get("model") or {}).get(m), f"model.{m}")
    cfg = section(params, "finetune", FinetuneConfig, m)
    seed = int(params.get("seed", 0)) if args.seed is None else int(args.seed)
    budget = parse_budget(args.budget, section(params, "sweep", SweepConfig).budgets[0])
    init = getattr(args, "init", None) or "pretrained"
    paths = section(params, "paths", PathsConfig)
    shard_dir = Path(paths.shards) / m
    pretrain_dir = Path(paths.checkpoints) / "pretrain" / m
    name = run_name(budget, seed, init)
    run_dir = Path(paths.checkpoints) / "finetune" / m / name
    metrics_file = Path(paths.metrics) / "finetune" / m / f"{name}.json"
    curve_file = Path(paths.plots) / "finetune" / m / f"{name}.csv"

    manifest = read_manifest(shard_dir)
    split, num_classes, task_entry = task_info(manifest, cfg.task, shard_dir)
    source = None
    if init == "pretrained":
        if checkpoint.latest(pretrain_dir) is None:
            raise ValueError(
                f"{pretrain_dir}: no pretrained {m} checkpoint; run `d2v pretrain {m}` first, or fine-tune "
                f"from random init with --init scratch"
            )
        source = checkpoint.resolve(pretrain_dir)
        checkpoint.check_compatible(source, m, model_cfg, "pretrain")
        encoder = checkpoint.load_encoder(source, pretrained=True)
    else:
        torch.manual_seed(seed)
        encoder = mod.build_encoder(model_cfg)
    torch.manual_seed(seed)  # head init
    model = build_finetune_model(m, encoder, cfg.task, num_classes, cfg.head)
    fingerprint = {
        "model_config": to_dict(model.encoder.config), "config": resume_relevant(cfg), "seed": seed,
        "budget": budget, "init": init, "data": checkpoint.file_sha256(shard_dir / "manifest.json"),
        "pretrained": checkpoint.read_meta(source).get("fingerprint") if source else None,
        "pretrained_step": checkpoint.read_meta(source)["step"] if source else None,
    }  # fmt: skip
    info = distributed.init()
    per_rank = per_rank_batch(cfg.batch_size, cfg.grad_accum, info, f"finetune.{m}")

    def make_loader(epoch: int):
        return build_loader(
            shard_dir, split, model_cfg, batch_size=per_rank, mode="finetune", seed=seed,
            num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, max_len=cfg.max_len,
            label_budget=budget, rank=info.rank, world_size=info.world_size, epoch=epoch,
            finetune_mask=cfg.mask,
        )  # fmt: skip

    make_loader(0)  # budget larger than a class, empty split, ...: fail before training
    checkpoint.prepare_run_dir(run_dir, m, "finetune", fingerprint, remove=info.is_main)
    distributed.barrier()
    meta = {
        "modality": m, "kind": "finetune", "model_config": to_dict(model.encoder.config),
        "encoder_prefix": "encoder.", "task": cfg.task, "num_classes": num_classes, "head": to_dict(cfg.head),
        "budget": budget, "seed": seed, "init": init, "pretrained_from": str(source) if source else None,
        "config": to_dict(cfg), "preprocessing": manifest.get("preprocessing"), "task_info": task_entry,
        "fingerprint": fingerprint,
    }  # fmt: skip
    run_config = {"model": to_dict(model_cfg), "finetune": to_dict(cfg), "seed": seed, "budget": budget,
                  "init": init, "profile": params.get("profile")}  # fmt: skip
    tracker = tracking.start(params, "finetune", m, config=run_config, name=name, rank=info.rank)
    clock = loop.Stopwatch()
    try:
        history = finetune(model, cfg, make_loader, run_dir, meta, seed=seed, info=info, tracker=tracker,
                           files=preprocessing_files(manifest, shard_dir), clock=clock)  # fmt: skip
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    if info.is_main:
        metrics = write_outputs(history, metrics_file, curve_file, "finetune", CURVE_FIELDS,
                                seconds=clock.seconds(), batch_size=cfg.batch_size)  # fmt: skip
        tracker.summary(metrics)
        if tracker.log_checkpoints:
            tracker.artifact(checkpoint.latest(run_dir), f"finetune-{m}-{name}", "model")
        print(f"finetune {m} {name}: {metrics['finetune/steps']} steps, loss {metrics['finetune/loss']:.4f}; "
              f"checkpoints in {run_dir}")  # fmt: skip
    tracker.finish()
    distributed.cleanup()
    return 0
