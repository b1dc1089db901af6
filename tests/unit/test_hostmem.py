"""d2v.hostmem: freed host memory stays in the process, so a step's activations do not fault in again."""

import platform
import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from d2v.hostmem import retain_freed_memory

def heap_end() -> int:
    line = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
    return int(line.split()[0].split("-")[1], 16)

if sys.argv[1] == "retain":
    assert retain_freed_memory()
t = torch.ones(1 << 24)  # 64 MiB: above glibc's largest automatic mmap threshold (32 MiB)
end = t.data_ptr() + t.nbytes
in_heap = end <= heap_end()
del t
print(in_heap, heap_end() >= end)
"""


def placement(mode: str) -> tuple[bool, bool]:
    """(whether a 64 MiB tensor came from the heap, whether the heap still holds it after it is freed)."""
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return tuple(w == "True" for w in out.stdout.split())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_and_stay_there_when_freed():
    """glibc's defaults: a 64 MiB block is a fresh mmap, unmapped on free (so a training step faults its
    pages in again every step: thousands of faults a step of the CPU presets); after
    ``retain_freed_memory`` it comes from the heap, and freeing it does not shrink the heap."""
    assert placement("default") == (False, False)
    assert placement("retain") == (True, True)
