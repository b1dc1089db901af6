"""Evaluate-metric keys -> cells over seeds, pretrained − scratch differences, Welch CIs and verdicts."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Literal

from d2v.sweep import EVAL_KEY, INITS, PRETRAINED, PROBE_KEY, SCRATCH, probe_tasks

# ------------------------------------------------------------------------------------------- metric names


RATE_METRICS = frozenset({"accuracy", "macro_f1", "f1", "precision", "recall", "wer", "cer", "top1", "top5"})
"""Fractions in [0, 1]: shown in % and their differences in percentage points."""
LOWER_IS_BETTER = frozenset({"wer", "cer", "loss", "error", "per"})
INIT_ORDER = INITS

# fairseq's collapse check ([FS], spec §1.9): abort when target_var < 0.1 or pred_var < 0.01
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


def compare(
    budget: str, cells: dict[str, Cell], lower_is_better: bool, arm: str = PRETRAINED, base: str = SCRATCH
) -> Comparison:
    """``arm`` − ``base`` (pretrained − scratch unless told) at one budget, every cell kept."""
    p, s = cells.get(arm), cells.get(base)
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
    """Labels per class (``5``, ``50``) ascending, then fractions of the labels (``0.1``, ``1.0``)."""
    if b.isdigit():
        return (0, int(b), b)
    try:
        return (1, float(b), b)
    except ValueError:
        return (2, 0.0, b)


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


def init_key(init: str) -> tuple:
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
        inits = sorted({i for cells in by_budget.values() for i in cells}, key=init_key)
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
        metric: {i: make_cell(by_init[i]) for i in sorted(by_init, key=init_key)}
        for metric, by_init in sorted(probe.items())
    }
    return groups, probe_cells, unused


# ---------------------------------------------------------------------------------------------- the bar


@dataclass(frozen=True)
class PayOff:
    """Does pretraining pay off in one modality? Both halves of the benchmark's bar:

    - fine-tuning: at the smallest label budget, pretrained beats scratch by more than twice the larger of
      the two seed standard deviations (``margin``);
    - probe: the linear probe on pretrained features beats the one on random-init features with a 95% CI
      (Welch, over probe seeds) above zero.

    A half is None when its numbers are missing or have one seed (no spread, so no verdict).
    """

    smallest: Comparison | None
    margin: float | None
    probe: Comparison | None

    @property
    def finetune_ok(self) -> bool | None:
        c = self.smallest
        if c is None or c.diff is None or self.margin is None:
            return None
        return c.diff > self.margin

    @property
    def probe_ok(self) -> bool | None:
        if self.probe is None or self.probe.ci is None:
            return None
        return self.probe.verdict == "better"

    @property
    def passed(self) -> bool | None:
        halves = (self.finetune_ok, self.probe_ok)
        return False if False in halves else (None if None in halves else True)


def pay_off(
    group: MetricGroup | None, probe: dict[str, Cell] | None, arm: str = PRETRAINED, base: str = SCRATCH
) -> PayOff:
    """:class:`PayOff` of one modality from its primary metric's group and its probe cells of that metric:
    ``arm`` (pretrained, or the joint model) against ``base`` (scratch). For a lower-is-better metric (WER)
    the fine-tuning difference is taken as scratch − pretrained."""
    smallest = margin = None
    rows = [r for r in group.rows if arm in r.cells] if group is not None else []
    if rows:
        row = rows[0]  # rows are sorted smallest budget first: the arm's smallest budget
        c = compare(row.budget, {i: row.cells[i] for i in (arm, base) if i in row.cells},
                    group.lower_is_better, arm, base)  # fmt: skip
        if c.diff is not None:
            stds = [cell.std for cell in c.cells.values()]
            if None not in stds:
                margin = 2 * max(stds)  # type: ignore[type-var]
            sign = -1.0 if group.lower_is_better else 1.0
            ci = None if c.ci is None else tuple(sorted(sign * x for x in c.ci))
            smallest = Comparison(c.budget, c.cells, sign * c.diff, ci, c.verdict)  # type: ignore[arg-type]
    cmp_probe = None
    if probe and arm in probe and base in probe:
        cmp_probe = compare("probe", {i: probe[i] for i in (arm, base)}, False, arm, base)
    return PayOff(smallest, margin, cmp_probe)


def probe_by_task(
    probe: dict[str, dict[str, Cell]], manifest: dict[str, Any] | None
) -> dict[str | None, dict[str, dict[str, Cell]]]:
    """A modality's probe cells split by task: None for the headline task's metrics, then each other
    labelled task's (``<task>_<metric>``, the prefix removed)."""
    out: dict[str | None, dict[str, dict[str, Cell]]] = {}
    others = probe_tasks(manifest)[1:]
    for metric, by in probe.items():
        task = next((t for t in others if metric.startswith(f"{t}_")), None)
        out.setdefault(task, {})[metric[len(task) + 1 :] if task else metric] = by
    return dict(sorted(out.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")))
