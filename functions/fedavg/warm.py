"""Keeping a serving process warm, and measuring that it is: page faults per thread and per
process, and a glibc heap that is not handed back between rounds (so per-round Python objects
reuse pages that are already mapped)."""

from __future__ import annotations

import resource

HEAP_RESERVE = 16 << 20  # heap kept mapped for the per-round Python objects (keep_heap)
_kept = False  # keep_heap() succeeded in this process: freed heap stays mapped


def thread_faults() -> tuple[int, int]:
    """(minor, major) page faults of the calling thread so far (``getrusage(RUSAGE_THREAD)``:
    no file to open, so measuring allocates nothing)."""
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_minflt, ru.ru_majflt


def keep_heap() -> bool:
    """Keep freed heap memory mapped (glibc: no trimming, one arena, a fixed mmap threshold), so
    the small allocations of later rounds reuse pages instead of faulting fresh ones. Process
    wide: call it in a process that serves rounds. Returns False where glibc is not in use."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    ok = libc.mallopt(m_arena_max, 1) == 1
    ok &= libc.mallopt(m_trim_threshold, 1 << 30) == 1
    ok &= libc.mallopt(m_mmap_threshold, 32 << 20) == 1
    global _kept
    _kept = bool(ok)
    reserve_heap()
    return bool(ok)


def reserve_heap(nbytes: int = HEAP_RESERVE) -> bool:
    """Write ``nbytes`` of fresh heap past what is in use and free it again (kept, see
    :func:`keep_heap`): later small allocations land on these written pages instead of
    faulting new ones. Call it once the serving process has built everything (imports and
    set-up grow the heap past an earlier reserve). A no-op unless keep_heap() succeeded."""
    if not _kept:
        return False
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(nbytes)
    if not p:
        return False
    ctypes.memset(p, 0, nbytes)
    libc.free(p)
    return True


def process_faults() -> tuple[int, int]:
    """(minor, major) page faults of the whole process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_majflt
