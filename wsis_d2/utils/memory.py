"""
Process memory settings for CPU training.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults a block of
128 KiB or more is mapped fresh from the kernel and unmapped when freed (the threshold adapts, but
only up to 32 MiB), and free memory at the top of the heap beyond 128 KiB is given back. A
training step frees and re-allocates the same activation buffers every iteration, so each step
faults its activations in again page by page: 10-15 % of a small CPU training's time went to the
kernel. :func:`retain_freed_memory` raises both thresholds so that freed memory stays in the
process for the next step; the process's memory then stays at its peak instead of swinging
below it.
"""

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["retain_freed_memory", "MALLOC_THRESHOLD"]

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# largest value mallopt's int argument holds (2 GiB - 1): blocks below it come from the heap and
# free memory below it is kept
MALLOC_THRESHOLD = 2**31 - 1

_DONE = [False]


def _glibc_mallopt():
    """glibc's ``mallopt`` function, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc (musl's mallopt is a stub that does nothing)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def retain_freed_memory() -> bool:
    """
    Keep memory freed by this process for reuse instead of returning it to the kernel: glibc's
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` set to :data:`MALLOC_THRESHOLD` with
    ``mallopt``. Process-wide and lasting; processes forked afterwards (data-loader workers)
    inherit it. Calling it again does nothing.

    Returns:
        bool: whether the setting is in effect (False where the C library is not glibc or
        ``mallopt`` refused a value; nothing changes then).
    """
    if _DONE[0]:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        logger.info("retain_freed_memory: the C library is not glibc; malloc settings unchanged")
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD) == 1
    if not ok:
        logger.warning("retain_freed_memory: glibc's mallopt refused the thresholds; unchanged")
        return False
    _DONE[0] = True
    logger.info(
        "CPU training: freed memory stays in the process for the next step "
        "(glibc malloc mmap / trim thresholds 2 GiB; SOLVER.CPU_RETAIN_FREED_MEMORY False: off)"
    )
    return True
