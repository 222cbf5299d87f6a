"""Host memory of a training or scoring process: large freed blocks kept for reuse.

A step allocates and frees the same large tensors every time (at batch 4,096 on the demo
config, dozens of 4-50 MB activations). glibc's malloc returns such blocks to the operating
system when they are freed (above its mmap threshold, or by trimming the heap's top), so the
next step maps them afresh and the CPU page-faults every page in again: 55,000 faults and
about a third of a Base training step's time there. With the threshold raised and the heap
kept, the blocks are reused; the process's peak memory stays what the step needs (the peak
is reached at every step anyway), but it is not handed back between steps. Nothing computed
changes."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
KEEP_BELOW = 1 << 30  # blocks below 1 GiB come from the heap; up to 1 GiB of free top is kept
# the largest mmap threshold older glibc accepts (half its heap size on 64-bit)
FALLBACK_THRESHOLD = 32 << 20
# a user who has tuned malloc (or preloaded another allocator) keeps their settings
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_")


def user_tuned_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment sets glibc's malloc parameters itself (its `MALLOC_*_`
    variables or `glibc.malloc.*` tunables) or preloads another allocator (jemalloc,
    tcmalloc, mimalloc)."""
    preload = environ.get("LD_PRELOAD", "")
    return any(k in environ for k in USER_SETTINGS) or \
        "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or \
        any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module's doc), unless
    this is not glibc or the user tuned malloc; True when they were raised."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or \
            user_tuned_malloc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (mallopt(M_MMAP_THRESHOLD, KEEP_BELOW) or
            mallopt(M_MMAP_THRESHOLD, FALLBACK_THRESHOLD)):
        log.debug("glibc refused a larger mmap threshold: freed blocks go back as before")
        return False
    mallopt(M_TRIM_THRESHOLD, KEEP_BELOW)
    return True
