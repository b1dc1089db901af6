"""``build_report``: every input of every modality read into one ``Report``, with its figures."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d2v import timing
from d2v.config import ConfigError, PathsConfig, ReportConfig, section
from d2v.report import plots
from d2v.report.fmt import budget_phrase
from d2v.report.inputs import (
    Inputs,
    Source,
    code_version,
    confusion_counts,
    curve_columns,
    dvc_lock_rows,
    hardware,
    label_names,
)
from d2v.report.stats import INIT_ORDER, Cell, MetricGroup, parse_eval_metrics
from d2v.sweep import JOINT


@dataclass(frozen=True)
class Plot:
    """One PNG: written to ``<plots>/report/<name>.png``, linked from the md, inlined in the html."""

    name: str
    caption: str
    png: bytes


@dataclass
class ModalityResult:
    name: str
    groups: list[MetricGroup] = field(default_factory=list)
    probe: dict[str, dict[str, Cell]] = field(default_factory=dict)
    unused_keys: list[str] = field(default_factory=list)
    has_eval: bool = False
    missing_runs: list[str] = field(default_factory=list)
    pretrain: dict[str, Any] | None = None
    finetune: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, list[float]] | None = None
    confusion: tuple[list[str], list[list[int]]] | None = None
    manifest: dict[str, Any] | None = None
    manifest_sha256: str | None = None
    figures: list[Plot] = field(default_factory=list)


@dataclass
class Report:
    profile: str
    modalities: list[ModalityResult]
    cfg: ReportConfig
    paths: PathsConfig
    sweep: dict[str, Any]
    params_yaml: str
    code: list[tuple[str, str]]
    machine: list[tuple[str, str]]
    lock_rows: list[tuple[str, str, str]]
    sources: list[Source]
    stage_times: dict[str, float] = field(default_factory=dict)
    """Each stage's wall seconds (``d2v.timing``: process start to end, its last run), by dvc.yaml name."""
    joint: dict[str, Any] | None = None
    """``metrics/pretrain/joint.json`` (the joint model's pretraining), when the pipeline has a joint arm."""

    @property
    def figures(self) -> list[Plot]:
        return [f for m in self.modalities for f in m.figures]


def _expected_runs(sweep: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(init, budget, seed) the ``sweep:`` section asks for; empty when it is absent or incomplete."""
    try:
        budgets = [str(b) for b in sweep["budgets"]]
        seeds = [int(s) for s in sweep["seeds"]]
        inits = [str(i) for i in sweep.get("inits", INIT_ORDER)]
        joint = [str(b) for b in sweep.get("joint_budgets") or []]
    except (KeyError, TypeError, ValueError):
        return []
    return [(i, b, s) for i in inits for b in budgets for s in seeds] + [(JOINT, b, s) for b in joint for s in seeds]


def _missing_runs(groups: list[MetricGroup], expected: list[tuple[str, str, int]]) -> list[str]:
    present = {
        (init, row.budget, seed)
        for g in groups
        if g.task == "evaluate"
        for row in g.rows
        for init, c in row.cells.items()
        for seed in c.seeds
    }
    return [f"{i}/b{b}/s{s}" for i, b, s in expected if (i, b, s) not in present]


def _budget_panels(groups: list[MetricGroup]) -> list:
    panels = []
    for g in groups:
        budgets = [budget_phrase(r.budget, g.task) for r in g.rows]
        by_init = {
            i: [
                (r.cells[i].mean, r.cells[i].std or 0.0, r.cells[i].n) if i in r.cells else None
                for r in g.rows
            ]
            for i in g.inits
        }
        if g.is_rate:  # plot in % like the table
            by_init = {
                i: [(100 * c[0], 100 * c[1], c[2]) if c else None for c in v] for i, v in by_init.items()
            }
        panels.append((g.label + (" (%)" if g.is_rate else ""), budgets, by_init))
    return panels


def collect_modality(m: str, paths: PathsConfig, inputs: Inputs, sweep: dict, dpi: int) -> ModalityResult:
    """Read every file of modality ``m`` and draw its figures."""
    r = ModalityResult(m)
    flat = inputs.json(f"{paths.metrics}/{m}.json", "evaluate metrics")
    if flat is not None:
        r.has_eval = True
        r.groups, r.probe, r.unused_keys = parse_eval_metrics(flat)
        r.missing_runs = _missing_runs(r.groups, _expected_runs(sweep))
    r.pretrain = inputs.json(f"{paths.metrics}/pretrain/{m}.json", "pretrain metrics")
    r.finetune = inputs.json_dir(f"{paths.metrics}/finetune/{m}", "fine-tuning metrics")
    rows = inputs.csv(f"{paths.plots}/pretrain/{m}.csv", "pretraining curve", ("step",))
    if rows is not None:
        r.curves = curve_columns(rows)
    rows = inputs.csv(f"{paths.plots}/evaluate/{m}_confusion.csv", "confusion rows", ("actual", "predicted"))
    if rows is not None:
        r.confusion = confusion_counts(rows)
    # joined as a string, not with d2v.data.remote.shard_location (that import loads torch): a URL's
    # "//" survives, and the same text names the file in the report
    mpath = f"{paths.shards}/{m}/manifest.json"
    r.manifest, raw = inputs.json_and_bytes(mpath, "shard manifest")
    if raw is not None:
        r.manifest_sha256 = hashlib.sha256(raw).hexdigest()

    if r.groups:
        png = plots.budget_png(f"{m}: pretrained vs from scratch", _budget_panels(r.groups), dpi)
        r.figures.append(Plot(f"budget_{m}", f"{m}: metric vs label budget (mean ± 1 std over seeds)", png))
    if r.curves is not None and len(r.curves) > 1:
        png = plots.pretrain_curves_png(f"{m}: pretraining", r.curves, dpi)
        r.figures.append(Plot(f"pretrain_{m}", f"{m}: pretraining curves", png))
    if r.confusion is not None:
        labels, counts = r.confusion
        names = label_names(r.manifest)
        if names and all(x in names for x in labels):  # indices -> class names, only when all are known
            labels = [names[x] for x in labels]
        png = plots.confusion_png(f"{m}: confusion matrix", labels, counts, dpi)
        src = f"{paths.plots}/evaluate/{m}_confusion.csv"
        r.figures.append(Plot(f"confusion_{m}", f"{m}: confusion matrix (from `{src}`)", png))
    return r


def build_report(params: dict[str, Any], root: str | Path = ".") -> Report:
    """Read every input under ``root`` (paths from ``params['paths']``) into a ``Report``, with figures."""
    root = Path(root)
    paths = section(params, "paths", PathsConfig)
    cfg = section(params, "report", ReportConfig)
    modalities = params.get("modalities") or []
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise ConfigError(
            f"modalities: expected a list of names like [audio, image, text], got {modalities!r}"
        )
    sweep = params.get("sweep") if isinstance(params.get("sweep"), dict) else {}
    inputs = Inputs(root)
    joint = None
    if sweep.get("joint_budgets") or (root / paths.metrics / "pretrain" / "joint.json").exists():
        joint = inputs.json(f"{paths.metrics}/pretrain/joint.json", "joint pretraining metrics")
    if joint == {}:  # switched off (joint.modalities: []): its runs are not missing, they were never made
        sweep = {k: v for k, v in sweep.items() if k != "joint_budgets"}
    results = [collect_modality(m, paths, inputs, sweep, cfg.dpi) for m in modalities]
    lock_rows = dvc_lock_rows(root, inputs)
    shown = {k: v for k, v in params.items() if k != "profiles"}  # the effective values, not the menu
    return Report(
        profile=str(params.get("profile", "default")),
        modalities=results,
        cfg=cfg,
        paths=paths,
        sweep=sweep,
        params_yaml=yaml.safe_dump(shown, sort_keys=True, default_flow_style=False, allow_unicode=True),
        code=code_version(root),
        machine=hardware(),
        lock_rows=lock_rows,
        sources=inputs.sources,
        stage_times=timing.read_all(root),
        joint=joint,
    )
