"""The ``report`` stage: ``<reports>/benchmark.md`` and a self-contained ``benchmark.html`` from the metrics.

Reads only files the earlier stages wrote (every number in the report comes from one of them) plus the
provenance around them, then renders one list of blocks twice (markdown and HTML):

- ``<metrics>/<m>.json`` (evaluate): keys ``<task>/<init>/b<budget>/s<seed>/<metric>`` (task ``evaluate`` or
  ``ctc``) and ``probe/<init>[/s<seed>]/<metric>``; unknown keys are counted and otherwise ignored;
- ``<metrics>/pretrain/<m>.json``, ``<metrics>/finetune/<m>/*.json``, ``<plots>/pretrain/<m>.csv``,
  ``<plots>/evaluate/<m>_confusion.csv``, ``<shards>/<m>/manifest.json``;
- ``params`` (the effective profile), ``dvc.lock`` (output hashes), ``git`` (commit, dirty), the machine.

A file that is absent or unreadable is listed as such and its numbers are left out, never guessed.
Rendering is deterministic: no clock, sorted keys, fixed-DPI PNGs without metadata, so the same inputs give
byte-identical files (DESIGN.md "no wall-clock time in outputs DVC tracks").
Figures also go to ``<plots>/report/*.png`` for ``dvc plots``. W&B (offline by default) gets a ``report``
run with the tables, the figures and the report files as an artifact; online, optionally a W&B Report.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from d2v import report_plots
from d2v.config import ConfigError, PathsConfig, TrackingConfig, section

# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ReportConfig:
    """params.yaml ``report:``: how the benchmark report is rendered and published."""

    primary_metric: str = "accuracy"
    """Metric the "What this shows" paragraph leads with (every metric found is tabled)."""
    dpi: int = 100
    """Resolution of the PNG figures (fixed so reruns are byte-identical)."""
    wandb_report: Literal["auto", "never"] = "auto"
    """``auto``: publish a W&B Report (wandb-workspaces) when ``tracking.mode`` is online; ``never``: not."""
    publish_timeout_s: float = 60.0
    """Give up publishing the W&B Report after this long (saving retries forever without a server)."""

    def __post_init__(self) -> None:
        if not 30 <= self.dpi <= 600:
            raise ConfigError(f"report.dpi: expected an integer in [30, 600], got {self.dpi}")
        if self.publish_timeout_s <= 0:
            raise ConfigError(
                f"report.publish_timeout_s: expected a positive number, got {self.publish_timeout_s}"
            )


# ------------------------------------------------------------------------------------------- metric names

EVAL_KEY = re.compile(
    r"^(?P<task>[A-Za-z0-9_]+)/(?P<init>[A-Za-z0-9_-]+)/b(?P<budget>[^/]+)/s(?P<seed>\d+)/(?P<metric>[^/]+)$"
)
"""``evaluate/pretrained/b5/s0/accuracy``, ``ctc/scratch/b10/s1/wer``."""
PROBE_KEY = re.compile(r"^probe/(?P<init>[A-Za-z0-9_-]+)/(?:s(?P<seed>\d+)/)?(?P<metric>[^/]+)$")
"""``probe/pretrained/accuracy`` (optionally ``probe/<init>/s<seed>/<metric>``)."""

RATE_METRICS = frozenset({"accuracy", "macro_f1", "f1", "precision", "recall", "wer", "cer", "top1", "top5"})
"""Fractions in [0, 1]: shown in % and their differences in percentage points."""
LOWER_IS_BETTER = frozenset({"wer", "cer", "loss", "error", "per"})
INIT_ORDER = ("pretrained", "scratch")

# fairseq's collapse check ([FS], data2vec.md §1.9): abort when target_var < 0.1 or pred_var < 0.01
MIN_TARGET_VAR = 0.1
MIN_PRED_VAR = 0.01

# Two-sided 95% Student-t quantiles t_{0.975}(df): no scipy dependency for one table.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def t975(df: float) -> float:
    """t_{0.975}(df), df rounded *down* (and to the next tabled value above 30): errs on the wide side."""
    d = max(int(math.floor(df)), 1)
    if d <= 30:
        return _T975[d - 1]
    for lo, t in ((120, 1.980), (60, 2.000), (40, 2.021)):
        if d >= lo:
            return t
    return _T975[-1]


# --------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Cell:
    """One (metric, init, budget) over seeds: the raw values, their mean and sample std (None if n < 2)."""

    seeds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n >= 2 else None


def make_cell(by_seed: dict[int, float]) -> Cell:
    seeds = tuple(sorted(by_seed))
    return Cell(seeds, tuple(by_seed[s] for s in seeds))


def welch_ci(a: Cell, b: Cell) -> tuple[float, float] | None:
    """95% CI of ``a.mean - b.mean`` (Welch's unequal-variance t); None when either side has one seed."""
    if a.n < 2 or b.n < 2:
        return None
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    d = a.mean - b.mean
    se = math.sqrt(va + vb)
    if se == 0.0:  # every seed gave the same value on both sides
        return (d, d)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    h = t975(df) * se
    return (d - h, d + h)


Verdict = Literal["better", "worse", "not significant", "one seed", "missing"]


@dataclass(frozen=True)
class Comparison:
    """One label budget of one metric: a Cell per init, and pretrained - scratch with its 95% CI."""

    budget: str
    cells: dict[str, Cell]
    diff: float | None
    ci: tuple[float, float] | None
    verdict: Verdict


def compare(budget: str, cells: dict[str, Cell], lower_is_better: bool) -> Comparison:
    p, s = cells.get("pretrained"), cells.get("scratch")
    if p is None or s is None:
        return Comparison(budget, cells, None, None, "missing")
    diff = p.mean - s.mean
    ci = welch_ci(p, s)
    if ci is None:
        verdict: Verdict = "one seed"
    elif ci[0] > 0 or ci[1] < 0:
        verdict = "better" if (ci[0] > 0) != lower_is_better else "worse"
    else:
        verdict = "not significant"
    return Comparison(budget, cells, diff, ci, verdict)


def budget_sort_key(b: str) -> tuple:
    try:
        return (0, float(b), b)
    except ValueError:
        return (1, 0.0, b)


def budget_phrase(b: str) -> str:
    """``5`` -> "5 labels/class", ``0.1`` -> "10% of the labels" (the two forms ``--budget`` accepts)."""
    try:
        if re.fullmatch(r"\d+", b):
            return f"{int(b)} label{'s' if int(b) != 1 else ''}/class"
        f = float(b)
    except ValueError:
        return f"budget {b}"
    return "all labels" if f == 1.0 else f"{100 * f:g}% of the labels"


@dataclass(frozen=True)
class MetricGroup:
    """Every value of one ``<task>/<metric>`` of one modality, by budget."""

    task: str
    metric: str
    inits: tuple[str, ...]
    rows: tuple[Comparison, ...]

    @property
    def label(self) -> str:
        return self.metric if self.task == "evaluate" else f"{self.task}/{self.metric}"

    @property
    def is_rate(self) -> bool:
        return self.metric in RATE_METRICS

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER


def _init_key(init: str) -> tuple:
    return (INIT_ORDER.index(init) if init in INIT_ORDER else len(INIT_ORDER), init)


def parse_eval_metrics(
    flat: dict[str, Any],
) -> tuple[list[MetricGroup], dict[str, dict[str, Cell]], list[str]]:
    """Evaluate-stage keys -> (metric groups, probe {metric: {init: Cell}}, unused keys)."""
    grid: dict[tuple[str, str], dict[str, dict[str, dict[int, float]]]] = {}
    probe: dict[str, dict[str, dict[int, float]]] = {}
    unused = []
    for key in sorted(flat):
        v = flat[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            unused.append(key)
            continue
        if m := EVAL_KEY.match(key):
            by_budget = grid.setdefault((m["task"], m["metric"]), {})
            by_budget.setdefault(m["budget"], {}).setdefault(m["init"], {})[int(m["seed"])] = float(v)
        elif m := PROBE_KEY.match(key):
            seed = int(m["seed"]) if m["seed"] is not None else 0
            probe.setdefault(m["metric"], {}).setdefault(m["init"], {})[seed] = float(v)
        else:
            unused.append(key)
    groups = []
    for (task, metric), by_budget in grid.items():
        inits = sorted({i for cells in by_budget.values() for i in cells}, key=_init_key)
        rows = tuple(
            compare(
                b,
                {i: make_cell(by_budget[b][i]) for i in inits if i in by_budget[b]},
                metric in LOWER_IS_BETTER,
            )
            for b in sorted(by_budget, key=budget_sort_key)
        )
        groups.append(MetricGroup(task, metric, tuple(inits), rows))
    groups.sort(key=lambda g: (g.task != "evaluate", g.task, g.metric))
    probe_cells = {
        metric: {i: make_cell(by_init[i]) for i in sorted(by_init, key=_init_key)}
        for metric, by_init in sorted(probe.items())
    }
    return groups, probe_cells, unused


# ----------------------------------------------------------------------------------------- number format


def fmt_num(x: Any) -> str:
    """Plain deterministic formatting: integers as is, floats with 4 significant digits."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int) or (math.isfinite(x) and x == int(x) and abs(x) < 1e15):
        return str(int(x))
    return f"{x:.4g}"


def fmt_value(x: float, rate: bool) -> str:
    return f"{100 * x:.1f}" if rate else f"{x:.4g}"


def fmt_diff(x: float, rate: bool) -> str:
    return f"{100 * x:+.1f}" if rate else f"{x:+.4g}"


def fmt_cell(c: Cell | None, rate: bool) -> str:
    if c is None:
        return "missing"
    if c.std is None:
        return f"{fmt_value(c.mean, rate)} (n=1)"
    return f"{fmt_value(c.mean, rate)} ± {fmt_value(c.std, rate)} (n={c.n})"


def diff_unit(rate: bool) -> str:
    return " points" if rate else ""


def _seeds_phrase(p: Cell, s: Cell) -> str:
    return "one seed per arm" if p.n == s.n == 1 else f"{p.n} vs {s.n} seeds"


# ------------------------------------------------------------------------------------------------- inputs

SourceStatus = Literal["ok", "missing", "unreadable"]


@dataclass(frozen=True)
class Source:
    """One input file and whether it could be used (the report's list of what it read)."""

    path: str
    what: str
    status: SourceStatus
    detail: str = ""


class Inputs:
    """Reads files relative to ``root``, remembering each one's status for the "Inputs" section."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources: list[Source] = []

    def _note(self, path: str, what: str, status: SourceStatus, detail: str = "") -> None:
        self.sources.append(Source(path, what, status, detail))

    def json(self, path: str, what: str) -> dict[str, Any] | None:
        p = self.root / path
        if not p.is_file():
            self._note(path, what, "missing")
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            self._note(path, what, "unreadable", f"{type(e).__name__}: {e}")
            return None
        if not isinstance(data, dict):
            self._note(path, what, "unreadable", "expected a JSON object at the top level")
            return None
        self._note(path, what, "ok")
        return data

    def csv(self, path: str, what: str, required: tuple[str, ...]) -> list[dict[str, str]] | None:
        p = self.root / path
        if not p.is_file():
            self._note(path, what, "missing")
            return None
        try:
            with p.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                header = reader.fieldnames or []
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            self._note(path, what, "unreadable", f"{type(e).__name__}: {e}")
            return None
        lacking = [c for c in required if c not in header]
        if lacking:
            self._note(path, what, "unreadable", f"no column(s) {lacking}; header is {header}")
            return None
        if not rows:
            self._note(path, what, "unreadable", "no data rows")
            return None
        self._note(path, what, "ok", f"{len(rows)} rows")
        return rows

    def json_dir(self, path: str, what: str) -> dict[str, dict[str, Any]]:
        """Every ``*.json`` directly in ``path`` (by file stem): one line for the folder, one per bad file."""
        d = self.root / path
        if not d.is_dir():
            self._note(path + "/", what, "missing")
            return {}
        out, before = {}, len(self.sources)
        for p in sorted(d.glob("*.json")):
            data = self.json(f"{path}/{p.name}", what)
            if data is not None:
                out[p.stem] = data
        bad = [s for s in self.sources[before:] if s.status != "ok"]
        self.sources[before:] = bad
        self._note(path + "/", what, "ok" if out else "missing", f"{len(out)} readable *.json")
        return out


def _float(s: str | None) -> float:
    try:
        return float(s) if s not in (None, "") else math.nan
    except ValueError:
        return math.nan


def curve_columns(rows: list[dict[str, str]]) -> dict[str, list[float]]:
    """Pretraining CSV rows -> {column: values}, stably sorted by step (a resumed run's rows keep order)."""
    rows = sorted(rows, key=lambda r: _float(r.get("step")))
    cols = [c for c in report_plots.PRETRAIN_COLUMNS if c in rows[0]]
    return {c: [_float(r.get(c)) for r in rows] for c in cols}


def _natural(label: str) -> tuple:
    return (0, int(label), label) if re.fullmatch(r"-?\d+", label) else (1, 0, label)


def confusion_counts(rows: list[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
    """(labels, counts[actual][predicted]) from one ``actual,predicted`` row per evaluated item."""
    pairs = Counter((r["actual"], r["predicted"]) for r in rows)
    labels = sorted({a for a, _ in pairs} | {p for _, p in pairs}, key=_natural)
    return labels, [[pairs.get((a, p), 0) for p in labels] for a in labels]


def label_names(manifest: dict[str, Any] | None) -> dict[str, str]:
    """Class index (as the confusion CSV writes it) -> name, from the manifest's label map if it has one.

    Accepts ``{name: index}``, ``{"index": name}`` or ``[name, ...]`` under ``label_map``, ``labels``
    or ``classes``.
    """
    for key in ("label_map", "labels", "classes"):
        v = (manifest or {}).get(key)
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict) and v:
            if all(isinstance(i, int) and not isinstance(i, bool) for i in v.values()):
                return {str(i): str(name) for name, i in v.items()}
            if all(re.fullmatch(r"\d+", str(k)) for k in v):
                return {str(k): str(name) for k, name in v.items()}
    return {}


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _short_mapping(d: dict, limit: int = 12) -> str:
    items = [f"{k}: {fmt_num(v)}" for k, v in d.items()]
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def manifest_rows(manifest: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A readable (field, value) summary of a shard manifest whatever its exact layout.

    Scalars are shown as is; mappings of scalars inline (label maps truncated); nested mappings one level
    deeper; lists by their length, with skipped inputs grouped by reason and shards noted with their sha256.
    """
    out: list[tuple[str, str]] = []
    for k, v in manifest.items():
        name = f"{prefix}{k}"
        if _is_scalar(v):
            out.append((name, fmt_num(v)))
        elif isinstance(v, dict) and all(_is_scalar(x) for x in v.values()):
            out.append((name, f"{len(v)} entries: {_short_mapping(v)}" if len(v) > 12 else _short_mapping(v)))
        elif isinstance(v, dict) and not prefix:
            out.extend(manifest_rows(v, prefix=f"{name}."))
        elif isinstance(v, dict):
            out.append((name, f"{len(v)} entries"))
        elif isinstance(v, list):
            out.append((name, _list_summary(k, v)))
        else:
            out.append((name, type(v).__name__))
    return out


def _list_summary(key: str, items: list) -> str:
    if not items:
        return "none"
    if "skip" in key.lower():
        reasons = Counter(
            str(x.get("reason", "no reason given")) if isinstance(x, dict) else str(x) for x in items
        )
        return f"{len(items)}: " + "; ".join(f"{r} ({n})" for r, n in sorted(reasons.items()))
    if all(isinstance(x, dict) for x in items):
        hashed = sum(1 for x in items if "sha256" in x)
        return f"{len(items)} entries" + (f" ({hashed} with sha256)" if hashed else "")
    if all(_is_scalar(x) for x in items) and len(items) <= 12:
        return ", ".join(fmt_num(x) for x in items)
    return f"{len(items)} items"


# ---------------------------------------------------------------------------------------------- provenance


def _run(cmd: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def code_version(root: Path) -> list[tuple[str, str]]:
    """Git commit and whether tracked files differ from it (untracked files do not count)."""
    head = _run(["git", "rev-parse", "HEAD"], root)
    if head is None:
        return [("git commit", "unknown (not a git checkout, or no commit yet)")]
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root) or ""
    changed = sorted(line[3:] for line in status.splitlines() if line.strip())
    dirty = (
        "no"
        if not changed
        else f"yes: {len(changed)} changed tracked file(s): "
        + ", ".join(f"`{p}`" for p in changed[:10])
        + (", …" if len(changed) > 10 else "")
    )
    return [("git commit", f"`{head.strip()}`"), ("dirty", dirty)]


def dvc_lock_rows(root: Path, inputs: Inputs) -> list[tuple[str, str, str]]:
    """(stage, output path, md5) of every output in ``dvc.lock`` (the report's own stage left out)."""
    p = root / "dvc.lock"
    if not p.is_file():
        inputs._note("dvc.lock", "DVC lock file", "missing")
        return []
    try:
        lock = yaml.safe_load(p.read_text()) or {}
        stages = lock.get("stages") or {}
        assert isinstance(stages, dict)
    except (yaml.YAMLError, AssertionError, AttributeError) as e:
        inputs._note("dvc.lock", "DVC lock file", "unreadable", type(e).__name__)
        return []
    inputs._note("dvc.lock", "DVC lock file", "ok")
    rows = []
    for stage, entry in stages.items():
        if stage == "report" or not isinstance(entry, dict):
            continue
        for out in entry.get("outs") or []:
            if isinstance(out, dict) and "path" in out:
                rows.append((stage, str(out["path"]), str(out.get("md5") or out.get("etag") or "—")))
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware() -> list[tuple[str, str]]:
    """The machine rendering the report (the DVC stages of one ``repro`` run on the same one)."""
    rows = [
        ("CPU", _cpu_model()),
        ("CPU cores", str(os.cpu_count())),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("Python", platform.python_version()),
    ]
    try:
        import torch
    except ImportError:
        return [*rows, ("torch", "not installed")]
    rows.append(("torch", torch.__version__))
    if torch.cuda.is_available():
        names = sorted(
            Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())).items()
        )
        rows.append(("CUDA devices", ", ".join(f"{n} × {name}" for name, n in names)))
        rows.append(("CUDA", str(torch.version.cuda)))
    else:
        rows.append(("CUDA devices", "none"))
    return rows


# -------------------------------------------------------------------------------------------------- model


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

    @property
    def figures(self) -> list[Plot]:
        return [f for m in self.modalities for f in m.figures]


def _expected_runs(sweep: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(init, budget, seed) the ``sweep:`` section asks for; empty when it is absent or incomplete."""
    try:
        budgets = [str(b) for b in sweep["budgets"]]
        seeds = [int(s) for s in sweep["seeds"]]
        inits = [str(i) for i in sweep.get("inits", INIT_ORDER)]
    except (KeyError, TypeError, ValueError):
        return []
    return [(i, b, s) for i in inits for b in budgets for s in seeds]


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
        budgets = [r.budget for r in g.rows]
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
    mpath = f"{paths.shards}/{m}/manifest.json"
    r.manifest = inputs.json(mpath, "shard manifest")
    if r.manifest is not None:
        r.manifest_sha256 = hashlib.sha256((inputs.root / mpath).read_bytes()).hexdigest()

    if r.groups:
        png = report_plots.budget_png(f"{m}: pretrained vs from scratch", _budget_panels(r.groups), dpi)
        r.figures.append(Plot(f"budget_{m}", f"{m}: metric vs label budget (mean ± 1 std over seeds)", png))
    if r.curves is not None and len(r.curves) > 1:
        png = report_plots.pretrain_curves_png(f"{m}: pretraining", r.curves, dpi)
        r.figures.append(Plot(f"pretrain_{m}", f"{m}: pretraining curves", png))
    if r.confusion is not None:
        labels, counts = r.confusion
        names = label_names(r.manifest)
        if names and all(x in names for x in labels):  # indices -> class names, only when all are known
            labels = [names[x] for x in labels]
        png = report_plots.confusion_png(f"{m}: confusion matrix", labels, counts, dpi)
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
    )


# --------------------------------------------------------------------------------------------- narrative


def _diff_text(c: Comparison, g: MetricGroup) -> str:
    unit = diff_unit(g.is_rate)
    p, s = c.cells["pretrained"], c.cells["scratch"]
    seeds = _seeds_phrase(p, s)
    if c.verdict == "one seed":
        return (
            f"at {budget_phrase(c.budget)} pretrained − scratch is {fmt_diff(c.diff, g.is_rate)}{unit} "
            f"from {seeds}: too few seeds to tell signal from noise"
        )
    lo, hi = (fmt_diff(x, g.is_rate) for x in c.ci)
    ci = f"95% CI {lo} to {hi}; {seeds}"
    if c.verdict == "not significant":
        return (
            f"at {budget_phrase(c.budget)} the difference ({fmt_diff(c.diff, g.is_rate)}{unit}) is not "
            f"significant ({ci})"
        )
    mag = fmt_value(abs(c.diff), g.is_rate) + unit
    if c.verdict == "better":
        what = f"lower {g.label} by {mag}" if g.lower_is_better else f"by +{mag}"
        return f"pretrained beats scratch at {budget_phrase(c.budget)} {what} ({ci})"
    what = f"higher {g.label} by {mag}" if g.lower_is_better else f"by −{mag}"
    return f"pretrained is worse than scratch at {budget_phrase(c.budget)} {what} ({ci})"


def group_sentence(m: str, g: MetricGroup) -> str:
    parts = []
    for c in g.rows:
        if c.verdict == "missing":
            have = ", ".join(sorted(c.cells, key=_init_key)) or "no"
            parts.append(f"at {budget_phrase(c.budget)} only {have} runs exist, nothing to compare")
        else:
            parts.append(_diff_text(c, g))
    return f"**{m}** ({g.label}): " + "; ".join(parts) + "."


def pretrain_sentence(m: str, pre: dict[str, Any]) -> str | None:
    def num(k: str) -> float | None:
        v = pre.get(f"pretrain/{k}")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    bits = []
    if (steps := num("steps")) is not None:
        bits.append(f"{fmt_num(steps)} steps")
    if (loss := num("loss")) is not None:
        bits.append(f"final loss {fmt_num(loss)}")
    for key, floor in (("target_var", MIN_TARGET_VAR), ("pred_var", MIN_PRED_VAR)):
        if (v := num(key)) is not None:
            flag = f", below fairseq's collapse threshold {floor:g}" if v < floor else ""
            bits.append(f"{key} {fmt_num(v)}{flag}")
    return f"**{m}** pretraining: " + ", ".join(bits) + "." if bits else None


def summary_sentences(rep: Report) -> list[str]:
    """The "What this shows" bullets, generated from the numbers only."""
    out = []
    for r in rep.modalities:
        if not r.has_eval:
            out.append(
                f"**{r.name}**: no evaluation metrics (`{rep.paths.metrics}/{r.name}.json` is missing or "
                "unreadable), so there is no pretrained-vs-scratch result."
            )
        elif not r.groups:
            out.append(
                f"**{r.name}**: the evaluation metrics contain no `<task>/<init>/b<budget>/s<seed>/` keys."
            )
        else:
            # the primary metric (else the first) of each task (classification, CTC); the other metrics
            # are in the tables
            by_task: dict[str, MetricGroup] = {}
            for g in r.groups:
                if g.task not in by_task or g.metric == rep.cfg.primary_metric:
                    by_task[g.task] = g
            out.extend(group_sentence(r.name, g) for g in by_task.values())
        for metric, by_init in r.probe.items():
            vals = ", ".join(
                f"{i} {fmt_value(c.mean, metric in RATE_METRICS)}" + (f" (n={c.n})" if c.n > 1 else "")
                for i, c in by_init.items()
            )
            out.append(
                f"**{r.name}** linear probe ({metric}{', %' if metric in RATE_METRICS else ''}): {vals}."
            )
        if r.missing_runs:
            more = ", …" if len(r.missing_runs) > 6 else ""
            out.append(
                f"**{r.name}**: {len(r.missing_runs)} fine-tuning run(s) that `sweep` asks for have no "
                f"evaluate metrics ({', '.join(r.missing_runs[:6])}{more})."
            )
        if r.pretrain is not None and (s := pretrain_sentence(r.name, r.pretrain)):
            out.append(s)
    bad = [s for s in rep.sources if s.status != "ok"]
    if bad:
        out.append(
            f"{len(bad)} input(s) missing or unreadable (listed under Inputs); their numbers are left out, "
            "not estimated."
        )
    return out


# ------------------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class H:
    level: int
    text: str


@dataclass(frozen=True)
class P:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Img:
    figure: Plot


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Details:
    """Collapsed in HTML; a plain sub-section in markdown."""

    summary: str
    blocks: tuple


def _kv_table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> Table:
    return Table(header, tuple((a, b) for a, b in rows))


def results_blocks(r: ModalityResult, rep: Report) -> list:
    blocks: list = [H(3, r.name)]
    if not r.has_eval:
        return [
            *blocks,
            P(f"No evaluation metrics: `{rep.paths.metrics}/{r.name}.json` is missing or unreadable."),
        ]
    for g in r.groups:
        unit = "%" if g.is_rate else "value"
        better = "lower is better" if g.lower_is_better else "higher is better"
        blocks.append(P(f"**{g.label}** ({unit}, mean ± sample std over seeds, n = seeds; {better})"))
        header = (
            "label budget",
            *g.inits,
            "Δ pretrained − scratch" + (" (points)" if g.is_rate else ""),
            "95% CI",
            "verdict",
        )
        rows = []
        for c in g.rows:
            ci = "—" if c.ci is None else f"{fmt_diff(c.ci[0], g.is_rate)} to {fmt_diff(c.ci[1], g.is_rate)}"
            diff = "—" if c.diff is None else fmt_diff(c.diff, g.is_rate)
            rows.append(
                (c.budget, *(fmt_cell(c.cells.get(i), g.is_rate) for i in g.inits), diff, ci, c.verdict)
            )
        blocks.append(Table(header, tuple(rows)))
    if r.probe:
        inits = sorted({i for by in r.probe.values() for i in by}, key=_init_key)
        rows = tuple(
            (metric, *(fmt_cell(by.get(i), metric in RATE_METRICS) for i in inits))
            for metric, by in r.probe.items()
        )
        blocks += [
            P("**linear probe** (frozen encoder + linear classifier)"),
            Table(("metric", *inits), rows),
        ]
    if r.missing_runs:
        blocks.append(
            P("Runs in `sweep` without metrics: " + ", ".join(f"`{x}`" for x in r.missing_runs) + ".")
        )
    if r.unused_keys:
        blocks.append(
            P(f"{len(r.unused_keys)} other key(s) in the metrics file are not shown in this table.")
        )
    blocks += [Img(f) for f in r.figures if f.name.startswith("budget_")]
    return blocks


def pretrain_blocks(rep: Report) -> list:
    have = [r for r in rep.modalities if r.pretrain is not None]
    blocks: list = [H(2, "Pretraining")]
    if not have:
        return [*blocks, P("No pretraining metrics found.")]
    keys = sorted({k for r in have for k, v in r.pretrain.items() if _is_scalar(v)})
    rows = tuple(
        (k.removeprefix("pretrain/"), *(fmt_num(r.pretrain[k]) if k in r.pretrain else "—" for r in have))
        for k in keys
    )
    blocks += [
        P(
            "Last logged values from `metrics/pretrain/<m>.json`. `target_var`/`pred_var` are the collapse "
            f"monitors of data2vec (fairseq aborts below {MIN_TARGET_VAR:g} / {MIN_PRED_VAR:g})."
        ),
        Table(("metric", *(r.name for r in have)), rows),
    ]
    blocks += [Img(f) for r in rep.modalities for f in r.figures if f.name.startswith("pretrain_")]
    return blocks


def _seconds(d: dict[str, Any]) -> float | None:
    vals = [v for k, v in d.items() if k.rsplit("/", 1)[-1] == "seconds" and isinstance(v, (int, float))]
    return math.fsum(vals) if vals else None


def runtime_rows(rep: Report) -> list[tuple[str, ...]]:
    rows = []
    for r in rep.modalities:
        pre = r.pretrain or {}
        ft = [s for s in (_seconds(d) for d in r.finetune.values()) if s is not None]
        rows.append(
            (
                r.name,
                fmt_num(pre.get("pretrain/steps", "—")),
                fmt_num(pre.get("pretrain/seconds", "—")),
                fmt_num(pre.get("pretrain/samples_per_s", "—")),
                str(len(r.finetune)),
                fmt_num(math.fsum(ft)) if ft else "—",
            )
        )
    return rows


def data_blocks(rep: Report) -> list:
    blocks: list = [H(2, "Data")]
    for r in rep.modalities:
        src = f"{rep.paths.shards}/{r.name}/manifest.json"
        if r.manifest is None:
            blocks.append(P(f"**{r.name}**: no shard manifest (`{src}` is missing or unreadable)."))
            continue
        blocks.append(P(f"**{r.name}**: `{src}` (sha256 `{r.manifest_sha256}`)"))
        blocks.append(_kv_table(manifest_rows(r.manifest), ("field", "value")))
    return blocks


def report_blocks(rep: Report) -> list:
    """The whole document as blocks; ``render_markdown``/``render_html`` only change the syntax."""
    commit = dict(rep.code).get("git commit", "unknown")
    dirty = " (with uncommitted changes)" if dict(rep.code).get("dirty", "no").startswith("yes") else ""
    names = ", ".join(r.name for r in rep.modalities) or "none"
    sweep = ""
    if rep.sweep:
        sweep = "; sweep: " + ", ".join(
            f"{k} {', '.join(str(x) for x in v) if isinstance(v, list) else v}"
            for k, v in sorted(rep.sweep.items())
        )
    blocks: list = [
        H(1, "d2v benchmark: data2vec pretraining vs training from scratch"),
        P(f"Profile `{rep.profile}` · modalities {names} · commit {commit}{dirty}{sweep}."),
        P(
            "Each modality's encoder is pretrained with data2vec, then fine-tuned with a few labels per "
            "class "
            "(the label budget) from the pretrained weights and, as the baseline, from random init, over "
            "several seeds. Every number below is read from the files the pipeline stages wrote (see Inputs)."
        ),
        H(2, "What this shows"),
        Bullets(tuple(summary_sentences(rep))),
        H(2, "Results"),
        P(
            "Δ is pretrained − scratch; its 95% CI is Welch's t over seeds (unpaired). "
            '"one seed": no spread '
            'estimate; "not significant": the CI contains 0; "missing": one arm has no runs.'
        ),
    ]
    for r in rep.modalities:
        blocks += results_blocks(r, rep)
    blocks += pretrain_blocks(rep)
    conf = [f for r in rep.modalities for f in r.figures if f.name.startswith("confusion_")]
    if conf:
        blocks += [H(2, "Confusion matrices"), *(Img(f) for f in conf)]
    blocks += data_blocks(rep)
    blocks += [
        H(2, "Run times"),
        P("From the stage metrics files (seconds of compute as each stage measured it)."),
        Table(
            (
                "modality",
                "pretrain steps",
                "pretrain s",
                "pretrain samples/s",
                "fine-tuning runs",
                "fine-tuning s",
            ),
            tuple(runtime_rows(rep)),
        ),
        H(2, "Provenance"),
        P("**Code**"),
        _kv_table(rep.code, ("", "")),
        P("**Hardware** (the machine that rendered this report)"),
        _kv_table(rep.machine, ("", "")),
        Details(
            f"DVC outputs (`dvc.lock`, {len(rep.lock_rows)} outputs)",
            (Table(("stage", "output", "md5"), tuple(rep.lock_rows)),)
            if rep.lock_rows
            else (P("No dvc.lock."),),
        ),
        Details(f"Parameters (profile `{rep.profile}`)", (Code(rep.params_yaml, "yaml"),)),
        H(2, "Inputs"),
        Table(
            ("file", "content", "status", "detail"),
            tuple((f"`{s.path}`", s.what, s.status, s.detail) for s in rep.sources),
        ),
    ]
    return blocks


# ----------------------------------------------------------------------------------------------- markdown


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(rep: Report, image_dir: str) -> str:
    """The report as GitHub markdown; figures linked as ``<image_dir>/<name>.png``."""
    lines: list[str] = []

    def emit(b: Any) -> None:
        if isinstance(b, H):
            lines.extend(["#" * b.level + " " + b.text, ""])
        elif isinstance(b, P):
            lines.extend([b.text, ""])
        elif isinstance(b, Bullets):
            lines.extend([*(f"- {x}" for x in b.items), ""])
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            lines.append("|" + "|".join("---" for _ in b.header) + "|")
            lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows)
            lines.append("")
        elif isinstance(b, Img):
            lines.extend([f"![{b.figure.caption}]({image_dir}/{b.figure.name}.png)", ""])
        elif isinstance(b, Code):
            lines.extend([f"```{b.lang}", b.text.rstrip("\n"), "```", ""])
        elif isinstance(b, Details):
            lines.extend([f"**{b.summary}**", ""])
            for x in b.blocks:
                emit(x)
        else:
            raise AssertionError(f"unknown block {b!r}")

    for b in report_blocks(rep):
        emit(b)
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
details { margin: 0.8em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _inline(text: str) -> str:
    """Escape, then the two inline markups the report uses: `code` and **bold**."""
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def render_html(rep: Report) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG data URIs, no scripts, no external links."""
    out: list[str] = []

    def emit(b: Any) -> None:
        if isinstance(b, H):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, P):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Img):
            data = base64.b64encode(b.figure.png).decode("ascii")
            cap = _inline(b.figure.caption)
            out.append(
                f'<figure><img alt="{html.escape(b.figure.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{cap}</figcaption></figure>"
            )
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text, quote=False)}</code></pre>")
        elif isinstance(b, Details):
            out.append(f"<details><summary>{_inline(b.summary)}</summary>")
            for x in b.blocks:
                emit(x)
            out.append("</details>")
        else:
            raise AssertionError(f"unknown block {b!r}")

    for b in report_blocks(rep):
        emit(b)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>d2v benchmark</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    figures: tuple[Path, ...]


def write_report(rep: Report, root: str | Path = ".") -> ReportFiles:
    """Write ``<reports>/benchmark.{md,html}`` and ``<plots>/report/<name>.png`` (stale PNGs removed)."""
    root = Path(root)
    reports = root / rep.paths.reports
    fig_dir = root / rep.paths.plots / "report"
    reports.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in rep.figures:
        p = fig_dir / f"{f.name}.png"
        p.write_bytes(f.png)
        written.append(p)
    for old in sorted(fig_dir.glob("*.png")):
        if old not in written and re.fullmatch(r"(budget|pretrain|confusion)_.+\.png", old.name):
            old.unlink()
    image_dir = Path(os.path.relpath(fig_dir, reports)).as_posix()
    md = reports / "benchmark.md"
    md.write_text(render_markdown(rep, image_dir), encoding="utf-8")
    page = reports / "benchmark.html"
    page.write_text(render_html(rep), encoding="utf-8")
    return ReportFiles(md, page, tuple(written))


# --------------------------------------------------------------------------------------------------- W&B


def results_table_rows(rep: Report) -> list[list[Any]]:
    """Raw numbers (not formatted) of every results cell: the W&B table."""
    rows = []
    for r in rep.modalities:
        for g in r.groups:
            for c in g.rows:
                for init, cell in c.cells.items():
                    rows.append(
                        [r.name, g.label, c.budget, init, cell.mean, cell.std, cell.n, c.diff, c.verdict]
                    )
    return rows


RESULT_COLUMNS = [
    "modality",
    "metric",
    "budget",
    "init",
    "mean",
    "std",
    "n",
    "diff_pretrained_minus_scratch",
    "verdict",
]


def build_wandb_report(rep: Report, entity: str, project: str) -> Any:
    """A ``wandb_workspaces`` Report with the summary and the same panels (building it needs no server)."""
    import wandb_workspaces.reports.v2 as wr

    figure_keys = [f"plots/{f.name}" for f in rep.figures]
    blocks = [
        wr.H1(text="d2v benchmark: data2vec pretraining vs training from scratch"),
        wr.P(text=f"Profile {rep.profile}. " + dict(rep.code).get("git commit", "").replace("`", "")),
        wr.H2(text="What this shows"),
        wr.MarkdownBlock(text="\n".join(f"- {s}" for s in summary_sentences(rep))),
        wr.PanelGrid(
            runsets=[wr.Runset(entity=entity, project=project, name="pretraining", query="pretrain")],
            panels=[
                wr.LinePlot(title="pretraining loss", x="Step", y=["pretrain/loss"]),
                wr.LinePlot(
                    title="target / prediction variance",
                    x="Step",
                    y=["pretrain/target_var", "pretrain/pred_var"],
                ),
            ],
        ),
        wr.PanelGrid(
            runsets=[wr.Runset(entity=entity, project=project, name="report", query="report")],
            panels=[wr.MediaBrowser(title="report figures", media_keys=figure_keys)],
        ),
    ]
    return wr.Report(entity=entity, project=project, title="d2v benchmark", blocks=blocks)


def _save_with_timeout(report: Any, timeout_s: float) -> str:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            report.save()
            box["url"] = getattr(report, "url", "")
        except Exception as e:  # noqa: BLE001 - any server error just means "not published"
            box["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return f"W&B Report not published: no answer from the server within {timeout_s:g} s"
    if "error" in box:
        return f"W&B Report not published: {box['error']}"
    return f"W&B Report published: {box['url']}"


def log_to_wandb(params: dict[str, Any], rep: Report, files: ReportFiles) -> list[str]:
    """The ``report`` W&B run (tables, figures, md/html artifact); returns what happened, one line each."""
    tcfg = section(params, "tracking", TrackingConfig)
    if tcfg.mode == "disabled":
        return ["W&B: tracking.mode is disabled, nothing logged"]
    from d2v import tracking

    tracker = tracking.start(
        params, "report", "", config={"profile": rep.profile, "report": rep.cfg.__dict__}
    )
    run = getattr(tracker, "run", None)
    if run is None:
        return ["W&B: not available (wandb not installed), nothing logged"]
    import wandb

    notes = []
    try:
        payload: dict[str, Any] = {
            "results": wandb.Table(columns=RESULT_COLUMNS, data=results_table_rows(rep))
        }
        payload.update({f"plots/{f.stem}": wandb.Image(str(f)) for f in files.figures})
        tracker.log(payload, step=0)
        tracker.summary({f"report/{r[0]}/{r[1]}/b{r[2]}/{r[3]}/mean": r[4] for r in results_table_rows(rep)})
        tracker.artifact(files.markdown.parent, name="benchmark-report", type="report")
        notes.append(f"W&B: run `report` logged ({tcfg.mode}) in {tracker.run_dir}")
        if rep.cfg.wandb_report == "never":
            notes.append("W&B Report: report.wandb_report is never, not built")
        elif tcfg.mode != "online":
            notes.append("W&B Report: skipped, tracking.mode is offline (publishing needs a W&B server)")
        else:
            entity = tcfg.entity or getattr(run, "entity", None)
            if not entity:
                notes.append("W&B Report: skipped, no entity known (set tracking.entity)")
            else:
                wr_report = build_wandb_report(rep, entity, tcfg.project)
                notes.append(_save_with_timeout(wr_report, rep.cfg.publish_timeout_s))
    finally:
        tracker.finish()
    return notes


# ---------------------------------------------------------------------------------------------------- CLI


def cli_report(params: dict[str, Any], args: Any) -> int:
    """``d2v report``: render the benchmark report from the metrics, then mirror it to W&B."""
    rep = build_report(params, ".")
    files = write_report(rep, ".")
    print(f"report: wrote {files.markdown}, {files.html} and {len(files.figures)} figure(s)")
    try:
        notes = log_to_wandb(params, rep, files)
    except Exception as e:  # noqa: BLE001 - the report is written; W&B is a mirror and optional
        notes = [f"W&B: logging failed ({type(e).__name__}: {e}); the report files are complete"]
    for n in notes:
        print(n, file=sys.stderr if "failed" in n else sys.stdout)
    return 0
