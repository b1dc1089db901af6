"""What one change to the step gains: one process, the step under each of the change's two arms, turn by turn.

    python benchmarks/step_ab.py CHANGE [--modalities audio image text] [--dtypes fp32 bf16] [--rounds N]
        [--preset small] [--algorithm data2vec]

CHANGE is one of

- ``hostmem``: glibc's malloc thresholds at their start-up values (mmap and trim thresholds 128 KiB, the
  heap trimmed on each switch) against ``d2v.hostmem.retain_freed_memory``'s (freed host memory stays in
  the process, as every ``d2v`` command runs); glibc only; 8 rounds unless told.

For each modality x dtype (modalities: those the change touches unless told) it builds the step of
``benchmarks/step.py`` (the demo's shapes), runs three warm-up steps, then alternates the arms: on each
switch the change's settling steps (one for ``hostmem``, so the heap settles under the new setting), then
one timed step. It prints, for both arms, the median milliseconds and minor page faults per timed step, and
the ratio of the milliseconds. Alternating in one process keeps the machine's drift out of the comparison.

To A/B a change to the code, add an entry to ``CHANGES`` whose arms :func:`patch` the old implementation (a
frozen copy kept here) and the current one onto their module, the current one last (the harness switches
back to it afterwards); retire the copy once its result is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import itertools
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import DTYPES, ROOT, D2VStep, configs, make_batches  # noqa: E402

from d2v import hostmem  # noqa: E402
from d2v.config import load_params  # noqa: E402
from d2v.modalities import MODALITIES  # noqa: E402


@dataclass(frozen=True)
class Change:
    """Two ways of running the step; each arm switches the process to itself."""

    arms: dict[str, Callable[[], None]]  # arm name -> switch to it; the current code's arm last
    touches: tuple[str, ...]  # the modalities whose step it changes (the default ``--modalities``)
    rounds: int = 10  # the default ``--rounds``
    settle: int = 0  # untimed steps after each switch


def patch(module: object, attr: str, impl: Callable) -> Callable[[], None]:
    """An arm that puts ``impl`` in ``module.<attr>``."""
    return functools.partial(setattr, module, attr, impl)


GLIBC_START = 128 * 1024  # both thresholds' values at process start


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def glibc_defaults() -> None:
    libc().mallopt(hostmem.M_MMAP_THRESHOLD, GLIBC_START)
    libc().mallopt(hostmem.M_TRIM_THRESHOLD, GLIBC_START)
    libc().malloc_trim(0)


def retained() -> None:
    libc().mallopt(hostmem.M_MMAP_THRESHOLD, hostmem.MMAP_THRESHOLD)
    libc().mallopt(hostmem.M_TRIM_THRESHOLD, hostmem.TRIM_THRESHOLD)


CHANGES: dict[str, Change] = {
    "hostmem": Change(
        {"glibc defaults": glibc_defaults, "retained": retained},
        ("audio", "image", "text"),
        rounds=8,
        settle=1,
    ),
}


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternate(change: Change, run: Callable[[], None], rounds: int) -> dict[str, tuple[float, float]]:
    """Median seconds and page faults of ``run()`` under each arm of ``change``, the arms taking turns; the
    current arm in place afterwards."""
    res: dict[str, list[tuple[float, int]]] = {k: [] for k in change.arms}
    try:
        for _ in range(rounds):
            for name, switch in change.arms.items():
                switch()
                for _ in range(change.settle):
                    run()
                f, t = faults(), time.perf_counter()
                run()
                res[name].append((time.perf_counter() - t, faults() - f))
    finally:
        list(change.arms.values())[-1]()
    return {
        k: (statistics.median(s for s, _ in v), statistics.median(n for _, n in v)) for k, v in res.items()
    }


def row(label: str, med: dict[str, tuple[float, float]]) -> str:
    (a, fa), (b, fb) = med.values()
    return f"| {label} | {a * 1e3:.1f} | {fa:,.0f} | {b * 1e3:.1f} | {fb:,.0f} | {a / b:.2f}x |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("change", choices=list(CHANGES))
    ap.add_argument("--modalities", nargs="+", default=None, choices=MODALITIES,
                    help="default: those the change touches")  # fmt: skip
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=None, help="default: the change's")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--algorithm", default="data2vec", choices=["data2vec", "data2vec2"])
    args = ap.parse_args(argv)
    change = CHANGES[args.change]
    hostmem.retain_freed_memory()  # as the CLI runs
    params = load_params(ROOT / "params.yaml")
    a, b = change.arms
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {args.algorithm}"
    )
    print(f"| step | {a}: ms | faults | {b}: ms | faults | speed-up |")
    print("|---|---|---|---|---|---|")
    for m in args.modalities or change.touches:
        model_cfg, pcfg = configs(params, m, args.preset, args.algorithm)
        batches = make_batches(m, model_cfg, pcfg)
        for dtype in args.dtypes:
            step = D2VStep(m, model_cfg, pcfg, dtype)
            feed = itertools.cycle(batches)
            for _ in range(3):
                step(next(feed))
            med = alternate(
                change, lambda step=step, feed=feed: step(next(feed)), args.rounds or change.rounds
            )
            print(row(f"{m} {dtype}", med), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
