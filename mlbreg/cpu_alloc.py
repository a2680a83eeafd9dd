"""Keep freed memory in the process (glibc): large CPU tensors are then served from the heap instead
of fresh pages from the kernel.

glibc hands every allocation above its mmap threshold (128 KiB to 32 MiB, adapted at run time) to
``mmap`` and returns it on free, so each new activation of a CPU training step is a fresh mapping that
page-faults (and is zeroed by the kernel) on first touch. Measured on a 2-core EPYC: copying a 32 MiB
tensor takes 17 ms that way and 2.5 ms from the heap; ReLU forward + backward on 8M floats 39 ms vs
12 ms. A training step allocates the same sizes every step, so the heap reaches its peak once and is
reused; the cost is that the process keeps that peak (RSS does not shrink between steps).
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); False where that is not possible."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
                _done = False
    return _done
