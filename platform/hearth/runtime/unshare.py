"""Copy-on-write pages of a warm-pool instance, copied before its function arrives (issue #19).

Why: a pool instance forked from a zygote shares the zygote's pages until it writes to them, and
Python writes to nearly everything it touches (reference counts, the allocator's free lists).
Specialising pays each first write as a copy-on-write fault: ~40 of them in the function's
import alone (~0.15 ms of a ~0.8 ms import in a forked process; none in a process that was
never forked). A pool instance has nothing to do until its spec comes, so it takes those faults
first: every page it has mapped privately and writably, and that is present, is written once
through ``madvise(MADV_POPULATE_WRITE)`` (Linux >= 5.14), which copies it without changing it.
Only present pages: nothing new is allocated (~2 MiB more private memory per pool instance,
measured: what the zygote still shared with it after its own imports). No function code runs
and no function file is read: this is the function-independent part of specialisation.
"""

from __future__ import annotations

import ctypes
import errno
import re

MADV_POPULATE_WRITE = 23
PAGE = 4096
#: mappings larger than this are skipped (their page map alone would be read at 2 MiB per GiB)
MAX_MAPPING = 1 << 30
_PRESENT = re.compile(rb"[\x80-\xff]+")  # the byte holding bit 63 (page present) is set


def writable_private(maps: str) -> list[tuple[int, int]]:
    """The (start, end) of each private, writable mapping in ``/proc/<pid>/maps`` text, up to
    `MAX_MAPPING` bytes long (shared mappings, such as the slot pool, are never copied)."""
    out = []
    for line in maps.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 2 or len(fields[1]) < 4:
            continue
        perms = fields[1]
        if perms[1] != "w" or perms[3] != "p":
            continue
        lo, _, hi = fields[0].partition("-")
        start, end = int(lo, 16), int(hi, 16)
        if 0 < end - start <= MAX_MAPPING:
            out.append((start, end))
    return out


def present_runs(entries: bytes, start: int) -> list[tuple[int, int]]:
    """(address, length) of each run of present pages, from the page map's 8-byte entries of
    the pages from `start` on (bit 63 of an entry: the page is present)."""
    top = memoryview(entries)[7::8].tobytes()  # little-endian: the byte with bit 63
    return [
        (start + m.start() * PAGE, (m.end() - m.start()) * PAGE) for m in _PRESENT.finditer(top)
    ]


def unshare_present() -> int:
    """Copy every present page of this process's private writable mappings now; the bytes
    advised. Best effort, never raises: where the kernel cannot (before 5.14, no page map),
    the faults are simply taken later, as before."""
    try:
        with open("/proc/self/maps") as f:
            ranges = writable_private(f.read())
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        done = 0
        with open("/proc/self/pagemap", "rb", buffering=0) as pm:
            for start, end in ranges:
                pm.seek(start // PAGE * 8)
                entries = pm.read((end - start) // PAGE * 8)
                for addr, n in present_runs(entries, start):
                    if madvise(addr, n, MADV_POPULATE_WRITE) == 0:
                        done += n
                    elif not done and ctypes.get_errno() == errno.EINVAL:
                        return 0  # a kernel without this advice: nothing will take it
        return done
    except (OSError, AttributeError, ValueError):
        return 0


__all__ = ["MADV_POPULATE_WRITE", "present_runs", "unshare_present", "writable_private"]
