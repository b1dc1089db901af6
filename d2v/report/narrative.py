"""The "What this shows" sentences, written from the numbers only."""

from __future__ import annotations

from typing import Any

from d2v.report.build import Report
from d2v.report.fmt import budget_phrase, diff_unit, fmt_diff, fmt_num, fmt_value
from d2v.report.stats import (
    MIN_PRED_VAR,
    MIN_TARGET_VAR,
    RATE_METRICS,
    Cell,
    Comparison,
    MetricGroup,
    PayOff,
    compare,
    init_key,
    pay_off,
    probe_by_task,
    welch_ci,
)
from d2v.sweep import JOINT, PRETRAINED, PUBLISHED, SCRATCH


def _seeds_phrase(p: Cell, s: Cell) -> str:
    return "one seed per arm" if p.n == s.n == 1 else f"{p.n} vs {s.n} seeds"


def _diff_text(c: Comparison, g: MetricGroup) -> str:
    unit = diff_unit(g.is_rate)
    p, s = c.cells[PRETRAINED], c.cells[SCRATCH]
    seeds = _seeds_phrase(p, s)
    if c.verdict == "one seed":
        return (
            f"at {budget_phrase(c.budget, g.task)} pretrained − scratch is {fmt_diff(c.diff, g.is_rate)}{unit} "
            f"from {seeds}: too few seeds to tell signal from noise"
        )
    lo, hi = (fmt_diff(x, g.is_rate) for x in c.ci)
    ci = f"95% CI {lo} to {hi}; {seeds}"
    if c.verdict == "not significant":
        return (
            f"at {budget_phrase(c.budget, g.task)} the difference ({fmt_diff(c.diff, g.is_rate)}{unit}) is not "
            f"significant ({ci})"
        )
    mag = fmt_value(abs(c.diff), g.is_rate) + unit
    if c.verdict == "better":
        what = f"lower {g.label} by {mag}" if g.lower_is_better else f"by +{mag}"
        return f"pretrained beats scratch at {budget_phrase(c.budget, g.task)} {what} ({ci})"
    what = f"higher {g.label} by {mag}" if g.lower_is_better else f"by −{mag}"
    return f"pretrained is worse than scratch at {budget_phrase(c.budget, g.task)} {what} ({ci})"


def _versus(c: Comparison, g: MetricGroup, arm: str, base: str, what: str) -> str | None:
    """``what`` (arm − base) at the budget of ``c`` with its 95% CI, when both arms ran."""
    p, q = c.cells.get(arm), c.cells.get(base)
    if p is None or q is None:
        return None
    unit = diff_unit(g.is_rate)
    ci = welch_ci(p, q)
    spread = (
        f"95% CI {fmt_diff(ci[0], g.is_rate)} to {fmt_diff(ci[1], g.is_rate)}"
        if ci
        else _seeds_phrase(p, q) + ": no spread to compare it with"
    )
    return f"{what} {fmt_diff(p.mean - q.mean, g.is_rate)}{unit} ({spread})"


def _continued_text(c: Comparison, g: MetricGroup) -> str | None:
    """What continued pretraining added to a published model (pretrained − published), when both ran."""
    return _versus(c, g, PRETRAINED, PUBLISHED, "continued pretraining − the published model")


def _joint_text(c: Comparison, g: MetricGroup) -> str | None:
    """The joint model against the separate one (joint − pretrained), when both ran at this budget."""
    return _versus(c, g, JOINT, PRETRAINED, "the joint model − the separate one")


def group_sentence(m: str, g: MetricGroup) -> str:
    parts = []
    for c in g.rows:
        if c.verdict == "missing":
            have = ", ".join(sorted(c.cells, key=init_key)) or "no"
            parts.append(f"at {budget_phrase(c.budget, g.task)} only {have} runs exist, nothing to compare")
        else:
            parts.append(_diff_text(c, g))
        for extra in (_continued_text(c, g), _joint_text(c, g)):
            if extra is not None:
                parts.append(extra)
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


def payoff_sentence(m: str, g: MetricGroup | None, po: PayOff, arm: str = PRETRAINED) -> str:
    """One modality against the bar (:class:`PayOff`): the verdict first, then each half's numbers.
    ``arm``: the pretrained encoder (``pretrained``) or the joint model's (``joint``)."""
    verdict = {True: "yes", False: "**no**", None: "undecided"}[po.passed]
    parts = []
    c = po.smallest
    if g is None or c is None or c.diff is None:
        parts.append(f"no {arm}-vs-scratch fine-tuning pair to compare")
    else:
        unit = diff_unit(g.is_rate)
        gain = f"{f'scratch − {arm}' if g.lower_is_better else f'{arm} − scratch'} " + (
            f"{fmt_diff(c.diff, g.is_rate)}{unit}"
        )
        if po.margin is None:
            parts.append(f"at {budget_phrase(c.budget, g.task)} {gain}, one seed: no spread to compare it with")
        else:
            need = f"{fmt_value(po.margin, g.is_rate)}{unit}"
            ok = "more" if po.finetune_ok else "not more"
            parts.append(
                f"at {budget_phrase(c.budget, g.task)} (the smallest budget) {g.label} {gain}: {ok} than twice the "
                f"larger seed std ({need})"
            )
    p = po.probe
    if p is None or p.diff is None:
        parts.append("no probe of both encoders")
    elif p.ci is None:
        parts.append(f"probe {fmt_diff(p.diff, True)} points from one probe seed: no interval")
    else:
        lo, hi = (fmt_diff(x, True) for x in p.ci)
        side = "above zero" if po.probe_ok else "not above zero"
        parts.append(
            f"probe {arm} − random init {fmt_diff(p.diff, True)} points (95% CI {lo} to {hi}, {side})"
        )
    question = "does pretraining pay off?" if arm == PRETRAINED else "does the joint model pay off?"
    return f"**{m}** — {question} {verdict}: " + "; ".join(parts) + "."


def task_probe_sentences(m: str, probe: dict[str, dict[str, Cell]], manifest: dict[str, Any] | None) -> list[str]:
    """Per labelled task besides the headline one (text's sentiment): pretrained against random init in
    the probe at the layer chosen on valid, and at the features ``embed`` gives by default."""
    out = []
    for task, cells in probe_by_task(probe, manifest).items():
        if task is None:
            continue
        parts = []
        for metric, what in (("accuracy", "at the layer chosen on valid"),
                             ("embed_accuracy", "at embed's default features (last layer, mean-pooled)")):  # fmt: skip
            by = cells.get(metric) or {}
            if PRETRAINED not in by or SCRATCH not in by:
                continue
            c = compare(metric, {i: by[i] for i in (PRETRAINED, SCRATCH)}, False)
            ci = "no interval (one probe seed)" if c.ci is None else (
                f"95% CI {fmt_diff(c.ci[0], True)} to {fmt_diff(c.ci[1], True)}")  # fmt: skip
            parts.append(
                f"{what}: pretrained {fmt_value(by[PRETRAINED].mean, True)}, random init "
                f"{fmt_value(by[SCRATCH].mean, True)}, {fmt_diff(c.diff, True)} points ({ci})"
            )
        if parts:
            out.append(f"**{m}** probe on the {task} task (accuracy, %) " + "; ".join(parts) + ".")
    return out


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
            headline = by_task.get("evaluate") or next(iter(by_task.values()))
            probe = r.probe.get(rep.cfg.primary_metric)
            out.append(payoff_sentence(r.name, headline, pay_off(headline, probe)))
            if JOINT in headline.inits:  # the same bar for the joint model's encoder of this modality
                out.append(payoff_sentence(r.name, headline, pay_off(headline, probe, JOINT), JOINT))
            out.extend(group_sentence(r.name, g) for g in by_task.values())
        for metric, by_init in r.probe.items():
            if metric not in RATE_METRICS:  # the chosen layer and the per-layer probe are in the table
                continue
            vals = ", ".join(
                f"{i} {fmt_value(c.mean, metric in RATE_METRICS)}" + (f" (n={c.n})" if c.n > 1 else "")
                for i, c in by_init.items()
            )
            out.append(
                f"**{r.name}** linear probe ({metric}{', %' if metric in RATE_METRICS else ''}): {vals}."
            )
        out.extend(task_probe_sentences(r.name, r.probe, r.manifest))
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
