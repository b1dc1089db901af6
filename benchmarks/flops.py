"""Counted model FLOPs for the benchmarks: ``torch.utils.flop_counter.FlopCounterMode`` with one formula fixed
and one kernel added.

torch 2.11's formula for ``aten.convolution_backward`` counts a grouped convolution's weight gradient
``groups`` times: it sizes that gradient as a dense conv of the transposed shapes, where the group division
is lost (pytorch/pytorch#183405, merged after 2.11), so a grouped conv's backward counts (1 + groups) x its
forward instead of 2 x. Here it counts 2 x (d2v's grouped convs: speech's positional convs and every
data2vec 2.0 decoder, 16 groups). torch 2.11 has no formula for SDPA's fused CPU kernel (where the EMA
teacher's attention runs on CPU) and counts it 0; here it counts as torch counts SDPA's CUDA kernels (the
forward: the two ``bmm``s of the math path).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)


def _t(shape: list[int]) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


def conv_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding,
    groups, output_mask, out_shape,
) -> int:  # fmt: skip
    """torch's formula (grad input as the transposed conv; grad weight as a conv of the transposed shapes),
    the grad weight divided by ``groups``: each group's weights see only their own channels."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(_t(a), _t(b), _t(out_shape[1]), transposed=False) // groups
    return flops


def cpu_sdpa_flop(q_shape, k_shape, v_shape, *_args, out_shape=None, **_kwargs) -> int:
    """SDPA's fused CPU kernel, forward: as torch counts its CUDA kernels."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def cpu_sdpa_backward_flop(grad_shape, q_shape, k_shape, v_shape, *_args, out_shape=None, **_kwargs) -> int:
    """SDPA's fused CPU kernel, backward: as torch counts its CUDA kernels."""
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode(display=False)`` with :func:`conv_backward_flop` for ``aten.convolution_backward``
    and formulas for SDPA's fused CPU kernel."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten.convolution_backward: conv_backward_flop,
            aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flop,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward_flop,
        },
    )
