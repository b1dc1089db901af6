"""Where the CPU step's time goes, by aten op, and how fast its matmuls run against the fp32 peak.

    python benchmarks/cpu_breakdown.py [--modalities image text] [--dtype fp32] [--steps 4] [--top 12]

For each modality, the step of ``benchmarks/step.py`` (data2vec 1.0, the demo's shapes):
- every aten op timed by wall clock around its call (a ``TorchDispatchMode``; forward, backward, AdamW,
  clipping and EMA), summed by kind: matmuls (``mm``, ``addmm``, ``bmm``), the fused CPU attention, and
  the rest (element-wise, reductions, copies); the step's wall time beside, the gap being Python,
  autograd's bookkeeping and the mode's own cost;
- each matmul call of the step (op, operand shapes, strides and dtypes: ``addmm`` with its bias, the
  transposed weights as the step holds them) in GFLOP/s in the step, and replayed alone on fresh operands of
  the same layout, hot (the same operands call after call) and after a pass over ``--flush-mb`` MB,
  against a 2048^3 matmul timed in the same run; then all calls together;
- the same step at 2 samples a batch: a bound on the cost per step that does not grow with the batch;
- ``--fusion``: what fusing the element-wise work could gain, two regions of a block at the step's token
  count, forward + backward, eager against ``torch.compile`` (inductor's fused C++ kernels): residual +
  layer-scale x drop-path + LayerNorm, and bias + GELU after the FFN's first matmul.
torch.profiler's per-op CPU times can charge one op with time that is not its own (benchmarks/RESULTS.md),
hence the wall-clock mode.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import DTYPES, ROOT, D2VStep, configs, make_batches, matmul_seconds  # noqa: E402

from d2v.config import load_params  # noqa: E402
from d2v.hostmem import retain_freed_memory  # noqa: E402
from d2v.modalities import MODALITIES  # noqa: E402

MATMULS = ("aten.mm.", "aten.addmm.", "aten.bmm.")


class OpTimes(TorchDispatchMode):
    """Wall seconds per aten op, and per matmul call signature (op, operand shapes and strides)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.matmuls: dict[tuple, list[float]] = collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t
        self.seconds[name] += dt
        if name.startswith(MATMULS) and not kwargs:
            sig = tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, torch.Tensor))
            self.matmuls[(name.split(".")[1], sig)].append(dt)
        return out


def matmul_flops(sig: tuple) -> int:
    """2 M K N (times the batch for ``bmm``) of one call; ``addmm``'s first operand is the bias."""
    (*_, a, b) = (shape for shape, _, _ in sig)
    return 2 * math.prod(a) * b[-1]


def replay_seconds(op: str, sig: tuple, flush: torch.Tensor | None, n: int = 9) -> float:
    """Median seconds of one call of ``op`` on fresh operands of the signature's shapes and strides (the
    bias of ``addmm`` included): hot, the same operands call after call, or, with ``flush``, after a pass
    over the buffer (outside the timed call), which takes the operands out of the caches it is larger than."""
    g = torch.Generator().manual_seed(0)
    args = [
        torch.randn(1 + sum((d - 1) * st for d, st in zip(shape, stride)), generator=g)
        .to(dtype)
        .as_strided(shape, stride)
        for shape, stride, dtype in sig
    ]
    fn = getattr(torch, op)
    times = []
    for i in range(n + 2):
        if flush is not None:
            flush.add_(1.0)
        t = time.perf_counter()
        fn(*args)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def kind(op: str) -> str:
    if op.startswith(MATMULS):
        return "matmul"
    return "fused-attention" if "scaled_dot_product" in op else "other"


def median_seconds(fn, n: int, warmup: int = 2) -> float:
    """Median wall seconds of ``n`` calls of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def median_step(step, batches, n: int) -> float:
    feed = itertools.cycle(batches)
    return median_seconds(lambda: step(next(feed)), n)


def rate(gflops: float) -> str:
    """A GFLOP/s figure, 4 wide: whole numbers, two significant digits under 10 (a tiny call replayed on a
    busy machine runs under 1 GFLOP/s, which a whole number would print as 0)."""
    return f"{gflops:4.0f}" if gflops >= 10 else f"{gflops:4.2g}"


def matmul_calls(calls: dict[tuple, list[float]], steps: int, peak: float, flush_mb: int) -> None:
    """Each matmul call signature of the step: GFLOP/s in the step against the same call replayed alone, hot
    and after a pass over ``flush_mb`` MB; the largest first, then the totals."""
    flush = torch.empty(flush_mb * 2**20 // 4)
    print(f"  matmul calls (op: operand shapes) x calls a step: GFLOP/s in the step | alone: hot, after a "
          f"{flush_mb} MB pass (2048^3 peak {peak:.0f})")  # fmt: skip
    totals = collections.Counter()
    rows = []
    for (op, sig), times in calls.items():
        n, flops = len(times) / steps, matmul_flops(sig)
        hot, cold = replay_seconds(op, sig, None), replay_seconds(op, sig, flush)
        totals.update(flops=flops * n, step=sum(times) / steps, hot=hot * n, cold=cold * n)
        rows.append((flops * n, op, sig, n, flops * len(times) / sum(times) / 1e9, flops / hot / 1e9,
                     flops / cold / 1e9))  # fmt: skip
    for _, op, sig, n, r_step, r_hot, r_cold in sorted(rows, key=lambda r: -r[0])[:12]:
        shapes = " x ".join(str(tuple(shape)) for shape, _, _ in sig)
        print(f"    {op}: {shapes:44s} x{n:3.0f}  {rate(r_step)} | {rate(r_hot)}, {rate(r_cold)}  "
              f"({100 * r_step / peak:3.0f} % of peak in the step, {100 * r_hot / peak:3.0f} % hot)")  # fmt: skip
    f = totals["flops"] / 1e9
    print(f"    all {sum(len(t) for t in calls.values()) // steps} calls: {f / totals['step']:.0f} GFLOP/s in the "
          f"step ({1e3 * totals['step']:.1f} ms) | alone {f / totals['hot']:.0f} hot ({1e3 * totals['hot']:.1f} ms), "
          f"{f / totals['cold']:.0f} after the pass ({1e3 * totals['cold']:.1f} ms)")  # fmt: skip


def residual_norm(x, a, gamma, keep, w, b):
    """``h = x + drop_path(gamma * a)`` and the next LayerNorm of h (the pre-LN block's seams)."""
    h = x + (gamma * a) * keep
    return h, torch.nn.functional.layer_norm(h, h.shape[-1:], w, b, 1e-6)


def bias_gelu(y, bias):
    return torch.nn.functional.gelu(y + bias)


def fusion(rows: int, dim: int, ffn: int) -> None:
    """Eager against compiled, forward + backward, for ``rows`` tokens of width ``dim`` (FFN ``ffn``)."""
    torch.manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    x, a, gamma, w, b = leaf(rows, dim), leaf(rows, dim), leaf(dim), leaf(dim), leaf(dim)
    keep = (torch.rand(rows, 1) > 0.1).float() / 0.9
    y, bias = leaf(rows, ffn), leaf(ffn)

    def res(fn):
        h, o = fn(x, a, gamma, keep, w, b)
        (h.sum() + o.square().sum()).backward()

    def bg(fn):
        fn(y, bias).square().sum().backward()

    for name, run, fn in (("residual + LayerNorm", res, residual_norm), ("bias + GELU", bg, bias_gelu)):
        compiled = torch.compile(fn, dynamic=False)
        t = time.perf_counter()
        run(compiled)
        c = time.perf_counter() - t
        eager, fused = (1e3 * median_seconds(functools.partial(run, f), 20) for f in (fn, compiled))
        print(
            f"  {name:22s} [{rows} tokens] eager {eager:6.2f} ms, compiled {fused:6.2f} ms (compiled in {c:.0f} s)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=12, help="ops listed by time")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--flush-mb", type=int, default=64,
                    help="the buffer passed over before each matmul replayed 'after a pass' (64 MB: out of the "
                         "L2s; 1024: out of this host's L3 as well)")  # fmt: skip
    ap.add_argument("--fusion", action="store_true", help="also time two fused element-wise regions")
    args = ap.parse_args(argv)
    retain_freed_memory()  # as the CLI runs
    params = load_params(ROOT / "params.yaml")
    mm_dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, preset {args.preset}")
    for m in args.modalities:
        model_cfg, pcfg = configs(params, m, args.preset, "data2vec")
        batches = make_batches(m, model_cfg, pcfg)
        step = D2VStep(m, model_cfg, pcfg, args.dtype)
        wall = median_step(step, batches, args.steps)
        mode = OpTimes()
        with mode:
            for i in range(args.steps):
                step(batches[i % len(batches)])
        per_step = {k: v / args.steps for k, v in mode.seconds.items()}
        by_kind: dict[str, float] = collections.defaultdict(float)
        for op, s in per_step.items():
            by_kind[kind(op)] += s
        total = sum(per_step.values())
        print(f"\n## {m}: step {1e3 * wall:.1f} ms (no mode); ops {1e3 * total:.1f} ms a step under the mode")
        for k, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {k:18s} {1e3 * s:7.1f} ms  {100 * s / total:5.1f} % of op time")
        for op, s in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"    {op:48s} {1e3 * s:7.1f} ms")
        peak = 2 * 2048**3 / 1e9 / statistics.median(matmul_seconds(mm_dtype) for _ in range(5))
        matmul_calls(mode.matmuls, args.steps, peak, args.flush_mb)
        small = dataclasses.replace(pcfg, batch_size=2, grad_accum=1)
        s2 = median_step(
            D2VStep(m, model_cfg, small, args.dtype), make_batches(m, model_cfg, small), args.steps
        )
        B = pcfg.batch_size // pcfg.grad_accum
        print(f"  at 2 samples a batch: {1e3 * s2:.1f} ms a step; less 2/{B} of the full step's time: "
              f"{1e3 * (s2 - 2 / B * wall):.1f} ms that do not grow with the batch")  # fmt: skip
        if args.fusion:
            t = model_cfg.transformer
            # the blocks' matmuls (the most frequent call): their tokens a batch
            rows = max((len(ts), sig[-2][0][0]) for (op, sig), ts in mode.matmuls.items() if op != "bmm")[1]
            fusion(rows, t.dim, t.ffn_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
