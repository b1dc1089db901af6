"""The ``evaluate`` stage: fine-tuned checkpoints on the test split, plus a linear probe of frozen features.

Shape legend: N / M examples, C classes, D feature width, B batch, T frames, V CTC vocabulary.

One stage per modality (``evaluate@<m>``) reads every fine-tuning run the sweep lists
(``<paths.checkpoints>/finetune/<m>/b<budget>-s<seed>-<init>``, see ``d2v.finetune.run_name``), scores each on
its task's test split (classification: accuracy, macro-F1; speech CTC: WER, CER of greedy decoding), probes
the pretrained encoder against a fresh one (logistic regression on frozen mean-pooled features, train ->
test), and writes ``<paths.metrics>/<m>.json``: flat keys ``evaluate/<init>/b<budget>/s<seed>/<metric>``,
``ctc/<init>/b<budget>/s<seed>/<metric>``, ``probe/<init>/<metric>``; plus the ``actual,predicted`` rows of
the headline classification run (pretrained, most labels, lowest seed) in
``<paths.plots>/evaluate/<m>_confusion.csv`` for DVC's confusion template.

Pure metric functions first (each unit-tested against hand computations), then the stage.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from d2v import checkpoint
from d2v.config import ConfigError, PathsConfig, section, to_dict
from d2v.heads import FinetuneModel, ctc_greedy_decode
from d2v.modalities.base import Encoder

Init = Literal["pretrained", "scratch"]
INITS: tuple[Init, ...] = ("pretrained", "scratch")

__all__ = [
    "EvaluateConfig",
    "accuracy",
    "cer",
    "confusion_matrix",
    "ctc_greedy_decode",
    "edit_distance",
    "evaluate",
    "linear_probe",
    "macro_f1",
    "wer",
]

# ------------------------------------------------------------------------------------- classification


def accuracy(pred_N: Tensor, target_N: Tensor) -> float:
    """Fraction of ``pred_N == target_N`` (int class ids [N] each)."""
    if pred_N.shape != target_N.shape or pred_N.numel() == 0:
        raise ValueError(
            f"accuracy needs two non-empty [N] tensors, got {tuple(pred_N.shape)}, {tuple(target_N.shape)}"
        )
    return (pred_N == target_N).float().mean().item()


def confusion_matrix(pred_N: Tensor, target_N: Tensor, num_classes: int) -> Tensor:
    """Counts [C, C] (int64): row = actual class, column = predicted class."""
    if pred_N.shape != target_N.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred_N.shape)} vs {tuple(target_N.shape)}")
    for name, t in (("pred", pred_N), ("target", target_N)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} has class ids outside [0, {num_classes})")
    flat = target_N.long().cpu() * num_classes + pred_N.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def macro_f1(pred_N: Tensor, target_N: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN).

    Over the classes that occur in the targets or the predictions (scikit-learn's ``f1_score(average=
    "macro")`` with its default labels): a class absent from both says nothing about the model.
    """
    cm = confusion_matrix(pred_N, target_N, num_classes).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    if not bool(present.any()):
        raise ValueError("macro_f1 of an empty set")
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    return f1[present].mean().item()


# ------------------------------------------------------------------------------------------ sequences


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions; unit costs) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def _error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence], unit: str) -> float:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError(f"the references contain no {unit}s: the error rate is undefined")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over a corpus: total word edits / total reference words (whitespace-split)."""
    return _error_rate([r.split() for r in refs], [h.split() for h in hyps], "word")


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate: total character edits / total reference characters (single spaces count)."""
    return _error_rate([" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps], "character")


# ------------------------------------------------------------------------------------------- probing


def linear_probe(
    train_x_ND: Tensor,
    train_y_N: Tensor,
    test_x_MD: Tensor,
    num_classes: int,
    *,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> Tensor:
    """Multinomial logistic regression on frozen features; returns the test predictions [M] (int64).

    Features are standardised with the training mean/std; the weights start at zero and full-batch L-BFGS
    minimises ``CE + l2/2 * |W|^2`` (a strictly convex problem: no RNG is involved, so the result depends
    only on the data; same inputs -> same predictions on CPU).
    """
    if train_x_ND.dim() != 2 or test_x_MD.dim() != 2 or train_x_ND.shape[1] != test_x_MD.shape[1]:
        raise ValueError(
            "linear_probe needs [N, D] and [M, D] features, "
            f"got {tuple(train_x_ND.shape)}, {tuple(test_x_MD.shape)}"
        )
    if train_y_N.shape != train_x_ND.shape[:1]:
        raise ValueError(f"{train_x_ND.shape[0]} training features but {train_y_N.shape[0]} labels")
    x = train_x_ND.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_y_N.long()
    D = x.shape[1]
    W = torch.zeros(D, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        z = (test_x_MD.double() - mean) / std
        return (z @ W + b).argmax(-1)


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate.<modality>`` section."""

    batch_size: int = 32
    """Test items per forward pass (no gradients; memory is the only limit)."""
    probe_inits: tuple[Init, ...] = ("pretrained", "scratch")
    """Encoders the linear probe compares: the pretrained one and the same architecture freshly
    initialised with the params seed; () switches the probe off."""
    probe_budget: int | float | None = None
    """Training labels of the probe: per class (int) or a fraction of each class (float); None: all."""
    probe_l2: float = 1e-4
    """L2 penalty of the probe's logistic regression (on standardised features)."""
    probe_max_iter: int = 200
    """L-BFGS iterations of the probe."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.probe_max_iter < 1:
            raise ConfigError("evaluate: batch_size and probe_max_iter must be >= 1")
        if self.probe_l2 < 0:
            raise ConfigError(f"evaluate.probe_l2 must be >= 0, got {self.probe_l2}")
        if len(set(self.probe_inits)) != len(self.probe_inits):
            raise ConfigError(f"evaluate.probe_inits has duplicates: {list(self.probe_inits)}")


TASK_PREFIX = {"classification": "evaluate", "ctc": "ctc"}
"""Metric-key prefix per fine-tuning task: ``evaluate/<init>/b<budget>/s<seed>/accuracy``, ``ctc/.../wer``."""


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the sweep."""

    init: Init
    budget: int | float
    seed: int

    @property
    def name(self) -> str:
        from d2v.finetune import run_name

        return run_name(self.budget, self.seed, self.init)

    def key(self, task: str, metric: str) -> str:
        return f"{TASK_PREFIX[task]}/{self.init}/b{self.budget}/s{self.seed}/{metric}"


def planned_runs(params: dict[str, Any], modality: str, args: Any = None) -> list[Run]:
    """Every run the sweep lists (``sweep:`` budgets x seeds x inits), narrowed by ``--budget`` /
    ``--seed`` / ``--init`` when given."""
    from d2v.finetune import SweepConfig, parse_budget

    sweep = section(params, "sweep", SweepConfig)
    budgets, seeds, inits = list(sweep.budgets), list(sweep.seeds), list(sweep.inits)
    budget = getattr(args, "budget", None)
    if budget is not None:
        budgets = [parse_budget(budget, budgets[0])]
    if getattr(args, "seed", None) is not None:
        seeds = [int(args.seed)]
    if getattr(args, "init", None) is not None:  # `--init pretrained|scratch`
        inits = [args.init]
    bad = [i for i in inits if i not in INITS]
    if bad:
        raise ConfigError(f"sweep.inits / --init: {bad} not in {list(INITS)}")
    return [Run(i, b, s) for i in inits for b in budgets for s in seeds]


# --------------------------------------------------------------------------------------------- models


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def split_of(task_entry: dict[str, Any], kind: str) -> str:
    """The ``train`` / ``test`` split name of a manifest task entry (``ctc_test`` for speech CTC)."""
    return next(s for s in task_entry["splits"] if s.endswith(kind))


@torch.no_grad()
def predict_split(model: FinetuneModel, loader: Any, device: torch.device) -> tuple[list, list]:
    """(predictions, targets) over a loader: class ids, or transcripts for CTC."""
    preds: list = []
    targets: list = []
    for batch in loader:
        out = model.predict(_to(batch, device))
        if model.task == "ctc":
            preds += out
            targets += batch["transcripts"]
        else:
            preds += out.cpu().tolist()
            targets += batch["labels"].tolist()
    if not targets:
        raise ValueError("the test split yielded no samples")
    return preds, targets


def task_metrics(task: str, preds: list, targets: list, num_classes: int | None) -> dict[str, float]:
    """accuracy + macro_f1 (classification) or wer + cer (CTC)."""
    if task == "ctc":
        return {"wer": wer(targets, preds), "cer": cer(targets, preds)}
    assert num_classes is not None
    p, t = torch.tensor(preds), torch.tensor(targets)
    return {"accuracy": accuracy(p, t), "macro_f1": macro_f1(p, t, num_classes)}


@torch.no_grad()
def split_features(encoder: Encoder, loader: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean-pooled features [N, D] (fp32, CPU) and labels [N] of a labelled split."""
    encoder.to(device).eval()
    xs, ys = [], []
    for batch in loader:
        pad = batch.get("padding_mask")
        xs.append(
            encoder.embed_pooled(batch["inputs"].to(device), None if pad is None else pad.to(device))
            .float()
            .cpu()
        )
        ys.append(batch["labels"])
    if not xs:
        raise ValueError("the split yielded no samples")
    return torch.cat(xs), torch.cat(ys)


def training_labels(split_entry: dict[str, Any], budget: int | float) -> int:
    """How many labels a budget keeps of a split (``label_counts`` per class in the manifest)."""
    counts = list((split_entry.get("label_counts") or {}).values())
    if isinstance(budget, int):
        return sum(min(budget, n) for n in counts)
    return sum(max(1, round(budget * n)) for n in counts)


# ---------------------------------------------------------------------------------------------- stage


def preflight(
    modality: str,
    runs: list[Run],
    manifest: dict[str, Any],
    shard_dir: Path,
    pretrain_dir: Path,
    finetune_dir: Path,
    cfg: EvaluateConfig,
    model_cfg: Any,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], Path | None]:
    """Check everything that can be wrong before any forward pass; returns (run metas, pretrain step or
    None when there is no probe). ValueError naming the checkpoint / folder / budget at fault."""

    from d2v.data.loader import build_loader
    from d2v.modalities import get

    missing = [r.name for r in runs if checkpoint.latest(finetune_dir / r.name) is None]
    if missing:
        raise ValueError(
            f"{finetune_dir}: no fine-tuned checkpoint for run(s) {missing}; run "
            f"`d2v finetune {modality} --budget B --seed S [--init pretrained|scratch]` for each (or `dvc repro`)"
        )
    pretrain_step = None
    labelled = [t for t, e in (manifest.get("tasks") or {}).items() if e.get("target") == "label"]
    if cfg.probe_inits and labelled:
        pretrain_step = checkpoint.resolve(pretrain_dir)  # ValueError naming the folder when missing
        if model_cfg is not None:
            checkpoint.check_compatible(pretrain_step, modality, model_cfg, "pretrain")
        entry = manifest["tasks"][_probe_task(manifest)]
        pre_meta = checkpoint.read_meta(pretrain_step)
        pre_cfg = get(modality).model_config(pre_meta["model_config"], f"{pretrain_step}/meta.json")
        build_loader(  # a probe budget larger than a class fails here, not after the fine-tuned runs
            shard_dir, split_of(entry, "train"), pre_cfg, batch_size=cfg.batch_size, mode="eval",
            seed=seed, label_budget=cfg.probe_budget,
        )  # fmt: skip
    metas = {r.name: checkpoint.read_meta(finetune_dir / r.name) for r in runs}
    want = to_dict(model_cfg)["transformer"] if model_cfg is not None else None
    for name, meta in metas.items():
        where = checkpoint.resolve(finetune_dir / name)
        if meta.get("modality") != modality or meta.get("kind") != "finetune":
            raise ValueError(
                f"{where}: a {meta.get('modality')!r} {meta.get('kind')!r} checkpoint, "
                f"expected a {modality!r} fine-tuning one"
            )
        if want is not None and meta["model_config"].get("transformer") != want:
            raise ValueError(
                f"{where} was fine-tuned with another model.{modality}.transformer (size/depth/...) than "
                f"params.yaml; restore those params, or re-run `d2v finetune {modality}` for it"
            )
        if not ((manifest.get("tasks") or {}).get(meta["task"]) or meta.get("task_info")):
            raise ValueError(f"{shard_dir}/manifest.json has no {meta['task']!r} task for run {name}")
    return metas, pretrain_step


def evaluate(
    modality: str,
    runs: list[Run],
    shard_dir: Path,
    pretrain_dir: Path,
    finetune_dir: Path,
    cfg: EvaluateConfig,
    *,
    model_cfg: Any = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Every fine-tuned run on its task's test split, then the linear probe.

    Returns the flat metrics (namespaced keys, see ``TASK_PREFIX``) and the confusion rows ``(actual,
    predicted)`` (class names) of the headline classification run: pretrained, most labels, lowest seed.
    Everything that can be wrong (manifest, checkpoints missing or of another modality / kind / model size
    than ``model_cfg``, a probe budget larger than a class) is checked first (:func:`preflight`).
    """
    from d2v.data.loader import build_loader, read_manifest

    device = device or _device()
    manifest = read_manifest(shard_dir)  # FileNotFoundError naming the folder
    metas, pretrain_step = preflight(
        modality, runs, manifest, shard_dir, pretrain_dir, finetune_dir, cfg, model_cfg, seed
    )

    metrics: dict[str, float] = {}
    confusion: dict[Run, list[tuple[str, str]]] = {}
    n_labels: dict[Run, int] = {}
    for run in runs:
        meta = metas[run.name]
        task = meta["task"]
        entry = (manifest.get("tasks") or {}).get(task) or meta["task_info"]
        model = checkpoint.load_finetune_model(finetune_dir / run.name, modality)[0].to(device)
        loader = build_loader(
            shard_dir, split_of(entry, "test"), model.encoder.config, batch_size=cfg.batch_size,
            mode="eval", seed=seed, num_workers=cfg.num_workers,
        )  # fmt: skip
        preds, targets = predict_split(model, loader, device)
        for k, v in task_metrics(task, preds, targets, meta.get("num_classes")).items():
            metrics[run.key(task, k)] = v
        if task == "classification":
            names = entry["labels"]
            confusion[run] = [(names[a], names[p]) for a, p in zip(targets, preds)]
            n_labels[run] = training_labels(manifest["splits"].get(split_of(entry, "train"), {}), run.budget)

    if pretrain_step is not None:
        metrics.update(probe_metrics(modality, manifest, shard_dir, pretrain_step, cfg, seed, device))

    rows: list[tuple[str, str]] = []
    if confusion:
        headline = min(confusion, key=lambda r: (r.init != "pretrained", -n_labels[r], r.seed))
        rows = confusion[headline]
    return metrics, rows


def _probe_task(manifest: dict[str, Any]) -> str:
    """The labelled task the probe uses: 'classification', else the first task with labels."""
    tasks = manifest.get("tasks") or {}
    labelled = [t for t, e in tasks.items() if e.get("target") == "label"]
    return "classification" if "classification" in labelled else labelled[0]


def probe_metrics(
    modality: str,
    manifest: dict[str, Any],
    shard_dir: Path,
    pretrain_step: Path,
    cfg: EvaluateConfig,
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    """``probe/<init>/{accuracy,macro_f1}``: logistic regression on frozen mean-pooled features,
    train -> test, for the pretrained encoder and a fresh one of the same architecture (seed ``seed``)."""

    from d2v.data.loader import build_loader

    entry = manifest["tasks"][_probe_task(manifest)]
    out: dict[str, float] = {}
    for init in cfg.probe_inits:
        encoder = checkpoint.load_encoder(pretrain_step, pretrained=init == "pretrained", seed=seed)

        def loader(split: str, budget: int | float | None, enc: Encoder = encoder) -> Any:
            return build_loader(
                shard_dir, split, enc.config, batch_size=cfg.batch_size, mode="eval", seed=seed,
                num_workers=cfg.num_workers, label_budget=budget,
            )  # fmt: skip

        x_tr, y_tr = split_features(encoder, loader(split_of(entry, "train"), cfg.probe_budget), device)
        x_te, y_te = split_features(encoder, loader(split_of(entry, "test"), None), device)
        pred = linear_probe(
            x_tr, y_tr, x_te, len(entry["labels"]), l2=cfg.probe_l2, max_iter=cfg.probe_max_iter
        )
        out[f"probe/{init}/accuracy"] = accuracy(pred, y_te)
        out[f"probe/{init}/macro_f1"] = macro_f1(pred, y_te, len(entry["labels"]))
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
    from d2v import tracking
    from d2v.modalities import get

    m = args.modality
    cfg = section(params, "evaluate", EvaluateConfig, m)
    paths = section(params, "paths", PathsConfig)
    seed = int(params.get("seed", 0))
    runs = planned_runs(params, m, args)
    model_cfg = get(m).model_config((params.get("model") or {}).get(m), f"model.{m}")
    ckpts = Path(paths.checkpoints)
    metrics, rows = evaluate(
        m, runs, Path(paths.shards) / m, ckpts / "pretrain" / m, ckpts / "finetune" / m, cfg,
        model_cfg=model_cfg, seed=seed,
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
