"""What each layer of an encoder keeps: linear-probe accuracy and the share of its variance that is position.

    python benchmarks/layer_diagnostics.py CHECKPOINT [CHECKPOINT ...] [--modality M] [--shards DIR]
        [--budget 100] [--eval-per-class 100] [--frames 25] [--json out.json]

e.g. ``python benchmarks/layer_diagnostics.py checkpoints/pretrain/audio`` after ``dvc repro``. CHECKPOINT
is a pretraining checkpoint (a run folder: its latest step; or a step folder; a joint one with ``--modality``,
which of its encoders). For each, and for the same
architecture at random init (seed 0), on the probe task of the checkpoint modality's shards (``--shards``,
default ``data/shards/<m>``: train -> test, ``--budget`` labels per class to train on, at most
``--eval-per-class`` per class to test on), every item alone (no padding), at every depth: 0 = the local
features (conv stack / patches / embeddings, before positions), 1 = the input of the first block (positions
added: speech's positional convs), 2.. = each block's output. Per depth it prints:

- ``probe``: test accuracy of logistic regression on the mean-pooled features (``d2v.metrics.linear_probe``);
  the blocks' rows are what ``d2v evaluate``'s per-layer probe reports, here beside depths 0 and 1;
- ``pos``: the share of the features' variance explained by the token's position alone: over items with at
  least ``--frames`` tokens (at least 8 such items, else ``-``), their first ``--frames`` tokens, the sum over
  channels of the variance across positions of the per-position mean, over the total variance. Near 1: every
  item gets the same pattern over its positions, so a mean-pooled feature carries little of the item (what a
  teacher's targets that depend on position alone could reward); near 0: position plays no part.
- ``noise``: how far dropout moves an item's mean-pooled features, against how far the items' features lie
  apart: over the test items, the mean distance between a train-mode forward (dropout drawn, LayerDrop off:
  every depth runs) and the eval-mode one, over the mean distance of the eval-mode features from their mean.
  Near or above 1, a fine-tuning forward pass cannot tell the items apart: an output layer fitted on
  eval-mode features, or on a few dropout draws, meets features that its fit never saw.

Pretrained against random init, per depth: whether pretraining makes the context network trade content for
position (``probe`` down where ``pos`` goes up). ``--json``: ``{"<step>:<pretrained|scratch>": [{"depth",
"probe", "pos", "noise"}, ...]}``. A diagnostic on CPU, no timing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from d2v import checkpoint
from d2v.data.loader import LoaderSpec, build_loader, read_manifest
from d2v.data.remote import location
from d2v.evaluate import _probe_task, split_of
from d2v.load import load_checkpoint_encoder
from d2v.metrics import accuracy, linear_probe
from d2v.modalities.base import Encoder, unpadded_rows


@torch.no_grad()
def depth_tokens(encoder: Encoder, loader, train: bool = False) -> tuple[list[list[Tensor]], Tensor]:
    """Per item (alone) the tokens at every depth: ``feats[i][d]`` [T_i, D] (prefix tokens dropped); with
    ``train``, in train mode (dropout drawn from the seeded torch RNG) with LayerDrop off."""
    stack = getattr(encoder, encoder.stack_attr)
    cfg = stack.cfg
    stack.cfg = replace(cfg, layerdrop=0.0)  # every block runs, so that depths line up with eval mode's
    encoder.train(train)
    torch.manual_seed(0)
    P = encoder.num_prefix_tokens
    feats, ys = [], []
    for batch in loader:
        inputs, pad = batch["inputs"], batch.get("padding_mask")
        rows = unpadded_rows(inputs, pad) if pad is not None else list(inputs.split(1))
        for x_in in rows:
            x, _ = encoder.local_features(x_in, None)
            pos = encoder.add_positions(x, None)
            out = encoder.encode_tokens(pos, None, tap="block")
            feats.append([x[0].float(), pos[0].float(), *(h[0, P:].float() for h in out.layers)])
        ys.append(batch["labels"])
    stack.cfg = cfg
    encoder.eval()
    return feats, torch.cat(ys)


def position_share(tokens: list[Tensor], frames: int) -> float | None:
    """Variance share of the per-position mean, over items with >= ``frames`` tokens (their first ``frames``)."""
    rows = [t[:frames] for t in tokens if len(t) >= frames]
    if len(rows) < 8:
        return None
    h = torch.stack(rows)  # [N, F, D]
    total = h.var(dim=(0, 1), unbiased=False).sum()
    by_pos = h.mean(0).var(dim=0, unbiased=False).sum()  # [F, D] -> variance over positions
    return float(by_pos / total.clamp_min(1e-12))


def diagnose(encoder: Encoder, shard_dir: Path, args: argparse.Namespace) -> list[dict]:
    manifest = read_manifest(shard_dir)
    entry = manifest["tasks"][_probe_task(manifest)]
    n = len(entry["labels"])

    def split(name: str, budget, train: bool = False):
        spec = LoaderSpec(batch_size=32, mode="eval", seed=0, label_budget=budget)
        loader = build_loader(shard_dir, split_of(entry, name), encoder.config, spec)
        return depth_tokens(encoder, loader, train)

    train, train_y = split("train", args.budget)
    counts = (manifest["splits"].get(split_of(entry, "test")) or {}).get("label_counts") or {}
    per_class = min(args.eval_per_class, *counts.values())  # as many as the smallest class
    test, test_y = split("test", per_class)
    test_train_mode, _ = split("test", per_class, train=True)
    rows = []
    for d in range(len(train[0])):
        tr = torch.stack([f[d].mean(0) for f in train])
        te = torch.stack([f[d].mean(0) for f in test])
        pred = linear_probe(tr, train_y, te, n)
        rows.append({
            "depth": d, "probe": accuracy(pred, test_y),
            "pos": position_share([f[d] for f in test], args.frames),
            "noise": dropout_noise(torch.stack([f[d].mean(0) for f in test_train_mode]), te),
        })  # fmt: skip
    return rows


def dropout_noise(train_ND: Tensor, eval_ND: Tensor) -> float:
    """Mean distance of each item's train-mode features from its eval-mode ones, over the mean distance of
    the eval-mode features from their mean (inf when the items' features all coincide)."""
    spread = (eval_ND - eval_ND.mean(0)).norm(dim=1).mean()
    moved = (train_ND - eval_ND).norm(dim=1).mean()
    return float(moved / spread) if spread > 0 else math.inf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--modality", default=None, help="which encoder of a joint checkpoint")
    ap.add_argument("--shards", default=None, help="shard folder or URL (default data/shards/<modality>)")
    ap.add_argument("--budget", type=int, default=100, help="train labels per class for the probe")
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--frames", type=int, default=25, help="tokens per item for the position share")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for ck in args.checkpoints:
        step = checkpoint.resolve(ck)
        modality = args.modality or checkpoint.read_meta(step)["modality"]
        shard_dir = location(args.shards or f"data/shards/{modality}")
        for init in ("pretrained", "scratch"):
            enc = load_checkpoint_encoder(step, pretrained=init == "pretrained", seed=0, modality=args.modality)
            rows = diagnose(enc, shard_dir, args)
            results[f"{step}:{init}"] = rows
            print(f"{step} [{init}]")
            print("  depth " + " ".join(f"{r['depth']:>6}" for r in rows))
            print("  probe " + " ".join(f"{100 * r['probe']:6.1f}" for r in rows))
            print("  pos   " + " ".join("     -" if r["pos"] is None else f"{r['pos']:6.3f}" for r in rows))
            print("  noise " + " ".join(f"{r['noise']:6.3f}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
