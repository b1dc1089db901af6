"""What ``d2v.hostmem.retain_freed_memory`` gains: one process, the two malloc settings step by step.

    python benchmarks/hostmem_ab.py [--modalities audio image text] [--dtypes fp32 bf16] [--rounds 8]
        [--preset small]

For each modality x dtype it builds the data2vec 1.0 step of ``benchmarks/step.py`` (the demo's shapes) and
alternates glibc's malloc thresholds between its start-up values (mmap threshold 128 KiB, trim threshold
128 KiB, memory trimmed on the switch) and ``d2v.hostmem``'s, one settling step and one timed step each, and
prints the median milliseconds and page faults per step of both. Alternating in one process keeps the
machine's drift out of the comparison. glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import ROOT, D2VStep, configs, make_batches  # noqa: E402

from d2v import hostmem  # noqa: E402
from d2v.config import load_params  # noqa: E402
from d2v.modalities import MODALITIES  # noqa: E402

GLIBC_START = 128 * 1024  # both thresholds' values at process start


def settings(libc: ctypes.CDLL, retain: bool) -> None:
    if retain:
        libc.mallopt(hostmem.M_MMAP_THRESHOLD, hostmem.MMAP_THRESHOLD)
        libc.mallopt(hostmem.M_TRIM_THRESHOLD, hostmem.TRIM_THRESHOLD)
    else:
        libc.mallopt(hostmem.M_MMAP_THRESHOLD, GLIBC_START)
        libc.mallopt(hostmem.M_TRIM_THRESHOLD, GLIBC_START)
        libc.malloc_trim(0)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args(argv)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    params = load_params(ROOT / "params.yaml")
    print(
        "| modality | dtype | glibc defaults: ms / step | faults / step | retained: ms / step | faults / step |"
    )
    print("|---|---|---|---|---|---|")
    for m in args.modalities:
        model_cfg, pcfg = configs(params, m, args.preset, "data2vec")
        batches = make_batches(m, model_cfg, pcfg)
        for dtype in args.dtypes:
            step = D2VStep(m, model_cfg, pcfg, dtype)
            for i in range(3):
                step(batches[i % 4])
            res: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
            for r in range(args.rounds):
                for retain in (False, True):
                    settings(libc, retain)
                    step(batches[r % 4])  # one step to settle the heap under the new setting
                    f, t = faults(), time.perf_counter()
                    step(batches[(r + 1) % 4])
                    res[retain].append((time.perf_counter() - t, faults() - f))
            cells = [
                f"{statistics.median(s for s, _ in res[k]) * 1e3:.0f} | {statistics.median(n for _, n in res[k]):,.0f}"
                for k in (False, True)
            ]
            print(f"| {m} | {dtype} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
