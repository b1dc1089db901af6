"""The document as a list of blocks (headings, paragraphs, tables, figures); ``render`` only changes the syntax."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from d2v import timing
from d2v.report.build import ModalityResult, Plot, Report
from d2v.report.fmt import budget_phrase, fmt_cell, fmt_diff, fmt_num
from d2v.report.narrative import summary_sentences
from d2v.report.stats import (
    LOWER_IS_BETTER,
    MIN_PRED_VAR,
    MIN_TARGET_VAR,
    RATE_METRICS,
    budget_sort_key,
    compare,
    init_key,
    probe_by_task,
)
from d2v.sweep import JOINT, RUN_NAME


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
                (
                    budget_phrase(c.budget, g.task),
                    # the joint arm runs at sweep.joint_budgets only: elsewhere not run, not missing
                    *("—" if i == JOINT and i not in c.cells else fmt_cell(c.cells.get(i), g.is_rate)
                      for i in g.inits),  # fmt: skip
                    diff,
                    ci,
                    c.verdict,
                )
            )
        blocks.append(Table(header, tuple(rows)))
    for task, probe in probe_by_task(r.probe, r.manifest).items():
        inits = sorted({i for by in probe.values() for i in by}, key=init_key)
        rows = []
        # headline metrics first, then the chosen layer and the per-layer test accuracies (layer1, ...)
        for metric in sorted(probe, key=lambda k: ("layer" in k, len(k), k)):
            by = probe[metric]
            rate = metric in RATE_METRICS or metric.endswith(("_accuracy", "_macro_f1"))
            c = compare(metric, by, metric in LOWER_IS_BETTER)
            ci = "—" if c.ci is None else f"{fmt_diff(c.ci[0], rate)} to {fmt_diff(c.ci[1], rate)}"
            diff = "—" if c.diff is None else fmt_diff(c.diff, rate)
            verdict = "—" if metric == "layer" or metric.endswith("_layer") else c.verdict
            rows.append((metric, *(fmt_cell(by.get(i), rate) for i in inits), diff, ci, verdict))
        blocks += [
            P(
                f"**linear probe{'' if task is None else f' on the {task} task'}** (frozen encoder + logistic "
                "regression on mean-pooled block outputs; `layer` is the block chosen on the valid split, "
                "L + 1 = the final output; mean ± std over probe seeds, each its own draw of training labels; "
                "`layerK_accuracy`: every block on test, `first_layerK_accuracy` the same on the first token; "
                "`embed_accuracy`: the features `embed` gives by default, the final output mean-pooled)"
            ),
            Table(("metric", *inits, "Δ pretrained − scratch", "95% CI", "verdict"), tuple(rows)),
        ]
    blocks += lr_blocks(r)
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


def lr_blocks(r: ModalityResult) -> list:
    """The LR each arm chose on valid at each budget (``finetune.<m>.lr_grid``), per seed; nothing when no
    run searched."""
    chosen: dict[tuple[str, str], list[tuple[int, float]]] = {}
    tried: set[str] = set()
    for name, metrics in r.finetune.items():
        run = RUN_NAME.match(name)
        grid = sorted(k.rsplit("/", 1)[-1] for k in metrics if k.startswith("finetune/lr_search/"))
        if run is None or not grid or not isinstance(metrics.get("finetune/lr"), (int, float)):
            continue
        tried.add(", ".join(sorted(grid, key=float)))
        key = (run["init"], run["budget"])
        chosen.setdefault(key, []).append((int(run["seed"]), float(metrics["finetune/lr"])))
    if not chosen:
        return []
    rows = tuple(
        (init, budget_phrase(budget), ", ".join(f"s{seed}: {lr:.3g}" for seed, lr in sorted(by_seed)))
        for (init, budget), by_seed in sorted(chosen.items(), key=lambda kv: (init_key(kv[0][0]), budget_sort_key(kv[0][1])))
    )  # fmt: skip
    return [
        P(
            "**learning rates** chosen on the valid split: each arm and label budget tried each LR of its "
            f"grid ({'; '.join(sorted(tried))}) in a short run from the same start, at the params seed, and its "
            "runs trained at the one that scored best; the test scores above are at that LR, so each arm is "
            "compared at its own best (`finetune.<m>.lr_grid`)"
        ),
        Table(("arm", "label budget", "LR per fine-tuning seed"), rows),
    ]


def started_from(r: ModalityResult) -> str | None:
    """Where the ``pretrained`` arm of ``r`` came from, when not from random init (``pretrain.<m>.init``)."""
    m = r.pretrain or {}
    if not m.get("pretrain/init"):
        return None
    steps = int(m.get("pretrain/steps", 0))
    then = f"then {steps:,} steps of continued pretraining on these shards" if steps else "used as is"
    return (
        f"**{r.name}**: the `pretrained` arm starts from `{m['pretrain/init']}` "
        f"({m.get('pretrain/init_model_type')}, {m.get('pretrain/init_size')} layers x width), {then}."
    )


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
    blocks += [P(line) for line in (started_from(r) for r in have) if line]
    blocks += [Img(f) for r in rep.modalities for f in r.figures if f.name.startswith("pretrain_")]
    return blocks


def joint_blocks(rep: Report) -> list:
    """The joint model beside the separate ones: parameters (one shared Transformer against one per
    modality) and pretraining updates (the same by construction under ``mixing: interleave``)."""
    j = rep.joint
    if not j:  # no joint arm, or switched off (joint.modalities: [])
        return []
    rows, separate_stacks = [], 0
    for r in rep.modalities:
        pre = r.pretrain or {}
        if f"pretrain/encoder_params_{r.name}" not in j:
            continue
        separate_stacks += pre.get("pretrain/stack_params", 0)
        rows.append((
            r.name, fmt_num(pre.get("pretrain/encoder_params", "—")), fmt_num(pre.get("pretrain/stack_params", "—")),
            fmt_num(j[f"pretrain/encoder_params_{r.name}"]), fmt_num(pre.get("pretrain/steps", "—")),
            fmt_num(j.get(f"pretrain/updates_{r.name}", "—")),
        ))  # fmt: skip
    shared = j.get("pretrain/stack_params")
    total = (
        f"Transformer parameters in all: {fmt_num(separate_stacks)} in the separate models' stacks, "
        f"{fmt_num(shared)} in the joint model's one stack ({shared / separate_stacks:.2f} of them)."
        if shared and separate_stacks else ""
    )  # fmt: skip
    return [
        H(2, "The joint model"),
        P(
            "One Transformer stack (and one EMA teacher of it) pretrained on every modality "
            "(`pretrain-joint`, `joint:` in params.yaml); each modality keeps its own local encoder, positions, "
            "norms, decoder, masking and targets. Its encoder of each modality is the `joint` arm above, "
            "fine-tuned at `sweep.joint_budgets` and probed like the others. " + total
        ),
        Table(("modality", "separate: encoder params", "separate: Transformer params", "joint: encoder params",
               "separate: updates", "joint: updates of the modality"), tuple(rows)),  # fmt: skip
        P(
            f"Joint pretraining: {fmt_num(j.get('pretrain/steps', '—'))} updates in "
            f"{fmt_num(j.get('pretrain/seconds', '—'))} s, final loss {fmt_num(j.get('pretrain/loss', '—'))}."
        ),
    ]


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


def stage_time_blocks(rep: Report) -> list:
    """Wall time per kind of stage and per stage (``timings/``: process start to end, start-up included),
    so that a slow machine shows where its time goes."""
    times = rep.stage_times
    if not times:
        return [P("No stage wall times (`timings/` is empty: stages write it when run through `d2v`).")]
    kinds = timing.by_kind(times)
    total = sum(s for _, _, s in kinds)
    slowest = sorted(times.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    return [
        H(2, "Stage wall times"),
        P(
            f"{len(times)} stages, {fmt_num(total)} s in all ({total / 60:.1f} min): each stage's own process "
            "from start to end (imports and start-up included; DVC's bookkeeping between stages is not), "
            "as its last run on this machine measured it."
        ),
        Table(("stage", "runs", "wall s", "share"),
              tuple((k, str(n), fmt_num(s), f"{100 * s / total:.0f}%" if total else "—") for k, n, s in kinds)),
        Details("The 10 slowest stages", (Table(("stage", "wall s"), tuple((k, fmt_num(v)) for k, v in slowest)),)),
    ]  # fmt: skip


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
    blocks += joint_blocks(rep)
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
        *stage_time_blocks(rep),
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
