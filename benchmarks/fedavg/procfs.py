"""What the fedavg benchmarks read from ``/proc``: memory figures and child processes."""

from __future__ import annotations

import gc
import os
import time


def status_kb(pid: int | str, field: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (``pid`` may be "self"); 0 if it is absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (its main thread's children, recursively)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        out.update(kids)
        todo.extend(kids)
    return out


def children() -> set[int]:
    """Child processes of this process (all threads)."""
    out: set[int] = set()
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/children") as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def rss_reset() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Peak:
    """Peak RSS growth over a block (VmHWM after a reset, minus RSS at the start)."""

    def __enter__(self) -> Peak:
        gc.collect()
        rss_reset()
        self.base = status_kb("self", "VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.mb = max(0, status_kb("self", "VmHWM") - self.base) / 1024
