"""The ``evaluate`` stage: fine-tuned checkpoints on the test split, plus a linear probe of frozen features.

Shape legend: N / M examples, C classes, D feature width, B batch, T frames, V CTC vocabulary.

One stage per modality (``evaluate@<m>``) reads every fine-tuning run the sweep lists
(``<paths.checkpoints>/finetune/<m>/<run>``, ``d2v.sweep.Run.name``), scores each on
its task's test split (classification: accuracy, macro-F1; speech CTC: WER, CER of greedy decoding), probes
the pretrained encoder against a fresh one (logistic regression on frozen mean-pooled features, train ->
test), and writes ``<paths.metrics>/<m>.json``: flat keys ``evaluate/<init>/b<budget>/s<seed>/<metric>``,
``ctc/<init>/b<budget>/s<seed>/<metric>``, ``probe/<init>/<metric>``; plus the ``actual,predicted`` rows of
the headline classification run (pretrained, most labels, lowest seed) in
``<paths.plots>/evaluate/<m>_confusion.csv`` for DVC's confusion template.

The metric functions and the probe's regression are ``d2v.metrics``; this module is the stage.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from d2v import checkpoint, initialize, tracking
from d2v.config import ConfigError, PathsConfig, section, to_dict
from d2v.data.loader import LoaderSpec, build_loader, read_manifest, within_smallest_class
from d2v.data.remote import Location, shard_location
from d2v.heads import FinetuneModel
from d2v.load import arm_dir, arm_encoder, joint_member, load_finetune_model
from d2v.metrics import (
    accuracy,
    ctc_probe,
    frame_features,
    linear_probe,
    macro_f1,
    pooled_layer_features,
    task_metrics,
)
from d2v.modalities import get
from d2v.modalities.base import Encoder
from d2v.precision import Precision, autocast
from d2v.sweep import JOINT, PRETRAINED, SCRATCH, Init, Run, SweepConfig, planned_runs, probe_key, probe_tasks

# --------------------------------------------------------------------------------------------- config

LENGTH_BUCKETS = 8
"""Scoring reads pools of 8 batches sorted by length: less padding to compute (speech clips of 0.5 to 3 s).
An item's features and predictions do not depend on its batch (tested per modality)."""


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate.<modality>`` section."""

    batch_size: int = 32
    """Test items per forward pass (no gradients; memory is the only limit)."""
    probe_inits: tuple[Init, ...] = (PRETRAINED, SCRATCH, JOINT)
    """Encoders the linear probe (and the CTC probe) compares: the pretrained one, the same architecture
    freshly initialised with the params seed, and the modality's encoder of the joint model (skipped, with a
    line saying so, when there is no joint checkpoint of the modality); () switches the probe off."""
    probe_budget: int | float | None = None
    """Training labels of the probe: per class (int) or a fraction of each class (float); None: all."""
    probe_l2: float = 1e-4
    """L2 penalty of the probe's logistic regression (on standardised features)."""
    probe_max_iter: int = 200
    """L-BFGS iterations of the probe."""
    probe_layer: Literal["best", "last"] = "best"
    """Which features the probe reads. 'best': every block's mean-pooled output (and the final output) is
    probed and the one with the best *validation* accuracy is scored on test, for each encoder on its own:
    the practice of layer-wise probes (SUPERB, data2vec's own analyses) and fair to a random-init post-LN
    stack, whose last layer is close to its input embeddings. 'last': the final output only."""
    probe_eval_budget: int | float | None = None
    """Valid and test items the probe scores, per class (int) or a fraction (float); None: all. A fixed
    draw (the params seed), the same for every encoder: for large test sets on a CPU."""
    test_budget: int | float | None = None
    """Test items each fine-tuned classification run is scored on, per class (int) or a fraction (float);
    None: all. A fixed draw (the params seed), the same for every run of the sweep, so their differences
    stay paired. Transcription (CTC) runs are always scored on their whole test split."""
    probe_pools: tuple[Literal["mean", "first"], ...] = ("mean",)
    """How the per-layer probe pools each layer's tokens, as ``embed``'s ``pool``: 'mean' over the tokens
    (the headline probe and ``embed``'s default) and, listed too, 'first' the first token (text's ``<s>``,
    vision's CLS): ``first_layer<i>_accuracy``."""
    probe_seeds: tuple[int, ...] = (0, 1, 2)
    """One probe per seed, each on its own draw of ``probe_budget`` training labels: the report's spread
    and confidence interval. Test sets of a few hundred items alone move accuracy by about 2 points."""
    ctc_probe_budget: int | None = None
    """Speech with transcripts (the shards' ``ctc`` task): transcribed clips of its train split that the CTC
    probe (:func:`d2v.metrics.ctc_probe`) trains on, per probe seed its own draw; None: no CTC probe.
    Shards without a ``ctc`` task get none either (said on stdout).
    Scored as WER/CER on the whole test split, pretrained against random init like the linear probe."""
    ctc_probe_steps: int = 3000
    """AdamW steps (16 clips each, LR 1e-2) of the CTC probe's head on the cached features."""
    num_workers: int = 0
    """DataLoader worker processes."""
    precision: Precision = "fp32"
    """Forward passes (fine-tuned runs and the probe's features) in 'bf16' autocast where the hardware
    multiplies bf16 (``d2v.precision``), else fp32. 'fp32': the reference numerics."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.probe_max_iter < 1:
            raise ConfigError("evaluate: batch_size and probe_max_iter must be >= 1")
        if self.probe_l2 < 0:
            raise ConfigError(f"evaluate.probe_l2 must be >= 0, got {self.probe_l2}")
        if len(set(self.probe_inits)) != len(self.probe_inits):
            raise ConfigError(f"evaluate.probe_inits has duplicates: {list(self.probe_inits)}")
        if (self.ctc_probe_budget is not None and self.ctc_probe_budget < 1) or self.ctc_probe_steps < 1:
            raise ConfigError("evaluate: ctc_probe_budget (clips) and ctc_probe_steps must be >= 1")
        for key in ("probe_eval_budget", "test_budget"):
            b = getattr(self, key)
            if b is not None and not (b >= 1 if isinstance(b, int) else 0.0 < b <= 1.0):
                raise ConfigError(f"evaluate.{key}: items per class (int >= 1) or a fraction in (0, 1], got {b}")
        if "mean" not in self.probe_pools or len(set(self.probe_pools)) != len(self.probe_pools):
            raise ConfigError(f"probe_pools: distinct pools including 'mean' expected, got {list(self.probe_pools)}")
        if not self.probe_seeds or len(set(self.probe_seeds)) != len(self.probe_seeds):
            raise ConfigError(f"probe_seeds must be distinct and at least one, got {list(self.probe_seeds)}")


# --------------------------------------------------------------------------------------------- models


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def eval_spec(cfg: EvaluateConfig, seed: int, label_budget: int | float | None = None) -> LoaderSpec:
    """How the stage reads a split: in shard order, ``LENGTH_BUCKETS`` buckets, an optional label budget."""
    return LoaderSpec(
        batch_size=cfg.batch_size, mode="eval", seed=seed, num_workers=cfg.num_workers,
        label_budget=label_budget, length_buckets=LENGTH_BUCKETS,
    )  # fmt: skip


def progress(
    batches: Iterable[dict[str, Any]], desc: str, manifest: dict[str, Any] | None = None, split: str = ""
) -> Iterator[dict[str, Any]]:
    """``batches`` as they are, with a bar of the items scored on stderr (the stage runs for minutes on a
    slow CPU; nothing is printed to stdout). The total is the split's size in ``manifest`` when given."""
    total = ((manifest or {}).get("splits", {}).get(split) or {}).get("samples")
    with tqdm(total=total, desc=desc, unit="item", file=sys.stderr, mininterval=2.0, delay=1.0, leave=False) as bar:
        for batch in batches:
            yield batch
            first = next((v for v in batch.values() if isinstance(v, (Tensor, list))), [])
            bar.update(len(first))


def split_of(task_entry: dict[str, Any], kind: str) -> str:
    """The ``train`` / ``test`` split name of a manifest task entry (``ctc_test`` for speech CTC)."""
    return next(s for s in task_entry["splits"] if s.endswith(kind))


@torch.no_grad()
def predict_many(
    models: Sequence[FinetuneModel], loader: Any, device: torch.device
) -> tuple[list[list], list]:
    """Predictions of every model over one pass of ``loader`` (each batch read and decoded once: the
    sweep's runs share their test split) and the targets: class ids, or transcripts for CTC. The models
    must share a task."""
    if len({m.task for m in models}) > 1:
        raise ValueError(f"predict_many: models of different tasks {sorted({m.task for m in models})}")
    preds: list[list] = [[] for _ in models]
    targets: list = []
    for batch in loader:
        on_device = _to(batch, device)
        for out, model in zip(preds, models):
            p = model.predict(on_device)
            out += p if model.task == "ctc" else p.cpu().tolist()
        targets += batch["transcripts"] if models[0].task == "ctc" else batch["labels"].tolist()
    if not targets:
        raise ValueError("the test split yielded no samples")
    return preds, targets


def predict_split(model: FinetuneModel, loader: Any, device: torch.device) -> tuple[list, list]:
    """(predictions, targets) of one model over a loader (:func:`predict_many`)."""
    preds, targets = predict_many([model], loader, device)
    return preds[0], targets


def training_labels(split_entry: dict[str, Any], budget: int | float) -> int:
    """How many labels a budget keeps of a split (``label_counts`` per class in the manifest)."""
    counts = list((split_entry.get("label_counts") or {}).values())
    if isinstance(budget, int):
        return sum(min(budget, n) for n in counts)
    return sum(max(1, round(budget * n)) for n in counts)


# ---------------------------------------------------------------------------------------------- stage


def runs_ctc_probe(cfg: EvaluateConfig, manifest: dict[str, Any]) -> bool:
    """The CTC probe runs when asked for, with a probe to compare, on shards that have transcripts."""
    has_ctc = "ctc" in (manifest.get("tasks") or {})
    return cfg.ctc_probe_budget is not None and bool(cfg.probe_inits) and has_ctc


def preflight(
    modality: str,
    runs: list[Run],
    manifest: dict[str, Any],
    shard_dir: Location,
    pretrain_dir: Path,
    finetune_dir: Path,
    cfg: EvaluateConfig,
    model_cfg: Any,
    seed: int,
    joint_dir: Path | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[Init, Path]]:
    """Check everything that can be wrong before any forward pass; returns (run metas, the pretrain step
    each probed encoder comes from: empty when there is no probe). ValueError naming the checkpoint / folder /
    budget at fault."""

    missing = [r.name for r in runs if checkpoint.latest(finetune_dir / r.name) is None]
    if missing:
        raise ValueError(
            f"{finetune_dir}: no fine-tuned checkpoint for run(s) {missing}; run "
            f"`d2v finetune {modality} --budget B --seed S [--init pretrained|scratch|joint]` for each (or "
            "`dvc repro`)"
        )
    joint_cfg = None  # the architecture of the joint arm: the joint run's stack around the modality's parts
    joint_step = None
    if any(r.init == JOINT for r in runs):
        if joint_dir is None:
            raise ValueError(f"evaluate {modality}: the sweep has joint runs but no joint checkpoint folder")
        joint_step, member = joint_member(joint_dir, modality)
        joint_cfg = member["transformer"]
    elif JOINT in cfg.probe_inits and joint_dir is not None:
        try:
            joint_step = joint_member(joint_dir, modality)[0]
        except ValueError as e:
            print(f"evaluate {modality}: no joint arm in the probes: {e}")
    tasks = manifest.get("tasks") or {}
    ctc = runs_ctc_probe(cfg, manifest)
    if cfg.ctc_probe_budget is not None and cfg.probe_inits and not ctc:
        # the default asks for it (the demo's speech has transcripts); a user's class folders have none
        print(f"evaluate {modality}: {shard_dir} has no transcribed ('ctc') task, so no CTC probe "
              f"(evaluate.{modality}.ctc_probe_budget applies to speech with transcripts)")  # fmt: skip
    probes = []  # (train split, budget) of each probe that will run: the linear one, the CTC one
    if cfg.probe_inits:
        probes += [(split_of(tasks[t], "train"), cfg.probe_budget) for t in probe_tasks(manifest)]
    if ctc:
        probes.append((split_of(tasks["ctc"], "train"), cfg.ctc_probe_budget))
    probe_steps: dict[Init, Path] = {}
    if probes:
        step = None
        if any(i != JOINT for i in cfg.probe_inits):
            step = checkpoint.resolve(pretrain_dir)  # ValueError naming the folder when missing
            if model_cfg is not None:
                checkpoint.check_compatible(step, modality, model_cfg, "pretrain")
        probe_steps = {i: joint_step if i == JOINT else step for i in cfg.probe_inits}
        probe_steps = {i: st for i, st in probe_steps.items() if st is not None}
        if probe_steps:
            first = next(iter(probe_steps.values()))
            pre_meta = checkpoint.read_meta(first)
            pre = pre_meta["model_config"]
            pre_cfg = get(modality).model_config(pre[modality] if first == joint_step else pre, f"{first}/meta.json")
            for split, budget in probes:  # a budget larger than a class or split fails here, not after the runs
                build_loader(shard_dir, split, pre_cfg, eval_spec(cfg, seed, budget))
    metas = {r.name: checkpoint.read_meta(finetune_dir / r.name) for r in runs}
    model_want = to_dict(model_cfg)["transformer"] if model_cfg is not None else None
    for r in runs:
        name, meta = r.name, metas[r.name]
        want = joint_cfg if r.init == JOINT else model_want
        where = checkpoint.resolve(finetune_dir / name)
        if meta.get("modality") != modality or meta.get("kind") != "finetune":
            raise ValueError(
                f"{where}: a {meta.get('modality')!r} {meta.get('kind')!r} checkpoint, "
                f"expected a {modality!r} fine-tuning one"
            )
        if want is not None and meta["model_config"].get("transformer") != want:
            raise ValueError(
                f"{where} was fine-tuned with another model.{modality}.transformer (size/depth/...) than "
                f"{'the joint checkpoint' if r.init == JOINT else 'params.yaml'}; restore those params, or "
                f"re-run `d2v finetune {modality}` for it"
            )
        if not ((manifest.get("tasks") or {}).get(meta["task"]) or meta.get("task_info")):
            raise ValueError(f"{shard_dir}/manifest.json has no {meta['task']!r} task for run {name}")
    return metas, probe_steps


def evaluate(
    modality: str,
    runs: list[Run],
    shard_dir: Location,
    pretrain_dir: Path,
    finetune_dir: Path,
    cfg: EvaluateConfig,
    *,
    model_cfg: Any = None,
    seed: int = 0,
    device: torch.device | None = None,
    joint_dir: Path | None = None,
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Every fine-tuned run on its task's test split, then the linear probe. ``joint_dir``: the joint
    pretraining run the joint arm (its fine-tuned runs, its probe) comes from.

    Returns the flat metrics (namespaced keys, see ``TASK_PREFIX``) and the confusion rows ``(actual,
    predicted)`` (class names) of the headline classification run: pretrained, most labels, lowest seed.
    Everything that can be wrong (manifest, checkpoints missing or of another modality / kind / model size
    than ``model_cfg``, a probe budget larger than a class) is checked first (:func:`preflight`).
    """
    device = device or _device()
    manifest = read_manifest(shard_dir)  # FileNotFoundError naming the folder
    off = [r for r in runs if r.init == JOINT and checkpoint.is_off(finetune_dir / r.name)]
    if off:
        print(f"evaluate {modality}: the joint arm is off (joint.modalities: []); its runs "
              f"{[r.name for r in off]} are left out")  # fmt: skip
        runs = [r for r in runs if r not in off]
    metas, probe_steps = preflight(
        modality, runs, manifest, shard_dir, pretrain_dir, finetune_dir, cfg, model_cfg, seed, joint_dir
    )

    metrics: dict[str, float] = {}
    confusion: dict[Run, list[tuple[str, str]]] = {}
    n_labels: dict[Run, int] = {}
    groups: dict[tuple[str, str], list[Run]] = {}  # (task, test split) -> its runs: one pass over the split
    entries: dict[str, dict[str, Any]] = {}
    for run in runs:
        task = metas[run.name]["task"]
        entries[task] = (manifest.get("tasks") or {}).get(task) or metas[run.name]["task_info"]
        groups.setdefault((task, split_of(entries[task], "test")), []).append(run)
    for (task, test), group in groups.items():
        entry = entries[task]
        models = [load_finetune_model(finetune_dir / run.name, modality)[0].to(device) for run in group]
        budget = within_smallest_class(manifest, test, cfg.test_budget) if task == "classification" else None
        loader = build_loader(shard_dir, test, models[0].encoder.config, eval_spec(cfg, seed, budget))
        sized = manifest if budget is None else None  # a budgeted draw is smaller than the split
        loader = progress(loader, f"evaluate {modality}: {len(group)} runs on {test}", sized, test)
        with autocast(cfg.precision, device):
            all_preds, targets = predict_many(models, loader, device)
        del models
        for run, preds in zip(group, all_preds):
            for k, v in task_metrics(task, preds, targets, metas[run.name].get("num_classes")).items():
                metrics[run.key(task, k)] = v
            if task == "classification":
                names = entry["labels"]
                confusion[run] = [(names[a], names[p]) for a, p in zip(targets, preds)]
                train = manifest["splits"].get(split_of(entry, "train"), {})
                n_labels[run] = training_labels(train, run.budget)

    if probe_steps and _labelled(manifest):
        with autocast(cfg.precision, device):
            metrics.update(probe_metrics(modality, manifest, shard_dir, probe_steps, cfg, seed, device))
    if runs_ctc_probe(cfg, manifest):
        with autocast(cfg.precision, device):
            metrics.update(ctc_probe_metrics(manifest, shard_dir, probe_steps, cfg, seed, device, modality))

    rows: list[tuple[str, str]] = []
    if confusion:
        headline = min(confusion, key=lambda r: (r.init != PRETRAINED, -n_labels[r], r.seed))
        rows = confusion[headline]
    return metrics, rows


def _labelled(manifest: dict[str, Any]) -> bool:
    return any(e.get("target") == "label" for e in (manifest.get("tasks") or {}).values())


def _probe_task(manifest: dict[str, Any]) -> str:
    """The labelled task the probe's headline metrics (``probe/<init>/accuracy``) come from:
    'classification', else the first task with labels."""
    return probe_tasks(manifest)[0]


def probe_metrics(
    modality: str,
    manifest: dict[str, Any],
    shard_dir: Location,
    probe_steps: dict[Init, Path],
    cfg: EvaluateConfig,
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    """``probe/<init>/{accuracy,macro_f1}``: logistic regression on frozen mean-pooled features,
    train -> test, for each encoder of ``probe_steps`` (init -> the pretrain step it comes from): the
    pretrained one, a fresh one of the same architecture (seed ``seed``), the joint model's."""

    out: dict[str, float] = {}
    tasks = probe_tasks(manifest)
    for init, step in probe_steps.items():
        encoder = arm_encoder(init, step, seed, modality)
        for task in tasks:
            name = "" if task == tasks[0] else f"{task}_"
            for metric, value in probe(encoder, manifest, shard_dir, cfg, seed, device, task).items():
                if "/" in metric:  # the per-seed values; the report computes means, spreads and intervals
                    s, m = metric.split("/", 1)
                    out[probe_key(init, f"{s}/{name}{m}")] = value
    return out


def probe(
    encoder: Encoder,
    manifest: dict[str, Any],
    shard_dir: Location,
    cfg: EvaluateConfig,
    seed: int,
    device: torch.device,
    task: str | None = None,
) -> dict[str, float]:
    """The linear probe of ``encoder``'s frozen features on ``task`` (None: :func:`_probe_task`): logistic
    regression on pooled block outputs.

    For each of ``cfg.probe_seeds``: train on a draw of ``cfg.probe_budget`` labels per class of the train
    split, pick the layer (``cfg.probe_layer``) on the valid split, score it on the test split. Returns
    ``s<seed>/{accuracy, macro_f1, layer}`` (layer: 1..L a block, L + 1 the final output, mean-pooled), the
    test accuracy of every layer ``s<seed>/layer<i>_accuracy`` (the per-layer probe; with 'first' in
    ``cfg.probe_pools`` also ``s<seed>/first_layer<i>_accuracy``), ``s<seed>/embed_accuracy`` (the
    features ``embed`` gives by default: the final output, mean-pooled) and ``accuracy`` / ``macro_f1``:
    the means over the seeds.
    """
    entry = manifest["tasks"][task or _probe_task(manifest)]
    n = len(entry["labels"])

    def features(split: str, budget: int | float | None, draw: int) -> tuple[dict[str, Tensor], Tensor]:
        loader = build_loader(shard_dir, split, encoder.config, eval_spec(cfg, draw, budget))
        sized = manifest if budget is None else None  # a budgeted draw is smaller than the split
        batches = progress(loader, f"probe features: {split}", sized, split)
        return pooled_layer_features(encoder, batches, device, cfg.probe_pools)

    was_training = encoder.training

    def eval_budget(split: str) -> int | float | None:
        return within_smallest_class(manifest, split, cfg.probe_eval_budget)

    test = split_of(entry, "test")
    test_x, test_y = features(test, eval_budget(test), seed)
    has_valid = any(s.endswith("valid") for s in entry["splits"])
    if has_valid:
        valid = split_of(entry, "valid")
        valid_x, valid_y = features(valid, eval_budget(valid), seed)
    else:
        valid_x, valid_y = {p: x[:, :0] for p, x in test_x.items()}, test_y[:0]
    out: dict[str, float] = {}
    for s in cfg.probe_seeds:
        train_x, train_y = features(split_of(entry, "train"), cfg.probe_budget, seed + s)
        for pool in cfg.probe_pools:
            valid_acc, test_pred = [], []
            tag = "" if pool == "mean" else f"{pool}_"
            for layer in range(len(train_x[pool])):  # one fit per layer, scored on valid and test at once
                eval_x = torch.cat([valid_x[pool][layer], test_x[pool][layer]])
                pred = linear_probe(
                    train_x[pool][layer], train_y, eval_x, n, l2=cfg.probe_l2, max_iter=cfg.probe_max_iter
                )
                v, t = pred[: len(valid_y)], pred[len(valid_y) :]
                valid_acc.append(accuracy(v, valid_y) if len(valid_y) else 0.0)
                test_pred.append(t)
                out[f"s{s}/{tag}layer{layer + 1}_accuracy"] = accuracy(t, test_y)
            if pool != "mean":
                continue
            last = len(test_pred) - 1
            best = max(range(len(test_pred)), key=lambda i: (valid_acc[i], i)) if has_valid else last
            chosen = best if cfg.probe_layer == "best" else last
            out[f"s{s}/accuracy"] = accuracy(test_pred[chosen], test_y)
            out[f"s{s}/macro_f1"] = macro_f1(test_pred[chosen], test_y, n)
            out[f"s{s}/layer"] = float(chosen + 1)
            out[f"s{s}/embed_accuracy"] = out[f"s{s}/layer{last + 1}_accuracy"]  # embed's default features
    encoder.train(was_training)
    for metric in ("accuracy", "macro_f1"):
        out[metric] = sum(out[f"s{s}/{metric}"] for s in cfg.probe_seeds) / len(cfg.probe_seeds)
    return out


def ctc_probe_metrics(
    manifest: dict[str, Any],
    shard_dir: Location,
    probe_steps: dict[Init, Path],
    cfg: EvaluateConfig,
    seed: int,
    device: torch.device,
    modality: str = "audio",
) -> dict[str, float]:
    """``ctc_probe/<init>/b<clips>/s<seed>/{wer,cer}``: the CTC probe (a linear CTC head on frozen frame
    features, :func:`d2v.metrics.ctc_probe`) of the pretrained encoder and of random init, per probe seed:
    trained on its own draw of ``cfg.ctc_probe_budget`` transcribed clips, scored on the test split. The
    report reads them as one more row of pretrained against scratch, with seeds for the spread."""
    entry = manifest["tasks"]["ctc"]
    out: dict[str, float] = {}

    def features(
        encoder: Encoder, split: str, budget: int | None, draw: int
    ) -> tuple[list[Tensor], list[str]]:
        loader = build_loader(shard_dir, split, encoder.config, eval_spec(cfg, draw, budget))
        sized = manifest if budget is None else None  # a budgeted draw is smaller than the split
        return frame_features(encoder, progress(loader, f"CTC probe features: {split}", sized, split), device)

    for init, step in probe_steps.items():
        encoder = arm_encoder(init, step, seed, modality)
        test_x, test_text = features(encoder, split_of(entry, "test"), None, seed)
        for s in cfg.probe_seeds:
            train_x, train_text = features(encoder, split_of(entry, "train"), cfg.ctc_probe_budget, seed + s)
            bar = functools.partial(
                tqdm, desc=f"CTC probe: {init}, seed {s}", unit="step", file=sys.stderr, mininterval=2.0,
                delay=1.0, leave=False,
            )  # fmt: skip
            hyps = ctc_probe(
                train_x, train_text, test_x, entry["alphabet"], steps=cfg.ctc_probe_steps, seed=seed + s,
                progress=bar,
            )  # fmt: skip
            run = Run(init, cfg.ctc_probe_budget, s)
            for metric, value in task_metrics("ctc", hyps, test_text, None).items():
                out[run.key("ctc_probe", metric)] = value
    return out


def write_outputs(
    metrics: dict[str, float], rows: list[tuple[str, str]], metrics_file: Path, plot_file: Path
) -> None:
    """The flat metrics JSON (sorted keys) and the ``actual,predicted`` CSV (header only without rows)."""
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    plot_file.parent.mkdir(parents=True, exist_ok=True)
    with plot_file.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows(rows)


def cli_evaluate(params: dict[str, Any], args: Any) -> int:
    """``d2v evaluate <m> [--budget B] [--seed S] [--init pretrained|scratch]``: every run of the sweep by default."""
    m = args.modality
    cfg = section(params, "evaluate", EvaluateConfig, m)
    paths = section(params, "paths", PathsConfig)
    seed = int(params.get("seed", 0))
    runs = planned_runs(section(params, "sweep", SweepConfig), args.budget, args.seed, args.init)
    ckpts = Path(paths.checkpoints)
    model_cfg = initialize.stage_model_config(params, m, ckpts / "pretrain" / m)
    metrics, rows = evaluate(
        m, runs, shard_location(paths.shards, m), ckpts / "pretrain" / m, ckpts / "finetune" / m, cfg,
        model_cfg=model_cfg, seed=seed, joint_dir=arm_dir(ckpts, m, JOINT),
    )  # fmt: skip
    metrics_file = Path(paths.metrics) / f"{m}.json"
    write_outputs(metrics, rows, metrics_file, Path(paths.plots) / "evaluate" / f"{m}_confusion.csv")
    tracker = tracking.start(params, "evaluate", m, config={"evaluate": to_dict(cfg), "seed": seed,
                                                            "runs": [r.name for r in runs]})  # fmt: skip
    tracker.summary(metrics)
    tracker.finish()
    for k in sorted(metrics):
        print(f"{k}: {metrics[k]:.4f}")
    print(f"wrote {metrics_file}")
    return 0
