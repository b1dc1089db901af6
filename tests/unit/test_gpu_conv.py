"""d2v/gpu_conv.py: the Triton grouped convs against ``F.conv2d``, forward and both gradients.

Without a GPU they run in Triton's CPU interpreter, in a subprocess (the interpreter is chosen when triton's
kernels are defined, so not in this process, where d2v is imported already): every forward config the
autotuner may pick and every weight-gradient candidate, at image borders, odd sizes, 1-D and 2-D kernels,
groups whose widths are not powers of two, and inside a ``torch.compile``d decoder. On CUDA:
tests/gpu/test_cuda_training.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, torch.nn.functional as F
    from d2v import gpu_conv
    from d2v.decoder import ConvDecoder, DecoderConfig

    def err(a, b):
        return float((a - b).abs().max() / b.abs().max())

    def conv_errors(B, H, W, cin, cout, G, KH, KW):
        torch.manual_seed(B * H * W + cin + KH)
        x = torch.randn(B, H, W, cin, requires_grad=True)
        w = torch.randn(cout, cin // G, KH, KW, requires_grad=True)
        y = gpu_conv.conv_nhwc(x, w, G)
        ref = F.conv2d(x.permute(0, 3, 1, 2), w, padding=(KH // 2, KW // 2), groups=G).permute(0, 2, 3, 1)
        g = torch.randn_like(ref)
        got, want = (y, *torch.autograd.grad(y, (x, w), g)), (ref, *torch.autograd.grad(ref, (x, w), g))
        return [err(a, b) for a, b in zip(got, want)]

    # (B, H, W, Cin, Cout, groups, KH, KW): 3 x 3 on a small grid (every pixel near a border), 1-D kernels,
    # widths that are not powers of two (24, 48), Cin != Cout, a dense conv, 1 x 1, more pixels than a tile.
    shapes = [(2, 3, 5, 32, 32, 4, 3, 3), (2, 1, 9, 32, 16, 2, 1, 7), (1, 4, 4, 8, 8, 1, 3, 3),
              (3, 14, 14, 48, 48, 2, 1, 1), (2, 1, 20, 96, 48, 2, 1, 5), (2, 5, 7, 96, 48, 2, 3, 3)]
    out = {}
    for i, cfg in enumerate(gpu_conv._CONFIGS):  # each forward config on two shapes, each shape on config 0
        gpu_conv.interpret_config = cfg
        for s in shapes if i == 0 else shapes[-2:]:
            out[f"config {i} {s}"] = conv_errors(*s)
    gpu_conv.interpret_config = gpu_conv._CONFIGS[0]
    for cand in gpu_conv._WGRAD_CANDIDATES[1:]:  # the weight-gradient launches the GPU may pick
        gpu_conv.interpret_wgrad = cand
        out[f"wgrad {cand}"] = conv_errors(*shapes[-1])

    # The image decoder with and without the kernels, eager and compiled whole (the custom ops are opaque).
    torch.manual_seed(0)
    dec = ConvDecoder(DecoderConfig(layers=2, kernel=3, dim=32, groups=4), 48, (3, 4))
    x = torch.randn(3, 12, 48, requires_grad=True)
    results = {}
    for name, enabled, compiled in [("triton", True, False), ("compiled", True, True), ("aten", False, False)]:
        gpu_conv.ENABLED = enabled
        f = torch.compile(dec, backend="aot_eager", fullgraph=True) if compiled else dec
        y = f(x)
        results[name] = [y, *torch.autograd.grad(y, [x, *dec.parameters()], torch.ones_like(y))]
    for name in ("triton", "compiled"):
        out[f"decoder {name}"] = [err(a, b) for a, b in zip(results[name], results["aten"])]
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # about 50 s on epyc-2c: CI runs it (.ci/run)
def test_kernels_match_conv2d_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 6 + 2 * 8 + 5 + 2, sorted(errors)  # every case ran
    bad = {k: v for k, v in errors.items() if max(v) > 1e-5}  # fp32 sums in another order: ~1e-7
    assert not bad, bad
