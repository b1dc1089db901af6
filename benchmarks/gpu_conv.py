"""The data2vec 2.0 decoder's grouped convs on one GPU: d2v's Triton kernels (``d2v/gpu_conv.py``) against
cuDNN, forward + backward, at the ``base`` presets' shapes, in bf16; and the max error of each against
cuDNN in fp32.

    python benchmarks/gpu_conv.py [--images 128] [--frames 500] [--clips 64] [--reps 20] [--json out.json]

Shapes: image (16 clones of ``--images`` images, 14 x 14 patches, 768 channels, 16 groups, 3 x 3; six such
layers make the decoder), audio (first layer 768 -> 384 and then 384 -> 384, 16 groups, kernel 7, over
``--frames`` frames). Times are the median of ``--reps`` CUDA-event timed passes after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from d2v import gpu_conv
from d2v.decoder import ConvDecoder, DecoderConfig, conv_channels_last


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def fwd_bwd(module, x, g):
    def run():
        with torch.autocast("cuda", torch.bfloat16):
            y = module(x)
        y.backward(g)

    return run


def errors(module, x, g) -> dict[str, float]:
    """Max |bf16 result - fp32 reference| / max |reference| of y, dx and dW, for cuDNN and Triton in bf16."""

    def run(triton: bool, amp: bool):
        gpu_conv.ENABLED = triton
        x.grad = None
        module.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            y = module(x)
        y.float().backward(g.float())
        return y.float(), x.grad.float(), next(module.parameters()).grad.float()

    torch.backends.cudnn.allow_tf32 = False
    ref = run(False, False)
    torch.backends.cudnn.allow_tf32 = True
    out = {}
    for backend in ("cudnn", "triton"):
        for k, a, b in zip(("y", "dx", "dw"), run(backend == "triton", True), ref):
            out[f"{backend}_{k}"] = float((a - b).abs().max() / b.abs().max())
    gpu_conv.ENABLED = True
    return out


class OneConv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        if not gpu_conv.ENABLED:
            return conv_channels_last(self.conv, x)
        w = self.conv.weight if self.conv.weight.dim() == 4 else self.conv.weight[:, :, None]
        # the op itself, also for the 1-D convs, which the decoder leaves to cuDNN
        y = gpu_conv.conv_nhwc(x, w, self.conv.groups)
        return y + self.conv.bias.to(y.dtype)


def parts(B: int, reps: int) -> dict[str, float]:
    """One image decoder conv (bf16, no bias): forward, input gradient and weight gradient, each alone."""
    dev, G = torch.device("cuda"), 16
    x = torch.randn(B, 14, 14, 768, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.randn(768, 48, 3, 3, device=dev, dtype=torch.bfloat16) / 20
    nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  channels-last view, as the decoder passes it
    bwd = lambda mask: torch.ops.aten.convolution_backward(  # noqa: E731
        nchw(dy), nchw(x), w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], G, mask
    )
    fns = {
        "cudnn forward": lambda: torch.nn.functional.conv2d(nchw(x), w, padding=1, groups=G),
        "cudnn input grad": lambda: bwd([True, False, False]),
        "cudnn weight grad": lambda: bwd([False, True, False]),
        "triton forward": lambda: gpu_conv._conv(x, gpu_conv._pack(w, G), 768),
        "triton input grad": lambda: gpu_conv._conv(
            dy, gpu_conv._pack(gpu_conv.transposed_weight(w, G), G), 768
        ),
        "triton weight grad": lambda: gpu_conv._wgrad(x, dy, w.shape, G),
    }
    out = {k: timed(f, reps) for k, f in fns.items()}
    flop = 2 * B * 196 * 768 * 48 * 9
    for k, ms in out.items():
        print(f"{k:20s} {ms:7.2f} ms  {flop / ms / 1e9:6.1f} TFLOP/s", flush=True)
    print(
        f"forward config: {gpu_conv._conv_tuned.best_config}; weight grad: {gpu_conv._WGRAD_BEST}", flush=True
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--frames", type=int, default=500, help="audio: 10 s at 50 Hz")
    ap.add_argument("--clips", type=int, default=64, help="audio: clips x clones a step")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not gpu_conv.available(
        torch.empty(0, device="cuda"), torch.empty(16, 16)
    ):
        sys.exit("needs a CUDA GPU and Triton")
    torch.backends.cudnn.benchmark = True  # as d2v pretrain for images (Encoder.static_shapes)
    dev = torch.device("cuda")
    B = args.images * 16
    cases = {
        "image conv 768->768 3x3 g16": (
            OneConv(nn.Conv2d(768, 768, 3, padding=1, groups=16)),
            (B, 14, 14, 768),
        ),
        "image decoder (6 layers)": (
            ConvDecoder(DecoderConfig(layers=6, kernel=3, dim=768, groups=16), 768, (14, 14)),
            (B, 196, 768),
        ),
        "audio conv 768->384 k7 g16": (
            OneConv(nn.Conv1d(768, 384, 7, padding=3, groups=16)),
            (args.clips, 1, args.frames, 768),
        ),
        "audio conv 384->384 k7 g16": (
            OneConv(nn.Conv1d(384, 384, 7, padding=3, groups=16)),
            (args.clips, 1, args.frames, 384),
        ),
    }
    results = {
        "device": torch.cuda.get_device_name(),
        "images": args.images,
        "parts": parts(B, args.reps),
        "cases": {},
    }
    for name, (module, shape) in cases.items():
        module = module.to(dev)
        x = torch.randn(shape, device=dev, requires_grad=True)
        with torch.no_grad():
            g = torch.randn_like(module(x))
        r = {"errors": errors(module, x, g)}
        for backend in ("cudnn", "triton"):
            gpu_conv.ENABLED = backend == "triton"
            r[f"{backend}_ms"] = timed(fwd_bwd(module, x, g.bfloat16()), args.reps)
        gpu_conv.ENABLED = True
        results["cases"][name] = r
        e = r["errors"]
        err = "  ".join(
            f"{b} y/dx/dW {e[b + '_y']:.1e}/{e[b + '_dx']:.1e}/{e[b + '_dw']:.1e}"
            for b in ("cudnn", "triton")
        )
        print(f"{name:28s} cudnn {r['cudnn_ms']:7.2f} ms  triton {r['triton_ms']:7.2f} ms  "
              f"({r['cudnn_ms'] / r['triton_ms']:.2f}x)  error vs fp32: {err}", flush=True)  # fmt: skip
        del module, x, g
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
