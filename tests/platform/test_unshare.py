"""A warm-pool instance copies the pages it still shares with its zygote before its function
arrives (`hearth.runtime.unshare`): written later, they take no copy-on-write fault. The fork,
the page map and the faults are real; the parsers are checked on their own."""

from __future__ import annotations

import os
import resource
import struct

import pytest
from hearth.runtime.unshare import (
    MAX_MAPPING,
    PAGE,
    present_runs,
    unshare_present,
    writable_private,
)

PAGES = 256


def test_only_private_writable_mappings_of_a_bounded_size_are_taken() -> None:
    maps = "\n".join(
        [
            "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/python3",
            "00651000-00652000 rw-p 00051000 08:02 173521 /usr/bin/python3",
            "7f0000000000-7f0000100000 rw-s 00000000 00:05 1234 /dev/shm/hearth-pool",
            "7f0000200000-7f0000201000 ---p 00000000 00:00 0",
            f"7f1000000000-{0x7F1000000000 + MAX_MAPPING + PAGE:x} rw-p 00000000 00:00 0",
            "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]",
            "",
        ]
    )
    assert writable_private(maps) == [(0x651000, 0x652000), (0x7FFC00000000, 0x7FFC00021000)]


def test_runs_of_present_pages_are_read_from_bit_63() -> None:
    present, absent = 1 << 63 | 12345, 1 << 62  # (swapped: not present)
    entries = struct.pack("<6Q", present, present, absent, present, 0, present)
    base = 0x10000
    assert present_runs(entries, base) == [
        (base, 2 * PAGE),
        (base + 3 * PAGE, PAGE),
        (base + 5 * PAGE, PAGE),
    ]


def _faults_writing_shared_pages(unshare: bool, data: bytearray) -> tuple[int, int]:
    """In a forked child: (bytes advised, minor faults taken writing one byte per page)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            advised = unshare_present() if unshare else 0
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for i in range(0, len(data), PAGE):
                data[i] = 2
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            os.write(w, f"{advised} {faults}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        advised, faults = (int(x) for x in os.read(r, 64).split())
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return advised, faults


def test_a_forked_process_writes_its_shared_pages_without_faults_once_unshared() -> None:
    data = bytearray(b"\1" * (PAGES * PAGE))  # present in the parent, shared after the fork
    advised, faults = _faults_writing_shared_pages(False, data)
    assert advised == 0 and faults >= PAGES  # each first write copies its page
    advised, faults = _faults_writing_shared_pages(True, data)
    if advised == 0:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    assert advised >= PAGES * PAGE
    assert faults < PAGES // 8  # copied before: a few faults at most (the loop's own objects)
    assert data[0] == 1  # the parent's pages are its own: unchanged by the child
