"""glibc's malloc and large activations: keep freed blocks of up to 256 MiB for reuse instead of unmapping them.

glibc serves every allocation above its mmap threshold (adjusted at run time, but never above 32 MiB) with a
fresh ``mmap`` and unmaps it on ``free``, so every such tensor is page-faulted in afresh, 4 KiB at a time, at
every layer of every call. A square 384 px input stays under 32 MiB; one large input does not (96 channels
at half the resolution of a 384 x 1,500 keep-aspect input are 55 MiB). Measured on EfficientNet-Lite0, one
thread: no minor page faults per megapixel at 384 x 384, 70,000 at 384 x 640 and 155,000 at 384 x 1,500,
whose time per pixel was then 1.5x and 2.4x the square's. With both thresholds at :data:`KEEP_BYTES` there
are no faults and the time per pixel is the same at every size (benchmarks/shapes_bench.py).

The setting is process-wide and is not undone (glibc has no way back to its adjusting threshold), so it is
made once, when a backbone first runs on the CPU, only under glibc; ``PATCHCORE_MALLOC_TUNING=0`` in the
environment leaves malloc alone. Its cost: up to :data:`KEEP_BYTES` of freed memory may stay resident
after a peak instead of going back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

logger = logging.getLogger(__name__)

KEEP_BYTES = 256 << 20
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
ENV = "PATCHCORE_MALLOC_TUNING"


@functools.lru_cache(maxsize=1)
def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`KEEP_BYTES`, once. Returns whether they were set
    (False off glibc, with ``PATCHCORE_MALLOC_TUNING=0``, or when glibc refused)."""
    if os.environ.get(ENV, "1").strip() == "0":
        logger.debug("%s=0: malloc's thresholds left as they are", ENV)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    except (OSError, AttributeError):  # no libc to load, or one without mallopt
        return False
    logger.debug("malloc keeps freed blocks of up to %d MiB: %s", KEEP_BYTES >> 20, done)
    return bool(done)
