"""Keep the host memory one training step frees for the next step.

By default glibc hands large freed blocks back to the kernel: blocks over its mmap threshold
are unmapped, and the top of the heap is trimmed. On CPU every step frees its activations and
gradients (a vocabulary-sized word-embedding gradient alone is 23 MB in the `small` preset), so
the next step takes a page fault on every 4 kB of them again: zeroing or copying such a tensor
ran at 5 GB/s. Raising both thresholds keeps that memory in the process, reused step after step;
the price is that the process holds its peak. glibc caps the mmap threshold at 32 MB on 64-bit
machines, so larger tensors are still mapped afresh.

Measured in docs/benchmarks.md (the `small` step, "dropout only" against "dropout + host memory").
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters in <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for 64-bit machines (half its heap size)
TRIM_THRESHOLD = 2 ** 31 - 1  # the most mallopt takes: trim only past 2 GB free at the heap's top
# Settings of the user's own, which win.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(env=os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds; True when set. A no-op off glibc (no `mallopt`)
    and where the environment already sets either."""
    if any(name in env for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc keeps freed memory: %s", done)
    return done
