"""Which layer and pooling carry a task, pretrained against random init, under a changed recipe.

    .venv/bin/python benchmarks/probe_study.py <project> <modality> [--seeds 0] [--set key=value ...]
        [--pools mean first] [--budget 100 [0.5 ...]] [--json out.jsonl] [--keep DIR]

``<project>`` is a d2v project after ``dvc repro shard@<m>``. For every pretraining seed it makes a temporary
project with the project's shards linked in and its ``params.yaml`` with ``seed`` and the ``--set`` changes
(``pretrain_seeds.seed_project``). A change under ``shard.`` reshards there from the project's raw folder
(linked in; e.g. ``--set shard.text.vocab_size=2048``). It pretrains ``<m>``, then runs evaluate's
linear probe (``d2v.evaluate.probe_metrics``: every labelled task, every layer, each pool of ``--pools``,
probe seeds 0-2) on the pretrained encoder and on the same architecture at random init (the params seed),
once per ``--budget`` (training labels per class, or a fraction of each class). It prints, per budget, task
and pool, the test accuracy of every layer (mean over probe seeds) for both, and the difference at
``embed``'s default features (the final output, mean-pooled). ``--json`` appends one line per seed and
budget; ``--keep DIR`` keeps each seed's pretrained checkpoint as ``DIR/seed<k>`` (for ``heldout.py`` or
``layer_diagnostics.py``). Nothing in the project changes.
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
from pathlib import Path
from typing import Any

import torch
import yaml

from d2v import checkpoint
from d2v.config import PathsConfig, section
from d2v.data.loader import read_manifest
from d2v.evaluate import EvaluateConfig, probe_metrics
from d2v.sweep import probe_tasks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_seeds import seed_project  # noqa: E402


def study(
    project: Path, m: str, seed: int, changes: dict[str, Any], where: Path, pools: tuple[str, ...],
    budgets: list[int | float], keep: Path | None = None,
) -> list[dict[str, float]]:
    """Per budget, the probe metrics (``probe/<init>/s<k>/<metric>``) of one pretraining seed under
    ``changes``; with ``keep``, the pretrained checkpoint folder is copied to ``keep/seed<seed>``."""
    run_dir, params = seed_project(project, [m], seed, changes, where)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(run_dir)}
    paths = section(params, "paths", PathsConfig)
    if any(k.startswith("shard.") for k in changes):  # its own shards from the project's raw data
        (run_dir / paths.shards / m).unlink()
        (run_dir / paths.raw).mkdir(parents=True, exist_ok=True)
        (run_dir / paths.raw / m).symlink_to((project / paths.raw / m).resolve())
        subprocess.run(["d2v", "shard", m], cwd=run_dir, env=env, check=True)
    subprocess.run(["d2v", "pretrain", m], cwd=run_dir, env=env, check=True)
    shards = run_dir / paths.shards / m
    step = checkpoint.resolve(run_dir / paths.checkpoints / "pretrain" / m)
    if keep is not None:
        shutil.copytree(run_dir / paths.checkpoints / "pretrain" / m, keep / f"seed{seed}")
    base = section(params, "evaluate", EvaluateConfig, m)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = {"pretrained": step, "scratch": step}
    out = []
    for budget in budgets:
        cfg = EvaluateConfig(batch_size=base.batch_size, probe_budget=budget, probe_pools=pools,
                             precision=base.precision, probe_seeds=(0, 1, 2))  # fmt: skip
        out.append(probe_metrics(m, read_manifest(shards), shards, steps, cfg, int(params.get("seed", 0)), device))
    return out


def table(metrics: dict[str, float], tasks: list[str], pools: tuple[str, ...]) -> list[str]:
    """Markdown rows: task, pool, then per layer 'pretrained / random' (%, mean over probe seeds)."""

    def mean(init: str, name: str) -> float | None:
        vals = [v for k, v in metrics.items() if k.startswith(f"probe/{init}/s") and k.endswith(f"/{name}")]
        return 100 * statistics.fmean(vals) if vals else None

    lines = []
    for i, task in enumerate(tasks):
        t = "" if i == 0 else f"{task}_"
        for pool in pools:
            p = "" if pool == "mean" else f"{pool}_"
            cells, layer = [], 1
            while (pre := mean("pretrained", f"{t}{p}layer{layer}_accuracy")) is not None:
                rnd = mean("scratch", f"{t}{p}layer{layer}_accuracy")
                cells.append(f"{pre:.1f} / {rnd:.1f}")
                layer += 1
            lines.append(f"| {task} | {pool} | " + " | ".join(cells) + " |")
        pre, rnd = mean("pretrained", f"{t}embed_accuracy"), mean("scratch", f"{t}embed_accuracy")
        if pre is not None and rnd is not None:
            lines.append(f"| {task} | embed's default | {pre:.1f} / {rnd:.1f} ({pre - rnd:+.1f}) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("modality", choices=["audio", "image", "text"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretraining seeds")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml changes")
    ap.add_argument("--pools", nargs="+", default=["mean", "first"], choices=["mean", "first"])
    ap.add_argument("--budget", type=yaml.safe_load, nargs="+", default=[100],
                    help="probe training labels per class (an int) or fraction of each class (a float); "
                    "several: one probe each on the same pretraining")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="append the result as one JSON line per seed")
    ap.add_argument("--keep", type=Path, default=None, help="keep each seed's pretrained checkpoint here")
    args = ap.parse_args(argv)
    if args.keep is not None and any((args.keep / f"seed{s}").exists() for s in args.seeds):
        ap.error(f"--keep {args.keep}: a seed<k> folder is already there; choose an empty folder")
    project, m = args.project.resolve(), args.modality
    changes = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if any(k.startswith("prepare.") for k in changes):
        ap.error("--set prepare.*: prepare another project for other raw data; this script reshards only")
    pools = tuple(dict.fromkeys(["mean", *args.pools]))
    where = Path(tempfile.mkdtemp(prefix="d2v-probe-study-"))
    try:
        for seed in args.seeds:
            params = yaml.safe_load((project / "params.yaml").read_text())
            tasks = probe_tasks(read_manifest(project / params["paths"]["shards"] / m))
            results = study(project, m, seed, changes, where, pools, args.budget, args.keep)
            for budget, metrics in zip(args.budget, results):
                print(f"\n{m}, pretraining seed {seed}, changes {changes or 'none'}, probe budget {budget}: probe "
                      f"test accuracy %, pretrained / random init, per layer (1..L blocks, L + 1 the final output)")  # fmt: skip
                print("| task | pool | per layer |\n|---|---|---|")
                print("\n".join(table(metrics, tasks, pools)))
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    row = {"modality": m, "seed": seed, "changes": changes, "budget": budget, "metrics": metrics}
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
            shutil.rmtree(where / f"seed{seed}", ignore_errors=True)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
