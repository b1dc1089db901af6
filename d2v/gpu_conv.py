"""Grouped k x k convolutions of channels-last tensors on CUDA, as Triton kernels (the data2vec 2.0 decoder).

The image decoder's convs (spec §5.3: 16 groups of C/16 channels, 3 x 3 over the patch grid) are a small share
of a step's FLOPs but most of its GPU time under cuDNN: it has no fast channels-last kernel for them in bf16
and transposes every operand itself, which takes longer than the convs (the ``base`` image step's profile,
benchmarks/RESULTS.md).
Here each conv is an implicit GEMM over the [B, H, W, C] tensor the decoder already holds: a tile of pixels
times one group's [k*k*C/G, C'/G] weight, the k*k shifted reads masked at the borders (zero padding, stride 1).

- forward: ``_conv_kernel`` (pixels x out channels of one group, summed over taps and in channels; tile sizes
  autotuned per shape);
- input gradient: the same op on dy with the weight flipped and each group's channel axes swapped (stride 1,
  same padding: the transposed conv is a conv; ``transposed_weight``);
- weight gradient: ``_wgrad_kernel``, each program summing dy^T x over a slice of the pixels for one group
  and tap; the slices' fp32 partial sums are added in a fixed order, so it is deterministic.

At the ``base`` image step's shape (128 images x 16 clones, 768 channels; bf16) each part beats cuDNN's
(``python benchmarks/gpu_conv.py``; figures in benchmarks/RESULTS.md). Over 1-D sequences (the speech
decoder's kernel 7) cuDNN is faster, so the decoder uses these for 2-D convs only.

Exposed as the custom ops ``d2v::conv_nhwc`` and ``d2v::conv_nhwc_wgrad`` with an autograd formula: opaque
to ``torch.compile``, which still fuses the bias, norm and GELU around them. ``available`` says whether they
run (CUDA tensor, Triton importable, ``ENABLED``, a group's input channels <= 128); elsewhere the decoder calls
``F.conv2d``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder uses F.conv2d
    triton = None


ENABLED = triton is not None and os.environ.get("D2V_TRITON_CONV", "1") != "0"
"""Whether the decoder uses these kernels where they can run (``D2V_TRITON_CONV=0`` switches them off; the
benchmarks set it to compare with cuDNN). A module constant, so ``torch.compile`` guards on it."""
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the unit test)


def available(x: Tensor, weight: Tensor) -> bool:
    """Whether ``conv_nhwc`` runs for ``x`` and ``weight`` [Cout, Cin/G, ...]: Triton importable, ``ENABLED``, x
    on CUDA (or interpreted), and at most 128 input channels a group (one weight-gradient program holds them)."""
    return triton is not None and ENABLED and (x.is_cuda or _INTERPRET) and weight.shape[1] <= 128


if triton is not None:
    # (BLOCK_M pixels, BLOCK_N out channels, BLOCK_K in channels, warps, stages), autotuned per shape. The taps x
    # channel chunks are one runtime loop, which Triton software-pipelines (unrolled, with 64-bit offsets and
    # fewer weight-gradient programs per SM, the kernels were slower than cuDNN's: benchmarks/RESULTS.md).
    _CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for m, n, k, w, st in [
            (128, 64, 16, 4, 4), (128, 64, 32, 4, 3), (256, 64, 16, 8, 3), (128, 16, 16, 4, 4), (128, 32, 16, 4, 4),
            (64, 64, 16, 4, 4), (256, 32, 32, 8, 3), (128, 64, 64, 8, 2), (64, 16, 16, 2, 4),
        ]
    ]  # fmt: skip

    @triton.jit
    def _conv_kernel(
        X, Wp, Y, NPIX, H, W,
        CIN: tl.constexpr, COUT: tl.constexpr, CIN_G: tl.constexpr, COUT_G: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, WIDE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Y[p, g*COUT_G + n] = sum_{t, k} X[p + shift_t, g*CIN_G + k] * Wp[g, t, k, n] (zero outside the image).
        X [NPIX, CIN], Y [NPIX, COUT] (pixels p of [B, H, W] in order), Wp [G, KH*KW, CIN_G, COUT_G]. WIDE:
        64-bit offsets (tensors of 2^31 elements or more)."""
        pid_m, g, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        p = (pid_m.to(tl.int64) if WIDE else pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        col = p % W
        row = (p // W) % H
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        KCH: tl.constexpr = (CIN_G + BLOCK_K - 1) // BLOCK_K
        for it in range(KH * KW * KCH):
            t = it // KCH
            k = (it % KCH) * BLOCK_K + tl.arange(0, BLOCK_K)
            dh = t // KW - KH // 2
            dw = t % KW - KW // 2
            ok = (p < NPIX) & (row + dh >= 0) & (row + dh < H) & (col + dw >= 0) & (col + dw < W)
            a = tl.load(
                X + ((p + dh * W + dw) * CIN + g * CIN_G)[:, None] + k[None, :],
                mask=ok[:, None] & (k < CIN_G)[None, :],
                other=0.0,
            )
            b = tl.load(
                Wp + ((g * KH * KW + t) * CIN_G + k)[:, None] * COUT_G + n[None, :],
                mask=(k < CIN_G)[:, None] & (n < COUT_G)[None, :],
                other=0.0,
            )
            acc += tl.dot(a, b)
        out = Y + p[:, None] * COUT + g * COUT_G + n[None, :]
        tl.store(out, acc.to(Y.dtype.element_ty), mask=(p < NPIX)[:, None] & (n < COUT_G)[None, :])

    # The interpreter cannot time configs: the tests run each through ``interpret_config``.
    _conv_tuned = (
        _conv_kernel
        if _INTERPRET
        else triton.autotune(_CONFIGS, key=["CIN_G", "COUT_G", "KH", "KW", "WIDE"])(_conv_kernel)
    )
    interpret_config = _CONFIGS[0]

    @triton.jit
    def _wgrad_kernel(
        X, DY, P, NPIX, H, W,
        CIN: tl.constexpr, COUT: tl.constexpr, CIN_G: tl.constexpr, COUT_G: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, WIDE: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr,
    ):  # fmt: skip
        """P[s, g, t, co, ci] = sum over the pixels p of slice s (TILES tiles of BLOCK_M) of
        DY[p, g*COUT_G + co] * X[p + shift_t, g*CIN_G + ci]."""
        gt, s = tl.program_id(0), tl.program_id(1)
        g = gt // (KH * KW)
        t = gt % (KH * KW)
        dh = t // KW - KH // 2
        dw = t % KW - KW // 2
        co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        ci = tl.arange(0, BLOCK_CI)
        acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
        start = (s.to(tl.int64) if WIDE else s) * (TILES * BLOCK_M)
        for m in range(TILES):
            p = start + m * BLOCK_M + tl.arange(0, BLOCK_M)
            col = p % W
            row = (p // W) % H
            inside = p < NPIX
            ok = inside & (row + dh >= 0) & (row + dh < H) & (col + dw >= 0) & (col + dw < W)
            dy = tl.load(
                DY + (p * COUT + g * COUT_G)[:, None] + co[None, :],
                mask=inside[:, None] & (co < COUT_G)[None, :],
                other=0.0,
            )
            x = tl.load(
                X + ((p + dh * W + dw) * CIN + g * CIN_G)[:, None] + ci[None, :],
                mask=ok[:, None] & (ci < CIN_G)[None, :],
                other=0.0,
            )
            acc += tl.dot(tl.trans(dy), x)
        G: tl.constexpr = COUT // COUT_G
        out = P + (((s * G + g) * KH * KW + t) * COUT_G + co)[:, None] * CIN_G + ci[None, :]
        tl.store(out, acc, mask=(co < COUT_G)[:, None] & (ci < CIN_G)[None, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _wide(*tensors: Tensor) -> bool:
    return max(t.numel() for t in tensors) >= 2**31 - 2**24  # margin: offsets run past the last pixel's row


def _conv(x: Tensor, wp: Tensor, cout: int) -> Tensor:
    """x [B, H, W, Cin] contiguous, wp [G, KH, KW, Cin/G, Cout/G] -> [B, H, W, Cout]."""
    B, H, W, cin = x.shape
    G, KH, KW, cin_g, cout_g = wp.shape
    y = x.new_empty(B, H, W, cout)
    npix = B * H * W
    grid = lambda meta: (triton.cdiv(npix, meta["BLOCK_M"]), G, triton.cdiv(cout_g, meta["BLOCK_N"]))  # noqa: E731
    args = (x, wp.contiguous(), y, npix, H, W, cin, cout, cin_g, cout_g, KH, KW, _wide(x, y))
    if _INTERPRET:
        c = interpret_config
        _conv_kernel[grid(c.kwargs)](*args, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        _conv_tuned[grid](*args)
    return y


def _pack(w: Tensor, groups: int) -> Tensor:
    """[Cout, Cin/G, KH, KW] -> [G, KH, KW, Cin/G, Cout/G] (the forward's operand)."""
    cout, cin_g, kh, kw = w.shape
    return w.view(groups, cout // groups, cin_g, kh, kw).permute(0, 3, 4, 2, 1)


# Weight-gradient launch candidates: (BLOCK_M, programs per SM, BLOCK_CO cap, warps, stages); the fastest for
# each shape is kept on CUDA (``_wgrad``), as triton.autotune does for the forward.
_WGRAD_CANDIDATES = [(128, 4, 64, 4, 3), (128, 16, 64, 4, 3), (64, 16, 64, 4, 4), (256, 8, 64, 8, 3),
                     (128, 16, 16, 4, 3), (256, 16, 64, 8, 2)]  # fmt: skip
_WGRAD_BEST: dict[tuple, tuple] = {}
interpret_wgrad = _WGRAD_CANDIDATES[0]  # the interpreter cannot time them either: the tests set each in turn


def _wgrad_launch(x: Tensor, dy: Tensor, w_shape: torch.Size, groups: int, cand: tuple) -> Tensor:
    B, H, W, cin = x.shape
    cout, cin_g, KH, KW = w_shape
    cout_g = cout // groups
    npix = B * H * W
    block_m, per_sm, co_cap, warps, stages = cand
    # Enough programs to fill the GPU, each a power-of-two number of pixel tiles (a compile-time constant: few
    # distinct kernels however the batch's size varies).
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    block_co, block_ci = min(_pow2(cout_g), co_cap), _pow2(cin_g)
    per_gt = triton.cdiv(per_sm * sms, groups * KH * KW * triton.cdiv(cout_g, block_co))
    per_gt = max(1, min(triton.cdiv(npix, block_m), per_gt))
    tiles = triton.next_power_of_2(triton.cdiv(triton.cdiv(npix, per_gt), block_m))
    splits = triton.cdiv(npix, tiles * block_m)
    part = torch.empty(splits, groups, KH * KW, cout_g, cin_g, device=x.device, dtype=torch.float32)
    grid = (groups * KH * KW, splits, triton.cdiv(cout_g, block_co))
    _wgrad_kernel[grid](
        x, dy, part, npix, H, W, cin, cout, cin_g, cout_g, KH, KW, _wide(x, dy), block_ci, block_co, block_m, tiles,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    # (fixed order: deterministic) [G, KH*KW, Cout/G, Cin/G] -> [Cout, Cin/G, KH, KW]
    return part.sum(0).view(groups, KH, KW, cout_g, cin_g).permute(0, 3, 4, 1, 2).reshape(w_shape)


def _wgrad(x: Tensor, dy: Tensor, w_shape: torch.Size, groups: int) -> Tensor:
    if not x.is_cuda:  # the interpreter
        return _wgrad_launch(x, dy, w_shape, groups, interpret_wgrad)
    key = (tuple(x.shape), tuple(w_shape), groups)
    if key not in _WGRAD_BEST:
        times = {}
        for cand in _WGRAD_CANDIDATES:
            _wgrad_launch(x, dy, w_shape, groups, cand)  # compile
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(3):
                _wgrad_launch(x, dy, w_shape, groups, cand)
            b.record()
            b.synchronize()
            times[cand] = a.elapsed_time(b)
        _WGRAD_BEST[key] = min(times, key=times.get)
    return _wgrad_launch(x, dy, w_shape, groups, _WGRAD_BEST[key])


@torch.library.custom_op("d2v::conv_nhwc", mutates_args=())
def conv_nhwc(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Grouped conv, stride 1, same padding, no bias: x [B, H, W, Cin] (channels-last), weight [Cout, Cin/G,
    KH, KW] (odd KH, KW) -> [B, H, W, Cout], in x's dtype with fp32 accumulation."""
    return _conv(x.contiguous(), _pack(weight.to(x.dtype), groups), weight.shape[0])


@conv_nhwc.register_fake
def _(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("d2v::conv_nhwc_wgrad", mutates_args=())
def conv_nhwc_wgrad(x: Tensor, dy: Tensor, weight_shape: list[int], groups: int) -> Tensor:
    """The weight gradient of ``conv_nhwc``: x [B, H, W, Cin], dy [B, H, W, Cout] -> fp32 ``weight_shape``."""
    return _wgrad(x.contiguous(), dy.contiguous(), torch.Size(weight_shape), groups)


@conv_nhwc_wgrad.register_fake
def _(x: Tensor, dy: Tensor, weight_shape: list[int], groups: int) -> Tensor:
    return x.new_empty(weight_shape, dtype=torch.float32)


def transposed_weight(weight: Tensor, groups: int) -> Tensor:
    """The weight whose conv is ``conv_nhwc``'s input gradient (stride 1, same padding): taps flipped, each
    group's in and out channels swapped. [Cout, Cin/G, KH, KW] -> [Cin, Cout/G, KH, KW]."""
    cout, cin_g, kh, kw = weight.shape
    w = weight.view(groups, cout // groups, cin_g, kh, kw).transpose(1, 2).flip(3, 4)
    return w.reshape(groups * cin_g, cout // groups, kh, kw)


def _setup(ctx, inputs, output) -> None:
    x, weight, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.groups = groups


def _backward(ctx, dy: Tensor):
    x, weight = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = conv_nhwc(dy, transposed_weight(weight.to(dy.dtype), ctx.groups), ctx.groups)
    if ctx.needs_input_grad[1]:
        dw = conv_nhwc_wgrad(x, dy, list(weight.shape), ctx.groups).to(weight.dtype)
    return dx, dw, None


conv_nhwc.register_autograd(_backward, setup_context=_setup)
# Under autocast the op runs in bf16 as F.conv2d would (d2v autocasts to bf16 only: d2v/precision.py).
torch.library.register_autocast("d2v::conv_nhwc", "cuda", torch.bfloat16)
