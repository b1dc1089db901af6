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
byte-identical files (docs/design.md "no wall-clock time in outputs DVC tracks").
Figures also go to ``<plots>/report/*.png`` for ``dvc plots``. W&B (offline by default) gets a ``report``
run with the tables, the figures and the report files as an artifact; online, optionally a W&B Report.

Modules, in the order the data flows: ``inputs`` (read the files) -> ``stats`` (cells, CIs, verdicts) ->
``build`` (one ``Report`` with its ``plots``) -> ``narrative`` (sentences) -> ``blocks`` (the document) ->
``render`` (md, html, files on disk) -> ``publish`` (W&B). ``ReportConfig`` is in ``d2v.config``, with the other modality-blind sections.
"""

from __future__ import annotations

import sys
from typing import Any

from d2v.config import ReportConfig
from d2v.report.build import Report, build_report
from d2v.report.fmt import budget_phrase
from d2v.report.inputs import label_names
from d2v.report.publish import build_wandb_report, log_to_wandb
from d2v.report.render import ReportFiles, render_html, render_markdown, write_report
from d2v.report.stats import Cell, compare, make_cell, parse_eval_metrics, welch_ci

__all__ = [
    "Cell",
    "Report",
    "ReportConfig",
    "ReportFiles",
    "budget_phrase",
    "build_report",
    "build_wandb_report",
    "cli_report",
    "compare",
    "label_names",
    "log_to_wandb",
    "make_cell",
    "parse_eval_metrics",
    "render_html",
    "render_markdown",
    "welch_ci",
    "write_report",
]


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
