"""glibc's allocator: memory it keeps resident after the process freed it (the CPU runs' memory report and peak).

Called where the memory is freed or the process enters a phase (model.py, train.py, distributed.launch), with
the thresholds those places chose; all are no-ops (False) where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _libc_function(name: str):
    """The C library's function `name`, or None where there is no glibc (no C library found, or musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_heap() -> bool:
    """Give the heap pages of freed memory back to the system (glibc's malloc_trim); False where there is no glibc.

    Tensors below glibc's mmap threshold (up to 32 MiB once it has adapted) live in the heap; when they
    are freed, glibc keeps their pages, still resident, unless they lie at the heap's top. After a large
    short-lived model is dropped the process then holds its memory for good.
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): mallopt refuses more


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve every allocation of at least `threshold_bytes` with its own mmap (returned to the system when
    freed) and stop glibc from raising that threshold; False where there is no glibc.

    glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB); after
    that, blocks up to that size come from the heap, and short-lived ones between long-lived ones leave
    holes that stay resident. The heap's free top is kept up to twice the threshold (as glibc's own
    adaptation does): a lower trim threshold would hand it back after every step and fault it in again.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1 and mallopt(M_TRIM_THRESHOLD, 2 * threshold_bytes) == 1
