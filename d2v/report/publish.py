"""Mirroring the report to W&B: the ``report`` run (tables, figures, artifact) and, online, a W&B Report."""

from __future__ import annotations

import threading
from typing import Any

from d2v import tracking
from d2v.config import TrackingConfig, section
from d2v.report.build import Report
from d2v.report.narrative import summary_sentences
from d2v.report.render import ReportFiles


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
    tracker = tracking.start(
        params, "report", "", config={"profile": rep.profile, "report": rep.cfg.__dict__}
    )
    run = getattr(tracker, "run", None)
    if run is None:
        return ["W&B: not available (wandb not installed), nothing logged"]
    import wandb

    notes = []
    rows = results_table_rows(rep)
    try:
        payload: dict[str, Any] = {"results": wandb.Table(columns=RESULT_COLUMNS, data=rows)}
        payload.update({f"plots/{f.stem}": wandb.Image(str(f)) for f in files.figures})
        tracker.log(payload, step=0)
        tracker.summary({f"report/{r[0]}/{r[1]}/b{r[2]}/{r[3]}/mean": r[4] for r in rows})
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
