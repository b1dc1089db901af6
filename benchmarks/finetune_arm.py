"""One sweep arm as the pipeline fine-tunes and scores it: `d2v finetune` (its LR search included) per seed,
then the evaluate stage's test accuracy.

    .venv/bin/python benchmarks/finetune_arm.py <project> <modality> [--init joint] [--budget 5]
        [--seeds 0 1 2] [--params params.yaml] [--json out.jsonl]

``<project>`` is a d2v project folder whose ``<paths.checkpoints>/pretrain/<m>`` (or ``.../joint`` for
``--init joint``) holds the encoder to start from. For each seed it runs ``d2v finetune <m> --init <init>
--budget <budget> --seed <seed> --params <params>`` there (the ``finetune@`` / ``finetune-joint@`` stage's
command: the output layer's fit, the LR search on valid, the run), then scores the run on the whole test
split as ``d2v evaluate`` does (``evaluate.<m>``'s batch size and precision). It prints each seed's accuracy
and chosen LR, and their mean and sample std. Unlike ``finetune_recipe.py`` it writes into the project, as
the stage does: the runs land in ``<paths.checkpoints>/finetune/<m>/`` (so a variant params file with its own
``paths.checkpoints`` keeps runs apart).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from d2v.config import load_params, section
from d2v.data.loader import build_loader, read_manifest
from d2v.data.remote import shard_location
from d2v.evaluate import EvaluateConfig, eval_spec, predict_split, split_of
from d2v.finetune import task_info
from d2v.load import load_finetune_model
from d2v.metrics import task_metrics
from d2v.precision import autocast
from d2v.sweep import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_recipe import append_jsonl  # noqa: E402


def score_test(project: Path, params: dict[str, Any], m: str, run: Run) -> tuple[float, float]:
    """(test accuracy, the LR the run trained at) of fine-tuned run ``run`` of ``m``, scored as ``d2v
    evaluate`` scores it."""
    paths = params["paths"]
    model, meta = load_finetune_model(project / paths["checkpoints"] / "finetune" / m / run.name, m)
    shard_dir = shard_location(paths["shards"], m, base=project)
    manifest = read_manifest(shard_dir)
    _, num_classes, entry = task_info(manifest, meta["task"], shard_dir)
    cfg = section(params, "evaluate", EvaluateConfig, m)
    loader = build_loader(shard_dir, split_of(entry, "test"), model.encoder.config, eval_spec(cfg, 0))
    device = torch.device("cpu")
    with autocast(cfg.precision, device):
        preds, targets = predict_split(model, loader, device)
    # "lr": the LR search's choice, absent with lr_grid: []
    lr = meta.get("lr", meta["config"]["optim"]["lr"])
    return task_metrics(meta["task"], preds, targets, num_classes)["accuracy"], lr


def run_arm(
    project: Path, m: str, init: str, budget: int | float, seeds: list[int], params_file: str = "params.yaml"
) -> dict[str, Any]:
    params = load_params(project / params_file)
    accuracy, lrs = [], []
    for seed in seeds:
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "d2v", "finetune", m, "--params", params_file, "--init", init,
               "--budget", str(budget), "--seed", str(seed)]  # fmt: skip
        done = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd[2:])} failed in {project}:\n{done.stderr[-2000:]}")
        a, lr = score_test(project, params, m, Run(init, budget, seed))
        accuracy.append(a)
        lrs.append(lr)
        print(f"{m} {init} budget {budget} seed {seed}: test accuracy {100 * a:.1f} at lr {lr:.3g} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    std = statistics.stdev(accuracy) if len(accuracy) > 1 else float("nan")
    mean = statistics.fmean(accuracy)
    print(f"{m} {init} budget {budget} ({params_file}): {100 * mean:.1f} ± {100 * std:.1f}")
    return {
        "modality": m, "init": init, "budget": budget, "seeds": seeds, "params": params_file,
        "accuracy": accuracy, "lr": lrs, "mean": mean, "std": std,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("modality", choices=["audio", "image", "text"])
    ap.add_argument("--init", default="joint", choices=["pretrained", "scratch", "published", "joint"])
    ap.add_argument("--budget", default="5", help="labels per class (int) or a fraction (float)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", default="params.yaml", help="params file, relative to the project")
    ap.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    args = ap.parse_args(argv)
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    out = run_arm(args.project.resolve(), args.modality, args.init, budget, args.seeds, args.params)
    append_jsonl(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
