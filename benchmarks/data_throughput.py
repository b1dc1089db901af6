"""Shard-writing and shard-reading throughput per modality on this machine.

Prepares a sample of the embedded default data into a temporary folder (or uses ``--raw``), then times
- write: the ``shard`` stage (scan, split, decode/resample/encode, tar + sha256, manifest);
- read tar: the raw tar stream of the largest split (``iter_shard``: bytes only);
- read batches: ``build_loader`` over that split (decode, crop/augment, collate, + masks in 'pretrain' mode)
  with 0 and 2 DataLoader workers (worker start-up is included, so small splits understate the gain).
MB/s counts shard bytes on disk. Usage::

    .venv/bin/python benchmarks/data_throughput.py [--modalities image text audio] [--raw data/raw]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from d2v.config import from_dict
from d2v.data import LoaderSpec, build_loader, data_module, iter_shard, prepare_raw, read_manifest, shard
from d2v.modalities import get

SAMPLE = {  # default-data sizes that prepare in seconds
    "image": {"max_train": 10000, "max_test": 2000},
    "text": {},
    "audio": {"sentences": 100, "klettres": 300, "ktuberling": 300, "digit_voices": 32, "ctc_strings": 200},
}
SHARD = {
    "image": {"samples_per_shard": 2000},
    "text": {"samples_per_shard": 250},
    "audio": {"samples_per_shard": 100},
}
"""Small shards so that both DataLoader workers get several (each reads whole shards)."""
LOADER = {"image": {}, "text": {}, "audio": {"max_len": 80000, "length_buckets": 8}}
MODEL = {"image": {"preset": "small"}, "text": {"preset": "small"}, "audio": {"preset": "small"}}


def shard_bytes(out: Path, split: str | None = None) -> int:
    m = read_manifest(out)
    return sum(s["bytes"] for n, e in m["splits"].items() if split in (None, n) for s in e["shards"])


def bench(modality: str, raw: Path, out: Path, batch_size: int) -> dict[str, float | str]:
    data = data_module(modality)
    cfg = from_dict(data.ShardConfig, SHARD[modality], f"shard.{modality}")
    t = time.perf_counter()
    m = shard(modality, cfg, raw, out, seed=0)
    dt = time.perf_counter() - t
    n_all = sum(e["samples"] for e in m["splits"].values())
    res = {"write_samples_s": n_all / dt, "write_MB_s": shard_bytes(out) / dt / 1e6, "samples": n_all}

    split = max(m["splits"], key=lambda s: m["splits"][s]["samples"])
    mode = "pretrain" if split == "pretrain" else "finetune"
    entry = m["splits"][split]
    n, nbytes = entry["samples"], shard_bytes(out, split)
    res["read_split"] = f"{split} ({mode})"
    t = time.perf_counter()
    for s in entry["shards"]:
        for _ in iter_shard(out / s["file"], s["samples"]):
            pass
    dt = time.perf_counter() - t
    res.update({"read_tar_samples_s": n / dt, "read_tar_MB_s": nbytes / dt / 1e6})

    model_cfg = get(modality).model_config(MODEL[modality])
    for workers in (0, 2):
        spec = LoaderSpec(batch_size=batch_size, mode=mode, seed=0, num_workers=workers, **LOADER[modality])
        loader = build_loader(out, split, model_cfg, spec)
        t = time.perf_counter()
        seen = sum(len(b["keys"]) for b in loader)
        dt = time.perf_counter() - t
        assert seen == n, (seen, n)
        res[f"read_batches_w{workers}_samples_s"] = n / dt
        res[f"read_batches_w{workers}_MB_s"] = nbytes / dt / 1e6
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modalities", nargs="+", default=["image", "text", "audio"])
    p.add_argument("--raw", type=Path, default=None, help="use <raw>/<m> instead of preparing a sample")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="d2v-bench-") as tmp:
        for m in args.modalities:
            raw = args.raw / m if args.raw else Path(tmp) / "raw" / m
            if args.raw is None:
                cfg = from_dict(data_module(m).PrepareConfig, SAMPLE[m], f"prepare.{m}")
                print(f"preparing a sample of the default {m} data ...", file=sys.stderr)
                prepare_raw(m, cfg, raw, seed=0)
            results[m] = bench(m, raw, Path(tmp) / "shards" / m, args.batch_size)
    cols = ["read_split", "samples", "write_samples_s", "write_MB_s", "read_tar_samples_s", "read_tar_MB_s",
            "read_batches_w0_samples_s", "read_batches_w0_MB_s", "read_batches_w2_samples_s",
            "read_batches_w2_MB_s"]  # fmt: skip
    print("| modality | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m, r in results.items():
        cells = [
            r[c] if isinstance(r[c], str) else f"{r[c]:,.0f}" if r[c] >= 100 else f"{r[c]:.1f}" for c in cols
        ]
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
