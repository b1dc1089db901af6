"""Deterministic number and label-budget formatting shared by the sentences and the tables."""

from __future__ import annotations

import math
import re
from typing import Any

from d2v.report.stats import Cell

TRANSCRIBED_TASKS = frozenset({"ctc", "ctc_probe"})
"""Metric-key tasks whose budget counts transcribed clips (speech CTC has no classes)."""


def budget_phrase(b: str, task: str = "evaluate") -> str:
    """``5`` -> "5 labels/class", ``0.1`` -> "10% of the labels" (the two forms ``--budget`` accepts);
    for a CTC task (:data:`TRANSCRIBED_TASKS`) "330 transcribed clips", "10% of the transcribed clips"."""
    what = "transcribed clips" if task in TRANSCRIBED_TASKS else "labels"
    try:
        if re.fullmatch(r"\d+", b):
            if task in TRANSCRIBED_TASKS:
                return f"{int(b)} transcribed clip{'s' if int(b) != 1 else ''}"
            return f"{int(b)} label{'s' if int(b) != 1 else ''}/class"
        f = float(b)
    except ValueError:
        return f"budget {b}"
    return f"all {what}" if f == 1.0 else f"{100 * f:g}% of the {what}"


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
