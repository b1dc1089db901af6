"""What ``d2v.transformer.keep_mask`` (16-bit lanes) gains over ``torch.rand`` masks: one process, step by step.

    python benchmarks/dropout_ab.py [--modalities audio text] [--dtypes fp32 bf16] [--rounds 10]
        [--preset small] [--algorithm data2vec]

For each modality x dtype it builds the step of ``benchmarks/step.py`` (the demo's shapes) and alternates
the CPU dropout mask between ``torch.rand(shape) >= p`` (d2v's mask until stop 23: one 32-bit
Mersenne-Twister draw an element) and ``keep_mask`` (four elements a 64-bit draw), one timed step each,
and prints the median milliseconds per step of both and their ratio; then the same for the mask alone at
the text step's largest shape. Alternating in one process keeps the machine's drift out of the comparison.
Image's recipe has no dropout: nothing to compare there.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import ROOT, D2VStep, configs, make_batches  # noqa: E402

from d2v import transformer  # noqa: E402
from d2v.config import load_params  # noqa: E402
from d2v.hostmem import retain_freed_memory  # noqa: E402

LANES = transformer.keep_mask


def rand_keep_mask(shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The mask before stop 23: keep where ``torch.rand >= p``, scaled by 1 / (1 - p)."""
    return torch.rand(shape).ge_(p).mul_(1.0 / (1.0 - p)).to(dtype)


ARMS = {"torch.rand": rand_keep_mask, "16-bit lanes": LANES}


def alternate(run, rounds: int) -> dict[str, float]:
    """Median seconds of ``run()`` under each arm's mask, the arms taking turns."""
    times: dict[str, list[float]] = {k: [] for k in ARMS}
    for _ in range(rounds):
        for name, fn in ARMS.items():
            transformer.keep_mask = fn
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    transformer.keep_mask = LANES
    return {k: statistics.median(v) for k, v in times.items()}


def row(label: str, med: dict[str, float]) -> str:
    a, b = (med[k] * 1e3 for k in ARMS)
    return f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modalities", nargs="+", default=["audio", "text"], choices=["audio", "text"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--algorithm", default="data2vec", choices=["data2vec", "data2vec2"])
    args = ap.parse_args(argv)
    retain_freed_memory()  # as the CLI runs
    params = load_params(ROOT / "params.yaml")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {args.algorithm}"
    )
    print("| step (ms) | torch.rand masks | 16-bit lanes | speed-up |")
    print("|---|---|---|---|")
    for m in args.modalities:
        model_cfg, pcfg = configs(params, m, args.preset, args.algorithm)
        batches = make_batches(m, model_cfg, pcfg)
        for dtype in args.dtypes:
            step = D2VStep(m, model_cfg, pcfg, dtype)
            for i in range(2):
                step(batches[i])
            feed = itertools.cycle(batches)
            med = alternate(lambda step=step, feed=feed: step(next(feed)), args.rounds)
            print(row(f"{m} {dtype}", med), flush=True)
    shape = (16, 4, 128, 128)  # the text step's attention weights
    x = torch.randn(shape)
    med = alternate(lambda: transformer.dropout(x, 0.1, True), args.rounds * 10)
    print(row(f"one mask + multiply, {list(shape)} fp32", med))
    return 0


if __name__ == "__main__":
    sys.exit(main())
