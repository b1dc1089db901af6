"""Joint against separate against scratch, per modality, at equal compute: the linear probe, paired by seed.

    .venv/bin/python benchmarks/joint.py <project> [--seeds 0 1 2] [--finetune-seeds 0 1 2 --budget 5]
        [--set key=value ...] [--json out.jsonl]
    .venv/bin/python benchmarks/joint.py <project> --reuse      # the project's own checkpoints, one seed

``<project>`` is a d2v project folder with the shards of ``joint.modalities`` (``dvc repro shard@<m>``). For
every pretraining seed it makes a temporary project beside the shards (linked, not copied) with ``seed: <s>``
and the ``--set`` changes (dotted keys from the top of params.yaml, YAML values), runs ``d2v pretrain <m>``
for each modality and ``d2v pretrain joint`` there (the joint run makes each modality's updates of its
separate run: the same compute by construction), then probes each modality's three encoders with the
evaluate stage's linear probe (``evaluate.<m>``: its probe seeds, budget and layer choice): the joint
model's encoder for the modality, the separate run's, and the separate architecture at random init from the
same seed (scratch). With ``--finetune-seeds``, each arm is also fine-tuned at ``--budget`` labels per class
(``finetune.<m>`` of params.yaml, as ``benchmarks/finetune_recipe.py``) once per fine-tuning seed and scored
on the test split. ``--reuse`` probes ``<paths.checkpoints>/pretrain/{<m>,joint}`` of the project as
they are (one pretraining seed, the project's).

It prints each arm's probe (and fine-tuning) accuracy per seed and the paired differences (joint - separate, joint - scratch)
with their mean and 95% t-interval over the pretraining seeds (over the probe seeds with one pretraining
seed), plus the Transformer parameters of each arm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from d2v.config import load_params, section
from d2v.data.loader import read_manifest
from d2v.data.remote import shard_location
from d2v.evaluate import EvaluateConfig, probe
from d2v.load import load_encoder
from d2v.modalities import MODALITIES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_recipe import run as finetune_arms  # noqa: E402
from pretrain_seeds import seed_project  # noqa: E402

ARMS = ("joint", "separate", "scratch")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95% Student t quantiles by degrees of freedom (n - 1)."""


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width of ``xs`` (half-width nan for one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5


def pretrain_all(project: Path, seed: int, changes: dict[str, Any], where: Path) -> Path:
    """A temporary project under ``where`` with the project's shards and ``seed``; every modality of
    ``joint.modalities`` pretrained alone, then all of them jointly. Returns the folder."""
    run_dir, params = seed_project(project, None, seed, changes, where)
    modalities = params["joint"]["modalities"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for target in (*modalities, "joint"):
        t = time.perf_counter()
        subprocess.run(["d2v", "pretrain", target], cwd=run_dir, env=env, check=True)
        print(f"seed {seed}: pretrain {target} {time.perf_counter() - t:.0f} s", flush=True)
    return run_dir


def stack_parameters(encoder: Any) -> int:
    return sum(p.numel() for p in getattr(encoder, encoder.stack_attr).parameters())


def arm_encoder(arm: str, ckpt: Path, m: str, seed: int) -> Any:
    """``m``'s encoder of ``arm`` from the pretraining checkpoints in ``ckpt`` (scratch: random init from
    ``seed``, the separate run's architecture)."""
    if arm == "joint":
        return load_encoder(ckpt / "joint", modality=m)
    return load_encoder(ckpt / m, pretrained=arm == "separate", seed=seed)


def probe_arms(run_dir: Path, seed: int, arms: tuple[str, ...] = ARMS) -> dict[str, dict[str, Any]]:
    """Per modality: each of ``arms``' probe (the evaluate stage's ``probe``: accuracy averaged over its
    probe seeds, and the per-seed values) and the Transformer parameters it used."""
    params = load_params(run_dir / "params.yaml")
    paths = params["paths"]
    ckpt = run_dir / paths["checkpoints"] / "pretrain"
    out: dict[str, dict[str, Any]] = {}
    for m in params["joint"]["modalities"]:
        shard_dir = shard_location(paths["shards"], m, base=run_dir)
        manifest = read_manifest(shard_dir)
        cfg = section(params, "evaluate", EvaluateConfig, m)
        encoders = {a: arm_encoder(a, ckpt, m, seed) for a in arms}
        out[m] = {"stack_params": {a: stack_parameters(e) for a, e in encoders.items()}}
        for arm, enc in encoders.items():
            t = time.perf_counter()
            result = probe(enc, manifest, shard_dir, cfg, seed, torch.device("cpu"))
            out[m][arm] = {
                "accuracy": result["accuracy"],
                "per_probe_seed": [result[f"s{s}/accuracy"] for s in cfg.probe_seeds],
            }
            print(f"seed {seed}: {m} {arm} probe {100 * result['accuracy']:.1f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    return out


def finetune_all(run_dir: Path, budget: int | float, seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per modality: each arm fine-tuned at ``budget`` once per seed (test accuracy, its mean over the seeds)."""
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    out = {}
    for m in params["joint"]["modalities"]:
        acc = finetune_arms(run_dir, m, budget, seeds, {}, inits=("joint", "pretrained", "scratch"))["accuracy"]
        named = {"joint": acc["joint"], "separate": acc["pretrained"], "scratch": acc["scratch"]}
        out[m] = {arm: {"accuracy": statistics.fmean(v), "per_seed": v} for arm, v in named.items()}
    return out


def report(rows: list[dict[str, Any]], kind: str = "probe") -> str:
    """The tables: per modality, each arm per seed and the paired differences with 95% intervals."""
    lines = []
    what = "linear probe" if kind == "probe" else f"fine-tuning at {rows[0].get('budget')} labels per class"
    spread = "per_probe_seed" if kind == "probe" else "per_seed"
    for m in rows[0][kind]:
        lines += [f"\n{m}: {what} accuracy (%), paired by pretraining seed", "",
                  "| seed | joint | separate | scratch | joint - separate | joint - scratch |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        d_sep, d_scr = [], []
        for r in rows:
            a = {arm: 100 * r[kind][m][arm]["accuracy"] if arm in r[kind][m] else float("nan") for arm in ARMS}
            d_sep.append(a["joint"] - a["separate"])
            d_scr.append(a["joint"] - a["scratch"])
            lines.append(f"| {r['seed']} | {a['joint']:.1f} | {a['separate']:.1f} | {a['scratch']:.1f} | "
                         f"{d_sep[-1]:+.1f} | {d_scr[-1]:+.1f} |")  # fmt: skip
        if len(rows) == 1 and set(ARMS) <= set(rows[0][kind][m]):  # one pretraining seed: the spread over
            p = rows[0][kind][m]  # probe / fine-tuning seeds only
            d_sep = [100 * (j - s) for j, s in zip(p["joint"][spread], p["separate"][spread])]
            d_scr = [100 * (j - s) for j, s in zip(p["joint"][spread], p["scratch"][spread])]
            seeds = "probe" if kind == "probe" else "fine-tuning"
            over = f"{seeds} seeds (one pretraining seed: not the spread over pretraining seeds)"
        else:
            over = "pretraining seeds"
        (ms, hs), (mc, hc) = interval(d_sep), interval(d_scr)
        lines.append(f"| mean, 95% CI over {over} | | | | {ms:+.1f} +- {hs:.1f} | {mc:+.1f} +- {hc:.1f} |")
        if kind == "probe":
            n = rows[0]["probe"][m]["stack_params"]
            said = {"joint": "shared by every modality", "separate": "one per modality", "scratch": "the same"}
            lines.append("\nTransformer stack parameters: "
                         + ", ".join(f"{a} {n[a]:,} ({said[a]})" for a in ARMS if a in n))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml changes")
    ap.add_argument("--finetune-seeds", type=int, nargs="*", default=[], help="also fine-tune, once per seed")
    ap.add_argument("--budget", default="5", help="fine-tuning labels per class (int) or a fraction (float)")
    ap.add_argument("--reuse", action="store_true", help="probe the project's own checkpoints (one seed)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="--reuse: probe only these")
    ap.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = ap.parse_args(argv)
    project = args.project.resolve()
    changes = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if not (load_params(project / "params.yaml").get("joint") or {}).get("modalities"):
        # the demo leaves the joint arm off; this benchmark is that arm, for every modality unless told
        changes.setdefault("joint.modalities", list(MODALITIES))
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    rows: list[dict[str, Any]] = []

    def measure(run_dir: Path, seed: int) -> None:
        row = {"seed": seed, "probe": probe_arms(run_dir, seed, tuple(args.arms))}
        if args.finetune_seeds:
            row.update(budget=budget, finetune=finetune_all(run_dir, budget, args.finetune_seeds))
        rows.append(row)

    if args.reuse:
        measure(project, int(yaml.safe_load((project / "params.yaml").read_text()).get("seed", 0)))
    else:
        where = Path(tempfile.mkdtemp(prefix="d2v-joint-"))
        try:
            for seed in args.seeds:
                run_dir = pretrain_all(project, seed, changes, where)
                measure(run_dir, seed)
                if not args.keep:
                    shutil.rmtree(run_dir)
        finally:
            if not args.keep:
                shutil.rmtree(where, ignore_errors=True)
    if args.json:  # first: the measurements are kept whatever the printing does
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps({"changes": changes, "rows": rows}) + "\n")
    print(report(rows))
    if args.finetune_seeds:
        print(report(rows, "finetune"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
