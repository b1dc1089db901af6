"""Keep the host memory a step frees for the next step, instead of handing it back to the kernel.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KiB at
first, raised up to 32 MiB as such blocks are freed) with a fresh ``mmap`` and unmaps it on ``free``, and
trims the heap's free top above a trim threshold. A training step allocates and frees the same large
activations every time, so each step faults every page of them in again (the kernel zeroes each 4 KiB page
first): thousands of page faults per step of the CPU presets. Raising both thresholds once keeps those
blocks in the heap, and the step gets faster (``benchmarks/step_ab.py hostmem``; figures in
benchmarks/RESULTS.md). The cost is that the process's resident memory stays at its high-water mark, which a
training process reaches anyway. jemalloc / tcmalloc (``LD_PRELOAD``) do the same and more, but need a
package and a preload; this needs neither. No-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap (older glibc cap it at 32 MiB: then that)
TRIM_THRESHOLD = (1 << 31) - 1  # an int: never trim the heap's free top


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); whether it took effect."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS), or no C library found
        return False
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and not mallopt(M_MMAP_THRESHOLD, 32 << 20):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
