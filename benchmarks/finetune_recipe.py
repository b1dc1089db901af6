"""Few-label fine-tuning recipes, pretrained against scratch, without DVC: which recipe lets pretraining show.

    .venv/bin/python benchmarks/finetune_recipe.py <project> <modality> [--budget 5] [--seeds 0 1 2]
        [--set key=value ...] [--json out.json]

``<project>`` is a d2v project folder after ``dvc repro pretrain@<m>`` (its ``params.yaml``,
``<paths.shards>/<m>`` and ``<paths.checkpoints>/pretrain/<m>``). For every seed it fine-tunes the
pretrained encoder and the same architecture at random init (``--init scratch`` of ``d2v finetune``) with
``finetune.<m>`` of that params.yaml, changed by ``--set`` (dotted keys under ``finetune.<m>``, YAML values:
``--set optim.lr=2e-5 head_init=probe``), then scores each on the whole test split. It prints every
accuracy, each arm's mean and sample std, the difference, and whether it clears the bar (a difference of more
than twice the larger std). Runs go to a temporary folder; nothing in the project changes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from d2v import checkpoint
from d2v.config import from_dict, load_params
from d2v.data.loader import LoaderSpec, build_loader, read_manifest
from d2v.data.remote import shard_location
from d2v.evaluate import predict_split, split_of
from d2v.finetune import FinetuneConfig, finetune, modality_options, task_info
from d2v.load import build_finetune_model, load_checkpoint_encoder
from d2v.metrics import task_metrics


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[last] = value


def run(
    project: Path,
    m: str,
    budget: int | float,
    seeds: list[int],
    changes: dict[str, Any],
    inits: tuple[str, ...] = ("pretrained", "scratch"),
) -> dict[str, Any]:
    params = load_params(project / "params.yaml")
    section = dict(params["finetune"][m])
    for k, v in changes.items():
        set_dotted(section, k, v)
    cfg = from_dict(FinetuneConfig, section, f"finetune.{m}")
    head, mask = modality_options(cfg, m)
    shard_dir = shard_location(params["paths"]["shards"], m, base=project)
    manifest = read_manifest(shard_dir)
    split, num_classes, entry = task_info(manifest, cfg.task, shard_dir)
    source = checkpoint.resolve(project / params["paths"]["checkpoints"] / "pretrain" / m)
    device = torch.device("cpu")
    acc: dict[str, list[float]] = {init: [] for init in inits}
    for init in acc:
        for seed in seeds:
            t = time.perf_counter()
            if init == "joint":  # the modality's encoder of the joint model (benchmarks/joint.py)
                joint = project / params["paths"]["checkpoints"] / "pretrain" / "joint"
                encoder = load_checkpoint_encoder(joint, modality=m)
            else:
                encoder = load_checkpoint_encoder(source, pretrained=init == "pretrained", seed=seed)
            model_cfg = encoder.config
            torch.manual_seed(seed)  # head init, as `d2v finetune`
            model = build_finetune_model(m, encoder, cfg.task, num_classes, head)

            def make_loader(epoch: int, seed: int = seed, model_cfg: Any = model_cfg):
                return build_loader(shard_dir, split, model_cfg, LoaderSpec(
                    batch_size=cfg.batch_size, mode="finetune", seed=seed, max_len=cfg.max_len,
                    label_budget=budget, epoch=epoch, finetune_mask=mask,
                ))  # fmt: skip

            def head_items(seed: int = seed, model_cfg: Any = model_cfg):
                spec = LoaderSpec(batch_size=cfg.batch_size, mode="eval", seed=seed, label_budget=budget)
                return build_loader(shard_dir, split, model_cfg, spec)

            with tempfile.TemporaryDirectory(prefix="d2v-recipe-") as tmp:
                finetune(model, cfg, make_loader, tmp, {"modality": m}, seed=seed, head_items=head_items)
            model.eval()
            test = build_loader(
                shard_dir, split_of(entry, "test"), model_cfg, LoaderSpec(batch_size=64, mode="eval", seed=0)
            )
            preds, targets = predict_split(model, test, device)
            a = task_metrics(cfg.task, preds, targets, num_classes)["accuracy"]
            acc[init].append(a)
            print(
                f"{m} {init} seed {seed}: accuracy {100 * a:.1f} ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    if set(inits) != {"pretrained", "scratch"}:
        return {"modality": m, "budget": budget, "seeds": seeds, "changes": changes, "accuracy": acc}
    p, s = acc["pretrained"], acc["scratch"]
    sd = max(statistics.stdev(p), statistics.stdev(s)) if len(seeds) > 1 else float("nan")
    diff = statistics.fmean(p) - statistics.fmean(s)
    out = {
        "modality": m, "budget": budget, "seeds": seeds, "changes": changes, "accuracy": acc,
        "pretrained_mean": statistics.fmean(p), "scratch_mean": statistics.fmean(s), "diff": diff,
        "larger_std": sd, "clears_bar": bool(diff > 2 * sd),
    }  # fmt: skip
    print(f"{m} budget {budget} {changes or 'finetune.' + m + ' as in params.yaml'}: pretrained "
          f"{100 * out['pretrained_mean']:.1f}, scratch {100 * out['scratch_mean']:.1f}, diff {100 * diff:+.1f} "
          f"points, 2 x larger std {200 * sd:.1f}: {'clears' if out['clears_bar'] else 'misses'} the bar")  # fmt: skip
    return out


def append_jsonl(path: Path | None, row: dict[str, Any]) -> None:
    """Append ``row`` to ``path`` as one JSON line (nothing when ``path`` is None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("modality", choices=["audio", "image", "text"])
    ap.add_argument("--budget", default="5", help="labels per class (int) or a fraction (float)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    args = ap.parse_args(argv)
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    changes = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    append_jsonl(args.json, run(args.project.resolve(), args.modality, budget, args.seeds, changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
