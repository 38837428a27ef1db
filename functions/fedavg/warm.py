"""Keeping a serving process warm, and measuring that it is: page faults per thread and per
process, and a glibc heap that is not handed back between rounds (so per-round Python objects
reuse pages that are already mapped)."""

from __future__ import annotations

import ctypes
import resource

# heap written past the top and kept mapped for the per-round Python objects (reserve_heap)
HEAP_RESERVE = 8 << 20
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
    """Make later allocations land on written heap pages: hand the free heap's pages back
    (``malloc_trim``) and set its chunks aside for good (address space only, never written),
    then write ``nbytes`` past the heap's top and free them again (kept, see
    :func:`keep_heap`). Why not just reuse the free chunks: they can hold pages never written
    (``np.zeros`` is a ``calloc`` of fresh heap; reading it maps the shared zero page), and
    glibc carves later small allocations from them -- ``_int_malloc`` writing each remainder's
    header faults one page after another, round after round. With mmap off, a request larger
    than all free memory can only come from the top. Call it once the serving process has
    built everything. A no-op unless keep_heap() succeeded."""
    if not _kept:
        return False
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return False
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    libc.mallinfo2.restype = _MallInfo2
    m_mmap_max = -4
    if libc.mallopt(m_mmap_max, 0) != 1:
        return False
    try:
        libc.malloc_trim(0)  # free pages inside the heap go back: set aside below, unbacked
        top = (libc.sbrk(0) or 0) - libc.mallinfo2().keepcost  # where the top chunk starts
        for size in (1 << 20, 64 << 10, 4 << 10, 1 << 10):
            while True:  # largest first, from the bins while they can serve it
                p = libc.malloc(size)
                if not p:
                    break
                if p >= top:  # no free chunk this large is left: it came from the top
                    libc.free(p)
                    break
                _SET_ASIDE.append(p)
        info = libc.mallinfo2()
        # larger than any free chunk (fordblks counts them all, the top included): the top
        size = info.fordblks + nbytes + (1 << 20)
        p = libc.malloc(size)
        if not p:
            return False
        ctypes.memset(p, 0, min(size, info.keepcost + nbytes))  # the old top and nbytes on
        libc.free(p)
        return True
    finally:
        libc.mallopt(m_mmap_max, 65536)  # glibc's default


_SET_ASIDE: list[int] = []  # the free heap at reserve_heap, trimmed and never used again


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): sizes of the heap, free chunks and the top."""

    _fields_ = [
        (f, ctypes.c_size_t)
        for f in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def process_faults() -> tuple[int, int]:
    """(minor, major) page faults of the whole process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_majflt
