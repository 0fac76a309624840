"""Keep freed host memory in the process (glibc malloc), so that each training step reuses it.

torch's CPU tensors come from malloc. glibc serves every allocation above its mmap threshold
(dynamic, at most 32 MB) with a fresh mmap and gives it back with munmap when freed, and trims
the heap top above twice that. A PTB training step allocates and frees dozens of such blocks
(the [1400, 10000] logits and their gradient, the [4650, 1550] weight-drop outputs and
gradients, every layer's [T, b, 3H] gates), so every step page-faults and zero-fills them
again: on this project's 2-core CPU that cost ~10 % of an LSTM or QRNN step, and whether a
process hit it for a given size depended on its allocation history (the same benchmark ran at
two speeds from one process to the next). `keep_freed_memory()` turns mmap off for the heap
(M_MMAP_MAX = 0) and heap trimming off (M_TRIM_THRESHOLD): freed blocks stay in the process and
are reused; the resident size stays at the run's peak instead of falling between steps.
Allocators such as jemalloc or tcmalloc (LD_PRELOAD) do the same job; this needs nothing
installed.

The `dist-lm` command calls it at start (Linux with glibc; elsewhere it does nothing).
DIST_LM_MALLOC=system leaves malloc as it is. In your own Python process call it yourself, or
start Python with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 in the environment.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: ~2 GiB of free heap top before a trim


def keep_freed_memory() -> bool:
    """Set glibc malloc to keep freed memory for reuse; True when it was set."""
    if os.environ.get("DIST_LM_MALLOC", "").lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:  # the process's own symbols include glibc's (find_library would run ldconfig)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
