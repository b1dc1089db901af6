"""Shard-writing and shard-reading throughput per modality on this machine.

Prepares a sample of the embedded default data into a temporary folder (or uses ``--raw``), then times
- write: the ``shard`` stage (scan, split, decode/resample/encode, tar + sha256, manifest);
- read tar: the raw tar stream of the largest split (``iter_shard``: bytes only);
- read batches: ``build_loader`` over that split (decode, crop/augment, collate, + masks in 'pretrain' mode)
  with 0 and 2 DataLoader workers (worker start-up is included, so small splits understate the gain).
MB/s counts shard bytes on disk.

With ``--url URL`` (shards in object storage: any fsspec URL, published with ``d2v.data.shards
.publish_shards`` to ``URL/<m>``) or ``--s3-moto`` (a local S3-compatible moto server, started here as its
own process so it does not share the loader's GIL: a store on another machine would not), it also times the
pretraining loader (split ``pretrain``, mode 'pretrain') over the local folder and over the URL, 0 and 2
workers, each pass from ``build_loader`` on (at a URL that includes the manifest, side files and listing),
and prints samples/s side by side. Usage::

    .venv/bin/python benchmarks/data_throughput.py [--modalities image text audio] [--raw data/raw]
        [--s3-moto | --url s3://bucket/prefix] [--passes 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from d2v.config import from_dict
from d2v.data import LoaderSpec, build_loader, data_module, iter_shard, prepare_raw, read_manifest, shard
from d2v.data.remote import shard_location
from d2v.data.shards import publish_shards
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


def pretrain_rate(modality: str, shard_dir, batch_size: int, workers: int, passes: int) -> float:
    """Samples/s of the pretraining loader over ``shard_dir`` (a folder or a URL): the best of ``passes``
    epochs, each from ``build_loader`` to its last batch."""
    model_cfg = get(modality).model_config(MODEL[modality])
    best = 0.0
    for epoch in range(passes):
        spec = LoaderSpec(batch_size=batch_size, mode="pretrain", seed=0, num_workers=workers, epoch=epoch,
                          **LOADER[modality])  # fmt: skip
        t = time.perf_counter()
        seen = sum(len(b["keys"]) for b in build_loader(shard_dir, "pretrain", model_cfg, spec))
        best = max(best, seen / (time.perf_counter() - t))
    return best


def bench_remote(modality: str, out: Path, root: str, batch_size: int, passes: int) -> dict[str, float | str]:
    """Publish ``out`` to ``<root>/<modality>``; the pretraining loader's samples/s over both."""
    url = str(shard_location(root, modality))
    t = time.perf_counter()
    publish_shards(out, url)
    res: dict[str, float | str] = {
        "url": url,
        "publish_MB_s": shard_bytes(out) / (time.perf_counter() - t) / 1e6,
    }
    for workers in (0, 2):
        for where, loc in (("local", out), ("url", url)):
            res[f"pretrain_{where}_w{workers}_samples_s"] = pretrain_rate(
                modality, loc, batch_size, workers, passes
            )
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str = "d2v-bench") -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in its own process, the AWS variables pointing at it (as a user's
    would), and a fresh bucket; yields ``s3://<bucket>/shards``."""
    import s3fs  # pip install -e '.[test]' (s3fs, moto[server])

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                             "AWS_ENDPOINT_URL_S3")}  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto server on port {port} did not start (python -m moto.server)")
            time.sleep(0.2)
        os.environ.update({
            "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        })  # fmt: skip
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield f"s3://{bucket}/shards"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_remote(results: dict[str, dict]) -> None:
    cols = [f"pretrain_{w}_w{n}_samples_s" for n in (0, 2) for w in ("local", "url")]
    print("\n| modality | " + " | ".join(cols) + " | url/local w2 | url |")
    print("|---" * (len(cols) + 3) + "|")
    for m, r in results.items():
        if "remote" not in r:
            continue
        x = r["remote"]
        ratio = x["pretrain_url_w2_samples_s"] / x["pretrain_local_w2_samples_s"]
        print(f"| {m} | " + " | ".join(f"{x[c]:,.0f}" for c in cols) + f" | {ratio:.2f} | {x['url']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modalities", nargs="+", default=["image", "text", "audio"])
    p.add_argument("--raw", type=Path, default=None, help="use <raw>/<m> instead of preparing a sample")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--url", default=None, help="also read the shards from this URL root (published to <url>/<m>)"
    )
    where.add_argument("--s3-moto", action="store_true", help="also read them from a local moto S3 server")
    p.add_argument("--passes", type=int, default=2, help="epochs per remote comparison (the best counts)")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="d2v-bench-") as tmp, contextlib.ExitStack() as stack:
        root = stack.enter_context(moto_s3()) if args.s3_moto else args.url
        for m in args.modalities:
            raw = args.raw / m if args.raw else Path(tmp) / "raw" / m
            if args.raw is None:
                cfg = from_dict(data_module(m).PrepareConfig, SAMPLE[m], f"prepare.{m}")
                print(f"preparing a sample of the default {m} data ...", file=sys.stderr)
                prepare_raw(m, cfg, raw, seed=0)
            results[m] = bench(m, raw, Path(tmp) / "shards" / m, args.batch_size)
            if root is not None:
                results[m]["remote"] = bench_remote(
                    m, Path(tmp) / "shards" / m, root, args.batch_size, args.passes
                )
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
    print_remote(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
