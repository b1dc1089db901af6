"""What each layer of an encoder keeps: linear-probe accuracy and the share of its variance that is position.

    python benchmarks/layer_diagnostics.py CHECKPOINT [CHECKPOINT ...] [--shards DIR] [--budget 100]
        [--eval-per-class 100] [--frames 25] [--json out.json]

e.g. ``python benchmarks/layer_diagnostics.py checkpoints/pretrain/audio`` after ``dvc repro``. CHECKPOINT
is a pretraining checkpoint (a run folder: its latest step; or a step folder). For each, and for the same
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

Pretrained against random init, per depth: whether pretraining makes the context network trade content for
position (``probe`` down where ``pos`` goes up). ``--json``: ``{"<step>:<pretrained|scratch>": [{"depth",
"probe", "pos"}, ...]}``. A diagnostic on CPU, no timing.
"""

from __future__ import annotations

import argparse
import json
import sys
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
def depth_tokens(encoder: Encoder, loader) -> tuple[list[list[Tensor]], Tensor]:
    """Per item (alone) the tokens at every depth: ``feats[i][d]`` [T_i, D] (prefix tokens dropped)."""
    encoder.eval()
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

    def split(name: str, budget):
        spec = LoaderSpec(batch_size=32, mode="eval", seed=0, label_budget=budget)
        loader = build_loader(shard_dir, split_of(entry, name), encoder.config, spec)
        return depth_tokens(encoder, loader)

    train, train_y = split("train", args.budget)
    counts = (manifest["splits"].get(split_of(entry, "test")) or {}).get("label_counts") or {}
    test, test_y = split("test", min(args.eval_per_class, *counts.values()))  # as many as the smallest class
    rows = []
    for d in range(len(train[0])):
        tr = torch.stack([f[d].mean(0) for f in train])
        te = torch.stack([f[d].mean(0) for f in test])
        pred = linear_probe(tr, train_y, te, n)
        rows.append({
            "depth": d, "probe": accuracy(pred, test_y),
            "pos": position_share([f[d] for f in test], args.frames),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
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
        modality = checkpoint.read_meta(step)["modality"]
        shard_dir = location(args.shards or f"data/shards/{modality}")
        for init in ("pretrained", "scratch"):
            enc = load_checkpoint_encoder(step, pretrained=init == "pretrained", seed=0)
            rows = diagnose(enc, shard_dir, args)
            results[f"{step}:{init}"] = rows
            print(f"{step} [{init}]")
            print("  depth " + " ".join(f"{r['depth']:>6}" for r in rows))
            print("  probe " + " ".join(f"{100 * r['probe']:6.1f}" for r in rows))
            print("  pos   " + " ".join("     -" if r["pos"] is None else f"{r['pos']:6.3f}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
