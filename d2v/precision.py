"""Which dtype the matmuls run in: bf16 autocast where the hardware multiplies bf16, fp32 elsewhere.

Shared by training (``d2v.loop``) and inference (``d2v.evaluate``); a module of its own so that the
evaluate stage does not depend on the training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["bf16", "fp32"]


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16), so that oneDNN's bf16
    kernels beat fp32; without it bf16 is emulated and slower."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, None for fp32.

    'bf16' autocasts on CUDA and on a CPU with bf16 hardware (:func:`cpu_bf16`: there the step is faster than
    fp32's and the loss curve follows fp32's, benchmarks/RESULTS.md); elsewhere it runs fp32. As on CUDA,
    autocast lowers the matmuls/convs only: weights, optimizer state, the EMA teacher's weights, the targets
    and the loss stay fp32 (``d2v.data2vec`` computes them so).
    """
    if precision != "bf16":
        return None
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16()):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(precision: Precision, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` in :func:`autocast_dtype`'s dtype, a no-op for fp32."""
    dtype = autocast_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield
