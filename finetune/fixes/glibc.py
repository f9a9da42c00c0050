"""glibc's allocator: memory it keeps resident after the process freed it (the CPU runs' memory report and peak).

Called where the memory is freed or the process enters a phase (model.py, train.py, distributed.launch and
allocate_for_steps, which reads train.cpu_allocator), with the thresholds those places chose; both are no-ops
(False) where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def release_freed_heap() -> bool:
    """Give the heap pages of freed memory back to the system (glibc's malloc_trim); False where there is no glibc.

    Tensors below glibc's mmap threshold (up to 32 MiB once it has adapted) live in the heap; when they
    are freed, glibc keeps their pages, still resident, unless they lie at the heap's top. After a large
    short-lived model is dropped the process then holds its memory for good.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc (musl, macOS)
        return False
    trim(0)
    return True


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve every allocation of at least `threshold_bytes` with its own mmap (returned to the system when
    freed) and stop glibc from raising that threshold; False where there is no glibc.

    glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB); after
    that, blocks up to that size come from the heap, and short-lived ones between long-lived ones leave
    holes that stay resident.
    """
    return _mallopt(M_MMAP_THRESHOLD, threshold_bytes)


def keep_heap_top(trim_threshold_bytes: int) -> bool:
    """Give the heap's free top back to the system only once it exceeds `trim_threshold_bytes`; False where there is
    no glibc.

    Once the mmap threshold is fixed, glibc's trim threshold stays at 128 KiB: each freed block at the top of
    the heap goes back, and the next step faults its pages in again. malloc_trim still gives everything back.
    """
    return _mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes)


def _mallopt(parameter: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return mallopt(parameter, value) == 1
