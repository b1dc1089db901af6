"""The ``finetune`` stage: a task head on the pretrained (or a freshly initialised) encoder, same runner.

``d2v finetune <m> [--budget B] [--seed S] [--init pretrained|scratch|published|joint]`` reads
``model.<m>`` and ``finetune.<m>``, loads the encoder of ``<paths.checkpoints>/pretrain/<m>`` (``--init
scratch``: the same architecture, random init, same schedule: the baseline; ``--init joint``: m's encoder of
``<paths.checkpoints>/pretrain/joint``), builds the task model with the modality's
``build_finetune_model``, and trains on the task's train split with a label budget (labels per class, or a
fraction). Checkpoints go to ``<paths.checkpoints>/finetune/<m>/<run>`` and metrics to
``<paths.metrics>/finetune/<m>/<run>.json`` with ``<run>`` = ``d2v.sweep.Run.name``.
What fine-tuning adds to the shared runner (``d2v.runner``): no EMA; layer-wise LR decay
(``optim.layer_decay``, images 0.65 [DV]); the encoder can be frozen for the first ``freeze_encoder_steps``
updates (fairseq ``freeze_finetune_updates``); the audio conv feature encoder is always frozen by its head;
``head_init: probe`` fits the classifier's output layer on frozen features before the first update (LP-FT).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from d2v import checkpoint, distributed, initialize, loop, runner, tracking
from d2v.config import ConfigError, PathsConfig, from_dict, section, to_dict
from d2v.data.loader import LoaderSpec, build_loader, read_manifest, within_smallest_class
from d2v.data.remote import Location, shard_location
from d2v.data.shards import manifest_sha256, preprocessing_files
from d2v.heads import FinetuneModel, HeadConfig, SequenceClassifier
from d2v.load import arm_dir, arm_encoder, build_finetune_model, head_config, joint_member
from d2v.metrics import fit_logistic
from d2v.modalities import get
from d2v.optim import OptimConfig
from d2v.precision import Precision, autocast
from d2v.sweep import JOINT, PRETRAINED, PUBLISHED, SCRATCH, Run, SweepConfig, parse_budget

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
    """AdamW + schedule (spec §3: speech tri-stage 10/40/50 %, final 0.05; vision cosine with
    layer_decay 0.65; text 6 % warm-up)."""
    head: dict[str, Any] = field(default_factory=dict)
    """Task-head options, checked by the modality's ``HeadConfig`` (dropout, label smoothing; audio's
    projector width ``proj_dim``)."""
    freeze_encoder_steps: int = 0
    """Train only the head for this many updates first (fairseq ``freeze_finetune_updates``)."""
    head_init: Literal["random", "probe"] = "random"
    """'random': the reference heads' init. 'probe': before the first update, the output layer of the
    classification head is set to a logistic regression fitted on the frozen features of the training items
    (the head's own features: pooling, norm / dense layer, eval mode), then everything is fine-tuned:
    LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"). With a random head, the first
    updates push large, uninformative gradients into the encoder; with a few labels that undoes much of what
    pretraining gave. Not in the data2vec recipes, whose fine-tuning sets are large; fairseq's low-resource
    speech recipes get part of the effect by freezing the encoder for most updates."""
    head_init_l2: float = 1e-2
    """L2 penalty of that regression (on standardised features, as the probe's ``probe_l2``). Larger than the
    probe's: a few labels are linearly separable, and an unpenalised fit would start fine-tuning with
    saturated logits. Even so dropout can swing the first train-mode logits: ``head_init_features``."""
    head_init_features: Literal["eval", "train"] = "eval"
    """The features that regression is fitted on. 'eval': the encoder in eval mode (LP-FT's frozen features).
    'train': in train mode, dropout and drop-path drawn as in fine-tuning's forward passes
    (``TRAIN_MODE_DRAWS`` draws of each item), so that the fitted layer sees the features it is then trained
    on. Where the training items' features barely differ from one another (a few items, an encoder that
    pools them to nearly one vector), standardising each feature scales the eval-mode fit up until dropout's
    noise alone swings the first train-mode logits far from chance. The demo's image and text use 'train',
    speech 'eval' (benchmarks/RESULTS.md, "Why the defaults are what they are")."""
    head_init_items: int = 4096
    """At most this many training items (in the loader's fixed order) are used for the fit: the fit costs one
    forward pass over them, so the all-labels budget does not pay for a pass over the whole split."""
    mask: dict[str, Any] | None = None
    """Mask the input while fine-tuning, checked by the modality's ``FinetuneMask`` (speech only: wav2vec
    2.0 fine-tuning, kept by data2vec); None: off."""
    scratch_lr_scale: float = 1.0
    """The scratch arm's LR is ``optim.lr`` times this (its grid is centred there): a network from random init
    trains at larger steps than one from trained weights (fine-tuning LRs sit 10-100x below pretraining
    ones, [P1] §4), so centring its grid on the fine-tuning LR would tune it in the wrong place. 1: the same
    LR for every arm."""
    lr_grid: tuple[float, ...] = ()
    """Multipliers of ``optim.lr`` that each run tries before it trains (:func:`search_lr`): one short run per
    multiplier, all from the same start, scored on the task's valid split; the run then trains at the LR that
    scored best (ties: the multiplier nearest 1). Every arm and budget chooses its own, so the report
    compares each arm at its best LR rather than at one shared recipe. The search runs once per arm and
    budget, at the params seed (its label draw, init and order), and the runs of every seed train at its
    choice: seeds then differ by seed alone, and the search costs one run's share, not one per seed.
    Empty: ``optim.lr`` as it is."""
    lr_grid_steps: int | None = None
    """Updates of each short run (its schedule compressed to them: warm-up and decay as the full run's);
    None: ``steps``."""
    lr_grid_valid_budget: int | None = 50
    """Valid items per class each short run is scored on (the first in the split's fixed order); None: the
    whole valid split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_encoder_steps < 0:
            raise ConfigError(f"finetune.freeze_encoder_steps must be >= 0, got {self.freeze_encoder_steps}")
        if self.head_init_l2 < 0 or self.head_init_items < 1:
            raise ConfigError(
                f"finetune: head_init_l2 must be >= 0 and head_init_items >= 1, got {self.head_init_l2}, "
                f"{self.head_init_items}"
            )
        if self.head_init == "probe" and self.task != "classification":
            raise ConfigError(
                f"finetune.head_init: probe fits a classifier's output layer; task {self.task!r} has none "
                f"(use head_init: random)"
            )
        if any(not m > 0 for m in self.lr_grid) or len(set(self.lr_grid)) != len(self.lr_grid):
            raise ConfigError(f"lr_grid: distinct multipliers > 0 expected, got {list(self.lr_grid)}")
        if self.lr_grid and self.task != "classification":
            raise ConfigError(
                f"lr_grid: the short runs are scored by valid accuracy; task {self.task!r} has no classes "
                f"(use lr_grid: [])"
            )
        if not self.scratch_lr_scale > 0:
            raise ConfigError(f"scratch_lr_scale must be > 0, got {self.scratch_lr_scale}")
        if self.lr_grid_steps is not None and not 1 <= self.lr_grid_steps <= self.steps:
            raise ConfigError(
                f"lr_grid_steps must be null or 1..steps ({self.steps}), got {self.lr_grid_steps}"
            )
        if self.lr_grid_valid_budget is not None and self.lr_grid_valid_budget < 1:
            raise ConfigError(f"lr_grid_valid_budget must be >= 1 or null, got {self.lr_grid_valid_budget}")


def modality_options(cfg: FinetuneConfig, modality: str) -> tuple[HeadConfig, Any]:
    """``(head options, fine-tuning mask or None)`` of ``finetune.<modality>``, checked by the modality's
    ``HeadConfig`` / ``FinetuneMask``; ConfigError naming the key otherwise."""
    where = f"finetune.{modality}"
    head = head_config(modality, cfg.head, f"{where}.head")
    if cfg.mask is None:
        return head, None
    mask_cls = get(modality).FinetuneMask
    if mask_cls is None:
        raise ConfigError(
            f"{where}.mask: masking while fine-tuning is a speech recipe (wav2vec 2.0 fine-tuning); "
            f"{modality} fine-tunes without it (drop {where}.mask)"
        )
    return head, from_dict(mask_cls, cfg.mask, f"{where}.mask")


TRAIN_MODE_DRAWS = 4
"""Dropout draws of each item that ``head_init_features: train`` fits on: one draw overfits its own noise
(a wider spread over fine-tuning seeds at 5 labels/class: benchmarks/RESULTS.md)."""


@torch.no_grad()
def fit_output_layer(
    model: SequenceClassifier,
    batches: Iterable[dict[str, Any]],
    *,
    l2: float,
    max_items: int,
    features: Literal["eval", "train"] = "eval",
    precision: Precision = "fp32",
) -> float:
    """Set ``model.output`` to the logistic regression (:func:`d2v.metrics.fit_logistic`) of the labels on
    ``model.features`` (in ``features`` mode; ``TRAIN_MODE_DRAWS`` draws of each item in 'train') of the first
    ``max_items`` items of ``batches``, their forward passes in ``precision``'s autocast (the fit itself in
    fp32); returns its training accuracy. Deterministic: the same items (and, for 'train', the same torch RNG
    state) give the same layer."""
    was_training = model.training
    model.train(features == "train")
    device = next(model.parameters()).device
    draws = TRAIN_MODE_DRAWS if features == "train" else 1
    kept, xs, ys, n = [], [], [], 0  # kept: the batches (as loaded) for the further draws
    for batch in batches:
        if draws > 1:
            kept.append(batch)
        with autocast(precision, device):
            xs.append(model.features(loop.to_device(batch, device)).float().cpu())
        ys.append(batch["labels"].cpu())
        n += len(ys[-1])
        if n >= max_items:
            break
    if not ys:
        raise ValueError("finetune.head_init: probe: the training split yielded no items")
    with autocast(precision, device):
        further = [torch.cat([model.features(loop.to_device(b, device)).float().cpu() for b in kept])
                   for _ in range(draws - 1)]  # fmt: skip
    x = torch.cat([d[:max_items] for d in (torch.cat(xs), *further)])
    y = torch.cat(ys)[:max_items].repeat(draws)
    assert model.num_classes is not None
    W_FC, b_C = fit_logistic(x, y, model.num_classes, l2=l2)
    out = model.output
    out.weight.copy_(W_FC.T.to(out.weight.dtype))
    out.bias.copy_(b_C.to(out.bias.dtype))
    model.train(was_training)
    return float(((x.double() @ W_FC + b_C).argmax(-1) == y).double().mean())


@dataclass(frozen=True)
class Fitted:
    """A fitted output layer and the random state right after the fit (:func:`search_lr` hands its fit to
    the full run, which then starts exactly as if it had fitted it itself)."""

    state: dict[str, torch.Tensor]
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None

    @classmethod
    def capture(cls, model: torch.nn.Module) -> Fitted:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(copy.deepcopy(model.state_dict()), torch.get_rng_state(), cuda)

    def restore(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.state)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def finetune_job(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    make_loader: Callable[[int], Iterable[dict[str, Any]]],
    run_dir: str | Path,
    meta: dict[str, Any],
    *,
    files: dict[str, Path | bytes] | None = None,
    head_items: Callable[[], Iterable[dict[str, Any]]] | None = None,
    fitted: Fitted | None = None,
) -> runner.Job:
    """What fine-tuning adds to the runner: layer-wise LR decay, the encoder frozen for the first
    ``freeze_encoder_steps`` updates, and with ``head_init: probe`` the output layer fitted on
    ``head_items()`` (the training items without augmentation, the same on every rank) before a fresh run's
    first update (a resumed run has it in its checkpoint). ``fitted``: that fit, already made from this
    model and random state (:func:`search_lr`'s), taken instead of fitting again."""
    if cfg.head_init == "probe" and (head_items is None or not isinstance(model, SequenceClassifier)):
        raise ValueError("finetune.head_init: probe needs a classification model and its training items")
    model.set_encoder_trainable(True)  # the optimizer and DDP see every trainable tensor from the start

    def unfreeze(done: int) -> dict[str, float]:
        if done == cfg.freeze_encoder_steps:
            model.set_encoder_trainable(True)
        return {}

    def on_start(step: int) -> None:
        if step == 0 and cfg.head_init == "probe" and fitted is not None:
            fitted.restore(model)
            print("finetune: output layer as the LR search fitted it", flush=True)
        elif step == 0 and cfg.head_init == "probe":
            assert head_items is not None and isinstance(model, SequenceClassifier)
            acc = fit_output_layer(
                model, head_items(), l2=cfg.head_init_l2, max_items=cfg.head_init_items,
                features=cfg.head_init_features, precision=cfg.precision,
            )  # fmt: skip
            print(
                f"finetune: output layer fitted on frozen {cfg.head_init_features}-mode features (train "
                f"accuracy {acc:.3f})", flush=True,
            )  # fmt: skip
        model.set_encoder_trainable(step >= cfg.freeze_encoder_steps)

    return runner.Job(
        "finetune", model, cfg, make_loader, Path(run_dir), meta, CURVE_FIELDS, files=files,
        layer_ids=model.layer_ids, after_step=unfreeze, on_start=on_start,
    )  # fmt: skip


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
    files: dict[str, Path | bytes] | None = None,
    clock: loop.Stopwatch | None = None,
    head_items: Callable[[], Iterable[dict[str, Any]]] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` to ``cfg.steps`` updates, resuming from ``run_dir``; returns the logged history."""
    job = finetune_job(model, cfg, make_loader, run_dir, meta, files=files, head_items=head_items)
    return runner.fit(job, seed=seed, info=info, tracker=tracker, clock=clock)


@dataclass(frozen=True)
class LrSearch:
    """What :func:`search_lr` tried and found: the LRs, in ``lr_grid`` order, with their valid accuracy."""

    lrs: tuple[float, ...]
    valid_accuracy: tuple[float, ...]
    recipe_lr: float
    """``optim.lr``: the grid's centre, which wins ties."""
    steps: int
    """Updates of each short run."""

    @property
    def lr(self) -> float:
        """The LR of the best valid accuracy; among equals the one nearest the recipe's, then the lower."""
        best = max(self.valid_accuracy)
        tied = [lr for lr, a in zip(self.lrs, self.valid_accuracy) if a == best]
        return min(tied, key=lambda lr: (abs(math.log(lr / self.recipe_lr)), lr))

    def to_dict(self) -> dict[str, Any]:
        return {"lrs": list(self.lrs), "valid_accuracy": list(self.valid_accuracy), "recipe_lr": self.recipe_lr,
                "steps": self.steps, "lr": self.lr}  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """Flat entries for the run's metrics JSON (``finetune/lr_search/<lr>``: that LR's valid accuracy)."""
        return {"lr": self.lr, **{f"lr_search/{lr:.3g}": a for lr, a in zip(self.lrs, self.valid_accuracy)}}


@torch.no_grad()
def valid_accuracy(model: FinetuneModel, batches: Iterable[dict[str, Any]], precision: Precision) -> float:
    """Accuracy of ``model`` (eval mode) on ``batches``, in the stage's autocast."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in batches:
        with autocast(precision, device):
            pred = model.predict(loop.to_device(batch, device))
        correct += int((pred.cpu() == batch["labels"]).sum())
        total += len(batch["labels"])
    model.train(was_training)
    if total == 0:
        raise ValueError("finetune.lr_grid: the valid split yielded no items to score the short runs on")
    return correct / total


def search_lr(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    job_for: Callable[[FinetuneConfig, Path, Fitted | None], runner.Job],
    valid_batches: Callable[[], Iterable[dict[str, Any]]],
    *,
    seed: int,
    info: distributed.DistInfo | None = None,
) -> tuple[LrSearch, Fitted | None]:
    """Try each LR of ``cfg.lr_grid`` (x ``optim.lr``) in a short run of ``lr_grid_steps`` updates, every
    one from ``model``'s weights and the same random state, and score it on ``valid_batches()``.

    ``job_for(trial config, run folder, fitted)`` builds the run as the stage would (:func:`finetune_job`).
    The output layer is fitted once (``head_init: probe``) and every short run starts from that fit, which
    is returned for the full run (None without a fit). ``model`` and the torch random state are left as they
    were, so the full run that follows at the chosen LR, handed the fit, is the run it would have been at
    that LR without the search. A search is a small-scale version of tuning the
    LR per arm as a user would ([P1] §4.3 and [DV] §4 pick fine-tuning LRs per task on valid); its short
    runs keep the full run's schedule shape so that their ranking carries over."""
    steps = cfg.lr_grid_steps or cfg.steps
    lrs = tuple(cfg.optim.lr * m for m in cfg.lr_grid)
    start = copy.deepcopy(model.state_dict())
    fitted: list[Fitted] = []
    accuracy = []
    with torch.random.fork_rng(), tempfile.TemporaryDirectory(prefix="d2v-lr-search-") as tmp:
        rng = Fitted.capture(model)  # the weights as given, and the random state the full run starts with
        for i, lr in enumerate(lrs):
            trial = replace(
                cfg, steps=steps, optim=replace(cfg.optim, lr=lr), checkpoint_every=steps, keep_checkpoints=1,
                log_every=min(cfg.log_every, steps), lr_grid=(),
            )  # fmt: skip
            rng.restore(model)
            job = job_for(trial, Path(tmp) / f"lr{i}", fitted[0] if fitted else None)
            if trial.head_init == "probe" and not fitted:  # the first run fits; the others start from its fit
                fit = job.on_start

                def on_start(step: int, fit: Callable[[int], None] = fit) -> None:
                    fit(step)
                    fitted.append(Fitted.capture(model))

                job.on_start = on_start
            print(f"finetune: LR search {i + 1}/{len(lrs)}: lr {lr:.3g}, {steps} updates", flush=True)
            runner.fit(job, seed=seed, info=info)
            accuracy.append(valid_accuracy(model, valid_batches(), cfg.precision))
            print(f"finetune: LR search: lr {lr:.3g} valid accuracy {accuracy[-1]:.4f}", flush=True)
    model.load_state_dict(start)
    return LrSearch(lrs, tuple(accuracy), cfg.optim.lr, steps), (fitted[0] if fitted else None)


LR_SEARCH_FILE = "lr_search.json"
"""The search's record in the run folder, with the fingerprint it was made under: a resumed run reads it
back instead of searching again."""
LR_SEARCH_DIR = "lr_search"
"""Beside the run folders (``checkpoints/finetune/<m>/lr_search/b<budget>-<init>.json``): the search of an
arm and budget, which the runs of the other seeds read instead of searching again."""


# ---------------------------------------------------------------------------------------------- CLI


def task_info(
    manifest: dict[str, Any], task: str, shard_dir: Location
) -> tuple[str, int | None, dict[str, Any]]:
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
    m = args.modality
    mod = get(m)
    cfg = section(params, "finetune", FinetuneConfig, m)
    head, mask = modality_options(cfg, m)
    seed = int(params.get("seed", 0)) if args.seed is None else int(args.seed)
    init = getattr(args, "init", None) or PRETRAINED
    if init == SCRATCH:
        cfg = replace(cfg, optim=replace(cfg.optim, lr=cfg.optim.lr * cfg.scratch_lr_scale))
    run = Run(init, parse_budget(args.budget, section(params, "sweep", SweepConfig).budgets_of(init)[0]), seed)
    paths = section(params, "paths", PathsConfig)
    shard_dir = shard_location(paths.shards, m)
    pretrain_dir = arm_dir(paths.checkpoints, m, run.init)
    source = None
    run_dir = Path(paths.checkpoints) / "finetune" / m / run.name
    metrics_file = Path(paths.metrics) / "finetune" / m / f"{run.name}.json"
    if run.init == JOINT and checkpoint.is_off(pretrain_dir):  # joint.modalities: [] (the stage still has outputs)
        note = f"finetune {m} {run.name}: the joint arm is off (joint.modalities: [])\n"
        checkpoint.write_off(run_dir, note, metrics_file)
        return 0
    if run.init == JOINT:  # the architecture is the joint run's: its shared stack around m's own parts
        source, member = joint_member(pretrain_dir, m)
        model_cfg = mod.model_config(member, f"{source}/{checkpoint.META}")
    else:
        model_cfg = initialize.stage_model_config(params, m, pretrain_dir)

    manifest = read_manifest(shard_dir)
    split, num_classes, task_entry = task_info(manifest, cfg.task, shard_dir)
    if run.init in (PRETRAINED, PUBLISHED):
        if checkpoint.latest(pretrain_dir) is None:
            raise ValueError(
                f"{pretrain_dir}: no pretrained {m} checkpoint; run `d2v pretrain {m}` first, or fine-tune "
                f"from random init with --init scratch"
            )
        source = checkpoint.resolve(pretrain_dir)
        checkpoint.check_compatible(source, m, model_cfg, "pretrain")

    def build(s: int) -> FinetuneModel:
        """The model at seed ``s``: a scratch encoder's init and the head's."""
        if run.init in (JOINT, PRETRAINED, PUBLISHED):
            encoder = arm_encoder(run.init, source, s, m)
        else:
            torch.manual_seed(s)
            encoder = mod.build_encoder(model_cfg)
        torch.manual_seed(s)  # head init
        return build_finetune_model(m, encoder, cfg.task, num_classes, head)

    model = build(seed)
    info = distributed.init(timeout_s=cfg.dist_timeout_s)
    per_rank = runner.per_rank_batch(cfg.batch_size, cfg.grad_accum, info, f"finetune.{m}")

    def loaders(s: int) -> tuple[Callable[[int], Any], Callable[[], Any]]:
        """``(make_loader(epoch), head_items())`` of the run at seed ``s`` (its label draw and order)."""
        spec = LoaderSpec(
            batch_size=per_rank, mode="finetune", seed=s, num_workers=cfg.num_workers,
            shuffle_buffer=cfg.shuffle_buffer, max_len=cfg.max_len, label_budget=run.budget, rank=info.rank,
            world_size=info.world_size, finetune_mask=mask,
        )  # fmt: skip

        def make_loader(epoch: int):
            return build_loader(shard_dir, split, model_cfg, replace(spec, epoch=epoch))

        def head_items():  # the budget's items, no augmentation or masks, every rank the same order
            items = LoaderSpec(batch_size=per_rank, mode="eval", seed=s, label_budget=run.budget)
            return build_loader(shard_dir, split, model_cfg, items)

        return make_loader, head_items

    make_loader, head_items = loaders(seed)
    if cfg.head_init == "probe" and info.world_size > 1 and cfg.parallel == "fsdp":
        raise ConfigError(
            f"finetune.{m}.head_init: probe runs the whole model on each rank; use parallel: ddp"
        )
    make_loader(0)  # budget larger than a class, empty split, ...: fail before training
    source_meta = checkpoint.read_meta(source) if source else {}
    fingerprint = {
        "model_config": to_dict(model.encoder.config), "config": runner.resume_relevant(cfg), "seed": seed,
        "budget": run.budget, "init": run.init, "data": manifest_sha256(shard_dir),
        # the published arm depends on the folder only, not on how far its continued pretraining got
        "pretrained": (source_meta.get("init") or {}).get("sha256") if run.init == PUBLISHED
        else source_meta.get("fingerprint"),
        "pretrained_step": None if run.init == PUBLISHED else source_meta.get("step"),
    }  # fmt: skip
    meta = {
        "modality": m, "kind": "finetune", "model_config": to_dict(model.encoder.config),
        "encoder_prefix": "encoder.", "task": cfg.task, "num_classes": num_classes, "head": to_dict(head),
        "budget": run.budget, "seed": seed, "init": run.init,
        "pretrained_from": str(source) if source else None, "config": to_dict(cfg),
        "preprocessing": manifest.get("preprocessing"), "task_info": task_entry,
    }  # fmt: skip
    search, fitted = None, None
    if cfg.lr_grid:
        valid = split_named(task_entry, "valid", f"finetune.{m}.lr_grid", shard_dir)
        per_class = within_smallest_class(manifest, valid, cfg.lr_grid_valid_budget)
        # one search per arm and budget, at the params seed, shared by the runs of every seed
        search_seed = int(params.get("seed", 0))
        key = {**fingerprint, "seed": search_seed}
        shared = run_dir.parent / LR_SEARCH_DIR / f"b{run.budget}-{run.init}.json"
        search = recorded_search(run_dir / LR_SEARCH_FILE, key) or recorded_search(shared, key)
        if search is None:
            with torch.random.fork_rng():  # building another seed's model leaves this run's random state
                s_model = model if search_seed == seed else build(search_seed)
                s_loader, s_head_items = (make_loader, head_items) if s_model is model else loaders(search_seed)
                scored = LoaderSpec(batch_size=per_rank, mode="eval", seed=search_seed, label_budget=per_class)

                def job_for(trial: FinetuneConfig, trial_dir: Path, fit: Fitted | None) -> runner.Job:
                    return finetune_job(s_model, trial, s_loader, trial_dir, meta, head_items=s_head_items,
                                        fitted=fit)  # fmt: skip

                valid_batches = lambda: build_loader(shard_dir, valid, model_cfg, scored)  # noqa: E731
                search, s_fitted = search_lr(s_model, cfg, job_for, valid_batches, seed=search_seed, info=info)
                fitted = s_fitted if s_model is model else None  # another seed's fit is not this run's
                del s_model
        search = distributed.broadcast_object(search)  # rank 0's choice: short runs on GPUs are not bit-exact
        record_search(shared, key, search, info)
        record_search(run_dir / LR_SEARCH_FILE, key, search, info)
        print(f"finetune {m} {run.name}: lr {search.lr:.3g}, chosen on {valid} ({search.to_dict()})", flush=True)
        cfg = replace(cfg, optim=replace(cfg.optim, lr=search.lr))
        fingerprint["lr"] = meta["lr"] = search.lr
        meta["lr_search"], meta["config"] = search.to_dict(), to_dict(cfg)
    job = finetune_job(model, cfg, make_loader, run_dir, meta, files=preprocessing_files(manifest, shard_dir),
                       head_items=head_items, fitted=fitted)  # fmt: skip
    outputs = runner.Outputs(
        metrics_file,
        Path(paths.plots) / "finetune" / m / f"{run.name}.csv",
        batch_size=cfg.batch_size,
        info=search.metrics() if search else {"lr": cfg.optim.lr},
    )  # fmt: skip
    runner.run_stage(
        job, params=params, modality=m, fingerprint=fingerprint, outputs=outputs, seed=seed, info=info,
        run_config={"model": to_dict(model_cfg), "finetune": to_dict(cfg), "budget": run.budget,
                    "init": run.init, **({"lr_search": search.to_dict()} if search else {})},
        name=run.name,
    )  # fmt: skip
    return 0


def split_named(task_entry: dict[str, Any], kind: str, where: str, shard_dir: Location) -> str:
    """The task's ``<prefix><kind>`` split, or ValueError naming ``where`` when the shards have none."""
    split = next((s for s in task_entry["splits"] if s.endswith(kind)), None)
    if split is None:
        raise ValueError(
            f"{where}: the shards in {shard_dir} have no {kind} split for this task (splits "
            f"{task_entry['splits']}); reshard with one, or set {where}: []"
        )
    return split


def _search_key(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({**fingerprint, "code": runner.code_fingerprint()}))


def recorded_search(file: Path, fingerprint: dict[str, Any]) -> LrSearch | None:
    """The search ``file`` records for this fingerprint (a resumed run, or another seed's run of the same arm
    and budget), else None."""
    found = None
    if file.is_file():
        try:
            rec = json.loads(file.read_text())
            if rec.get("fingerprint") == _search_key(fingerprint):
                s = rec["search"]
                found = LrSearch(tuple(s["lrs"]), tuple(s["valid_accuracy"]), s["recipe_lr"], s["steps"])
        except (ValueError, KeyError, TypeError):
            found = None  # unreadable: search again
    return distributed.broadcast_object(found)  # rank 0's answer: the ranks search together or not at all


def record_search(file: Path, fingerprint: dict[str, Any], search: LrSearch, info: distributed.DistInfo) -> None:
    """Write the search to ``file`` (rank 0; written whole or not at all)."""
    if not info.is_main:
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.parent / f".{file.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"fingerprint": _search_key(fingerprint), "search": search.to_dict()}, indent=2) + "\n")
    os.replace(tmp, file)
