"""Keep freed host memory in the process (glibc), so a CPU training step does not page-fault.

A training step allocates and frees the same few megabytes of tensors every step. glibc's malloc
by default gives freed memory at the top of its heap back to the kernel (``M_TRIM_THRESHOLD``)
and serves large blocks with fresh ``mmap`` s (a threshold it adapts), so the next step touches
new pages: measured on cnn1 (FGSM, batch 128, 1 thread), about 170 000 minor page faults per
5 000-example epoch, 0.5 s of kernel time and conv kernels 1.7x slower on the first touch of
their buffers, a 1.6x slower epoch than the same computation in a loop that happens to keep its
memory (``benchmarks/bench_train.py``). Fixing both thresholds (blocks below 32 MiB come from
the heap, up to 256 MiB of freed memory stays in the process, reused by the next step) removes
the faults; the numbers computed are unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD = 256 << 20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds (see the module docstring) once per process; ``False`` where
    there is no glibc (macOS, Windows, musl), which leaves everything as it was."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                            TRIM_THRESHOLD))
    return _applied
