"""The process's memory: its peak, and how glibc's allocator serves the large tensors of a CPU training step."""

from __future__ import annotations

import ctypes
import os
import resource
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def peak_memory_mb() -> float:
    """This process's peak resident memory (Linux reports it in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def hold_freed_memory(limit: int = 1 << 30) -> bool:
    """Have glibc serve blocks of up to `limit` bytes from its heap and keep what is freed there, instead of
    mapping fresh pages for every block over 32 MB (its ceiling) and unmapping them on free. A CPU training step
    allocates and frees such blocks many times (the logits of a 2048-token batch over 8000 pieces are 65 MB), and
    every first touch of a fresh page faults into the kernel: with glibc's defaults a Multi30k step of `small`
    spends ~25% of its time there (benchmarks/train_allocator.py). Preloading jemalloc or tcmalloc does the same
    (PyTorch's CPU tuning guide suggests them) but needs a library installed and LD_PRELOAD set before Python
    starts; mallopt needs neither. The cost: the process keeps up to `limit` of freed memory instead of returning
    it. Left alone where the user set glibc's malloc variables themselves, and where there is no glibc (macOS,
    musl). Returns whether the setting took."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):  # not glibc
        return False
