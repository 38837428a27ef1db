"""Keeping a serving process warm, and measuring that it is: page faults per thread and per
process, and a glibc heap that is not handed back between rounds (so per-round Python objects
reuse pages that are already mapped)."""

from __future__ import annotations

HEAP_RESERVE = 16 << 20  # heap kept mapped for the per-round Python objects (keep_heap)


def thread_faults() -> tuple[int, int]:
    """(minor, major) page faults of the calling thread so far."""
    with open("/proc/thread-self/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[7]), int(fields[9])


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
    # grow the heap once and keep it: later small allocations reuse these (faulted) pages
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(HEAP_RESERVE)
    if p:
        ctypes.memset(p, 0, HEAP_RESERVE)
        libc.free(p)
    return bool(ok)


def process_faults() -> tuple[int, int]:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_majflt
