"""What one change to the step gains: one process, the step with and without it, turn by turn.

    python benchmarks/step_ab.py CHANGE [--modalities audio text] [--dtypes fp32 bf16] [--rounds 10]
        [--preset small] [--algorithm data2vec]

CHANGE is one of

- ``dropout-mask``: the CPU dropout mask from ``torch.rand(shape) >= p`` (d2v's until stop 23: one 32-bit
  Mersenne-Twister draw an element) against ``d2v.transformer.keep_mask`` (four elements a 64-bit draw);
  after the steps, the same for the mask alone at the text step's attention-weight shape;
- ``time-windows``: the speech conv stack's windows through aten's ``unfold`` (its generic
  ``unfold_backward`` scatter; d2v's until stop 24) against ``d2v.modalities.audio.model.time_windows``;
- ``attention-layout``: the CPU attention with gradients as it was until stop 26 (q, k, v unbound from a
  permute of the projection, ``k^T`` copied by its matmul, the output's gradient copied by both matmuls
  of its backward) against ``d2v.transformer.Attention.forward`` (bit-identical results).

For each modality x dtype it builds the step of ``benchmarks/step.py`` (the demo's shapes), runs two
warm-up steps, then alternates the two arms, one timed step each, and prints the median milliseconds per
step of both and their ratio. Alternating in one process keeps the machine's drift out of the comparison.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import DTYPES, ROOT, D2VStep, configs, make_batches  # noqa: E402

from d2v import transformer  # noqa: E402
from d2v.config import load_params  # noqa: E402
from d2v.hostmem import retain_freed_memory  # noqa: E402
from d2v.modalities import MODALITIES  # noqa: E402
from d2v.modalities.audio import model as audio_model  # noqa: E402


def rand_keep_mask(shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The mask before stop 23: keep where ``torch.rand >= p``, scaled by 1 / (1 - p)."""
    return torch.rand(shape).ge_(p).mul_(1.0 / (1.0 - p)).to(dtype)


def aten_windows(x_BTC: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """The windows before stop 24: aten's unfold and its ``unfold_backward``."""
    return x_BTC.unfold(1, k, s).flatten(2)


def permuted_attention(self, x_BTD: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``Attention.forward`` before stop 26, on the CPU math path it changed."""
    B, T, D = x_BTD.shape
    q, k, v = self.qkv(x_BTD).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
    p = self.dropout if self.training else 0.0
    if not (torch.is_grad_enabled() and (p > 0.0 or transformer.math_path(q))):
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    else:
        s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if mask is None:
            w = s.softmax(-1)
        elif mask.dtype == torch.bool:
            w = transformer._safe_softmax(s.masked_fill(~mask, float("-inf")), -1)
        else:
            w = (s + mask).softmax(-1)
        y = transformer.dropout(w, p, True) @ v
    return self.proj(y.transpose(1, 2).reshape(B, T, D))


# change -> (module, attribute, {arm name: implementation}), the arm in use now last
CHANGES: dict[str, tuple[object, str, dict[str, Callable]]] = {
    "dropout-mask": (
        transformer, "keep_mask", {"torch.rand": rand_keep_mask, "16-bit lanes": transformer.keep_mask}
    ),
    "time-windows": (
        audio_model, "time_windows", {"aten unfold": aten_windows, "own backward": audio_model.time_windows}
    ),
    "attention-layout": (
        transformer.Attention, "forward",
        {"permuted": permuted_attention, "unbind(2)": transformer.Attention.forward},
    ),
}  # fmt: skip
TOUCHES = {
    "dropout-mask": ["audio", "text"],
    "time-windows": ["audio"],
    "attention-layout": ["audio", "image", "text"],
}  # modalities with that code


def alternate(change: str, run: Callable[[], None], rounds: int) -> dict[str, float]:
    """Median seconds of ``run()`` under each arm of ``change``, the arms taking turns."""
    module, attr, arms = CHANGES[change]
    times: dict[str, list[float]] = {k: [] for k in arms}
    try:
        for _ in range(rounds):
            for name, fn in arms.items():
                setattr(module, attr, fn)
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    finally:
        setattr(module, attr, list(arms.values())[-1])
    return {k: statistics.median(v) for k, v in times.items()}


def row(label: str, med: dict[str, float]) -> str:
    a, b = (v * 1e3 for v in med.values())
    return f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("change", choices=list(CHANGES))
    ap.add_argument("--modalities", nargs="+", default=None, choices=MODALITIES,
                    help="default: those the change touches")  # fmt: skip
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--algorithm", default="data2vec", choices=["data2vec", "data2vec2"])
    args = ap.parse_args(argv)
    retain_freed_memory()  # as the CLI runs
    params = load_params(ROOT / "params.yaml")
    arms = list(CHANGES[args.change][2])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {args.algorithm}"
    )
    print(f"| step (ms) | {arms[0]} | {arms[1]} | speed-up |")
    print("|---|---|---|---|")
    for m in args.modalities or TOUCHES[args.change]:
        model_cfg, pcfg = configs(params, m, args.preset, args.algorithm)
        batches = make_batches(m, model_cfg, pcfg)
        for dtype in args.dtypes:
            step = D2VStep(m, model_cfg, pcfg, dtype)
            for i in range(2):
                step(batches[i])
            feed = itertools.cycle(batches)
            med = alternate(args.change, lambda step=step, feed=feed: step(next(feed)), args.rounds)
            print(row(f"{m} {dtype}", med), flush=True)
    if args.change == "dropout-mask":
        shape = (16, 4, 128, 128)  # the text step's attention weights
        x = torch.randn(shape)
        med = alternate(args.change, lambda: transformer.dropout(x, 0.1, True), args.rounds * 10)
        print(row(f"one mask + multiply, {list(shape)} fp32", med))
    return 0


if __name__ == "__main__":
    sys.exit(main())
