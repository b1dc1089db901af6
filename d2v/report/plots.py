"""The report's figures as deterministic PNG bytes (matplotlib, Agg, no pyplot global state).

Every function takes plain numbers already read from the metrics/plots files and returns PNG bytes:
same numbers -> byte-identical PNG (fixed DPI and size, ``Software`` metadata dropped, no timestamps),
so a rerun of ``d2v report`` changes nothing that DVC tracks.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from d2v.sweep import PRETRAINED, SCRATCH

INIT_COLORS = {PRETRAINED: "C0", SCRATCH: "C1"}
"""One colour per initialisation in every figure (other init names fall back to the cycle)."""

_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "d2v",  # fixed ids if anyone switches the format to SVG
    "figure.autolayout": False,
}


def png_bytes(fig: Figure, dpi: int) -> bytes:
    """Render ``fig`` to PNG; no ``Software``/date metadata so the bytes depend only on the content."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _figure(ncols: int, width_per_panel: float, height: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(max(width_per_panel * ncols, 4.0), height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


PRETRAIN_COLUMNS = ("step", "loss", "target_var", "pred_var", "lr", "tau")
"""Columns of ``<plots>/pretrain/<m>.csv`` (``d2v.pretrain.CURVE_FIELDS``) the report reads."""

PRETRAIN_PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("loss", ("loss",), True),
    ("target / prediction variance", ("target_var", "pred_var"), False),
    ("learning rate", ("lr",), False),
    ("teacher EMA decay τ", ("tau",), False),
)
"""(title, CSV columns, log-y) of the pretraining panels; a panel whose columns are all absent is dropped."""


def pretrain_curves_png(title: str, columns: Mapping[str, Sequence[float]], dpi: int) -> bytes:
    """Loss, target_var/pred_var, lr and tau against ``columns["step"]`` (one panel each, those present).

    ``columns``: column name -> values, all the same length as ``columns["step"]``; NaN marks a blank cell.
    """
    steps = list(columns["step"])
    panels = [p for p in PRETRAIN_PANELS if any(c in columns for c in p[1])]
    assert panels, "caller checks that the CSV has at least one curve column"
    with matplotlib.rc_context(_RC):
        fig, axes = _figure(len(panels), 3.2, 2.8)
        for ax, (name, cols, logy) in zip(axes, panels):
            for c in cols:
                if c in columns:
                    ax.plot(steps, list(columns[c]), label=c, linewidth=1.2)
            ys = [v for c in cols if c in columns for v in columns[c] if v == v]
            if logy and ys and min(ys) > 0:
                ax.set_yscale("log")
            ax.set_title(name)
            ax.set_xlabel("step")
            if len(cols) > 1:
                ax.legend(loc="best", fontsize=8)
        fig.suptitle(title)
        return png_bytes(fig, dpi)


def budget_png(
    title: str,
    panels: Sequence[tuple[str, Sequence[str], Mapping[str, Sequence[tuple[float, float, int] | None]]]],
    dpi: int,
) -> bytes:
    """Metric against label budget, one line per init with ±1 std error bars over seeds.

    ``panels``: (y label, budget labels, {init: [(mean, std, n) or None per budget]}). Budgets are placed
    at equal spacing in the given order (they may mix labels/class and fractions); a missing cell is a gap.
    std is 0 for a single seed (n is printed in the table, the bar just vanishes).
    """
    with matplotlib.rc_context(_RC):
        fig, axes = _figure(len(panels), 3.6, 3.0)
        for ax, (ylabel, budgets, by_init) in zip(axes, panels):
            xs = list(range(len(budgets)))
            inits = list(by_init)
            for j, init in enumerate(inits):
                # small horizontal offset so error bars of the two inits do not hide each other
                off = (j - (len(inits) - 1) / 2) * 0.06
                pts = [(x + off, c[0], c[1]) for x, c in zip(xs, by_init[init]) if c is not None]
                if not pts:
                    continue
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    label=init,
                    color=INIT_COLORS.get(init),
                    marker="o",
                    markersize=4,
                    capsize=3,
                    linewidth=1.2,
                )
            ax.set_xticks(xs, list(budgets))
            ax.set_xlim(-0.5, len(budgets) - 0.5)
            ax.set_xlabel("label budget")
            ax.set_ylabel(ylabel)
            ax.legend(loc="best", fontsize=8)
        fig.suptitle(title)
        return png_bytes(fig, dpi)


def confusion_png(title: str, labels: Sequence[str], counts: Sequence[Sequence[int]], dpi: int) -> bytes:
    """Confusion heatmap; ``counts[i][j]``: items of actual class ``labels[i]`` predicted as ``labels[j]``.

    Cells are annotated with their counts while the matrix is small enough (<= 20 classes) to read them.
    """
    k = len(labels)
    side = min(2.0 + 0.35 * k, 9.0)
    with matplotlib.rc_context({**_RC, "axes.grid": False}):
        fig = Figure(figsize=(side + 1.0, side), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(counts, cmap="Blues", interpolation="nearest")
        ax.set_xticks(range(k), labels, rotation=90 if k > 6 else 0)
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        if k <= 20:
            top = max((max(r) for r in counts), default=0)
            for i in range(k):
                for j in range(k):
                    c = counts[i][j]
                    colour = "white" if top and c > top / 2 else "black"
                    ax.text(j, i, str(c), ha="center", va="center", fontsize=7, color=colour)
        fig.colorbar(im, ax=ax, shrink=0.8).locator = MaxNLocator(integer=True)
        ax.set_title(title)
        return png_bytes(fig, dpi)
