"""Host memory between timed repetitions: keep what was freed, so a timing measures the work.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands freed memory back to the
operating system once the free space at the top of its heap passes a threshold, and serves large
requests with fresh ``mmap`` pages; either way the next repetition's outputs land on pages that
fault on first touch. Where faults are slow (virtual machines and sandboxes: see
:func:`fresh_page_microseconds`) a timing then measures the page faults of a provider's output
buffers more than the provider, and it varies with whatever the heap held before. GPU timings do
not have this problem: PyTorch's CUDA caching allocator reuses freed blocks.

:func:`keep_freed_memory` sets glibc's thresholds so freed memory stays in the process and is
reused, for every provider alike. Blocks larger than glibc's largest mmap threshold (32 MiB on
64-bit) are still mapped afresh.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import platform
import time

# mallopt parameters (malloc.h) and glibc's largest accepted mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20
_TRIM_THRESHOLD = 2**30
_PAGE_PROBE_BYTES = 4 * 2**20


def keep_freed_memory() -> str | None:
    """Stop glibc returning freed memory to the OS (process-wide, for the rest of the process).

    Returns a description of the setting for the run's record, or None where the C library is not
    glibc or refuses (the default allocator behaviour then stays).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    if not (trimmed and mapped):
        return None
    return (f"glibc malloc keeps freed memory (M_TRIM_THRESHOLD {_TRIM_THRESHOLD // 2**20} MiB, "
            f"M_MMAP_THRESHOLD {_MMAP_THRESHOLD_MAX // 2**20} MiB)")  # fmt: skip


def fresh_page_microseconds(repeats: int = 8) -> float:
    """Median cost of first touching one fresh page: filling new mappings minus refilling them."""
    pages = _PAGE_PROBE_BYTES // mmap.PAGESIZE
    fresh, warm = [], []
    for _ in range(repeats):
        with mmap.mmap(-1, _PAGE_PROBE_BYTES) as region:
            view = (ctypes.c_char * _PAGE_PROBE_BYTES).from_buffer(region)
            fresh.append(_fill_seconds(view))
            warm.append(_fill_seconds(view))
            del view  # the mapping cannot close while exported
    fresh.sort()
    warm.sort()
    return (fresh[repeats // 2] - warm[repeats // 2]) / pages * 1e6


def _fill_seconds(view: ctypes.Array) -> float:
    start = time.perf_counter()
    ctypes.memset(view, 1, len(view))
    return time.perf_counter() - start
