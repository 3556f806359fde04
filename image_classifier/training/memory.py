"""Keep freed memory in the process instead of handing it back to the OS after every step.

A training step allocates and frees the same activation buffers (tens of MB) every time. glibc's
defaults give memory at the top of the heap back to the OS once more than a few MB are free there,
so the next step faults every page in again (2,862 minor page faults per step measured for the
default CNN at batch 128, 1 with this on: docs/benchmarks.md). Raising the two thresholds keeps
that memory for reuse: the process holds on to its peak heap, as PyTorch's recommended allocators
(jemalloc, tcmalloc) do.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024  # give memory back only when more than 1 GiB is free


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process. True when they were set; False
    where there is nothing to set (not Linux, or a C library without `mallopt`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
