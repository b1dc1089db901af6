"""Pretraining seeds, each fine-tuned against scratch: is a modality's gain the recipe's or one run's luck?

    .venv/bin/python benchmarks/pretrain_seeds.py <project> <modality> [--seeds 0 1 2]
        [--finetune-seeds 0 1 2] [--budget 5] [--set key=value ...] [--json out.jsonl]

``<project>`` is a d2v project folder after ``dvc repro shard@<m>`` (its ``params.yaml`` and
``<paths.shards>/<m>``). For every pretraining seed it makes a temporary project beside the shards (linked,
not copied) whose ``params.yaml`` is the project's with ``seed: <s>`` and the ``--set`` changes (dotted keys
from the top of params.yaml, YAML values: ``--set model.audio.ema.tau0=0.99``), runs ``d2v pretrain <m>``
there, then fine-tunes that encoder with ``finetune_recipe.run`` at ``--budget`` for every fine-tuning seed.
The scratch arm (the same architecture at random init, fine-tuned alike) does not depend on the pretraining
seed, so it runs once. It prints, per pretraining seed, the final pretraining loss, the pretrained arm's
mean and sample std, the difference to scratch and whether it clears the bar (a difference of more than
twice the larger std). Nothing in the project changes; the temporary projects are deleted (``--keep`` keeps them).
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

import yaml

from d2v.data.remote import is_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_recipe import run as finetune_arms  # noqa: E402
from finetune_recipe import set_dotted  # noqa: E402


def seed_project(
    project: Path, modalities: list[str] | None, seed: int, changes: dict[str, Any], where: Path
) -> tuple[Path, dict[str, Any]]:
    """``where/seed<seed>``: a project with ``project``'s shards of ``modalities`` (None: ``joint.modalities``)
    linked in and its params.yaml with ``seed`` and ``changes`` (dotted keys). Returns it and the params."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["seed"] = seed
    for k, v in changes.items():
        set_dotted(params, k, v)
    run_dir = where / f"seed{seed}"
    run_dir.mkdir(parents=True)
    root = params["paths"]["shards"]
    if not is_url(root):  # a folder is linked in; a URL (shards in object storage) is read where it is
        shards = run_dir / root
        shards.mkdir(parents=True)
        for m in modalities or params["joint"]["modalities"]:
            (shards / m).symlink_to((project / root / m).resolve())
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return run_dir, params


def pretrain(
    project: Path, m: str, seed: int, changes: dict[str, Any], where: Path
) -> tuple[Path, float | None]:
    """A temporary project under ``where`` with the project's shards and ``seed``; pretrains ``m`` in it.
    Returns the folder and the final ``pretrain/loss`` of ``<paths.metrics>/pretrain/<m>.json``."""
    run_dir, params = seed_project(project, [m], seed, changes, where)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(run_dir)}
    t = time.perf_counter()
    subprocess.run(["d2v", "pretrain", m], cwd=run_dir, env=env, check=True)
    metrics = json.loads((run_dir / params["paths"]["metrics"] / "pretrain" / f"{m}.json").read_text())
    print(f"{m} pretraining seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)
    return run_dir, metrics.get("pretrain/loss")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("modality", choices=["audio", "image", "text"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    ap.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", default="5", help="labels per class (int) or a fraction (float)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml changes")
    ap.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = ap.parse_args(argv)
    project, m = args.project.resolve(), args.modality
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    changes = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    ft = args.finetune_seeds
    where = Path(tempfile.mkdtemp(prefix="d2v-seeds-"))
    rows, scratch = [], None
    try:
        for seed in args.seeds:
            run_dir, loss = pretrain(project, m, seed, changes, where)
            inits = ("pretrained",) if scratch is not None else ("pretrained", "scratch")
            acc = finetune_arms(run_dir, m, budget, ft, {}, inits=inits)["accuracy"]
            scratch = scratch or acc["scratch"]
            p = acc["pretrained"]
            sd = max(statistics.stdev(p), statistics.stdev(scratch)) if len(ft) > 1 else float("nan")
            diff = statistics.fmean(p) - statistics.fmean(scratch)
            rows.append({
                "pretrain_seed": seed, "final_loss": loss, "pretrained": p, "scratch": scratch,
                "diff": diff, "larger_std": sd, "clears_bar": bool(diff > 2 * sd),
            })  # fmt: skip
            if not args.keep:
                shutil.rmtree(run_dir)
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)

    def pm(xs: list[float]) -> str:
        return (
            f"{100 * statistics.fmean(xs):.1f} +- {100 * statistics.stdev(xs):.1f}"
            if len(xs) > 1
            else f"{100 * xs[0]:.1f}"
        )

    print(f"\n{m}, {budget} labels/class, fine-tuning seeds {ft}, changes {changes or 'none'}")
    print("| pretraining seed | final loss | pretrained | scratch | diff | 2 x larger std | bar |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        print(f"| {r['pretrain_seed']} | {loss} | {pm(r['pretrained'])} | {pm(r['scratch'])} | "
              f"{100 * r['diff']:+.1f} | {200 * r['larger_std']:.1f} | {'clears' if r['clears_bar'] else 'misses'} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps({"modality": m, "budget": budget, "changes": changes, "finetune_seeds": ft,
                                "rows": rows}) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
