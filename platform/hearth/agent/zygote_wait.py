"""Whether a start of a built-in function waits for the built-ins' zygote that is still coming up,
or takes a generic warm-pool instance now: `zygote_wait` (pure) on what `ZygoteProgress` saw of
the zygote's process (/proc/<pid>/stat).

Why progress and not a fixed bound: a pool instance specialised as FedAvg has to do the same
imports and kernel loads (or, on a fresh machine, numba compiles) that the zygote is doing, from
scratch and competing with it for the CPUs; while the zygote works it is ahead of any pool
instance, so waiting is the quicker start however long it takes (a fresh machine's first
`make demo`: 10-20 s of numba compiles, which a fixed 10 s bound turned into 10 s waited plus a
12.7 s compile in the pool instance). Only a zygote that stopped working (asleep on a lock, a
socket, a hung preload) is not worth a wait: after `stall_s` without progress a start takes the
pool. The zygote's own start timeout (`agent.zygote.START_TIMEOUT_S`) bounds a zygote that
works forever: it is then gone, and starts take the pool.
"""

from __future__ import annotations

import time

# how long a start waits on a starting built-ins' zygote that shows no progress (no CPU time,
# not runnable, not in disk wait) before it takes a pool instance (HEARTH_ZYGOTE_WAIT_S)
ZYGOTE_WAIT_S = 2.0
# how often a waiting start looks at the zygote's progress (it stops waiting as soon as the
# zygote is ready, whatever this is)
POLL_S = 0.1


def zygote_wait(builtin: bool, state: str, idle_s: float, stall_s: float) -> float | None:
    """How long a start waits for its zygote before a free generic pool instance would be
    taken instead: 0 (fork now: it is ready), the seconds it may still wait (it is starting and
    has shown progress within the last `stall_s`; `idle_s` is how long ago), or None (take the
    pool). Only the built-ins' zygote is worth a wait: it has run their imports and warm-ups
    (FedAvg's numba kernels: 0.6-0.9 s that a pool instance pays itself); a user `preload`
    zygote forks slower than the pool specialises. `state`: ready, starting or gone."""
    if not builtin or state == "gone":
        return None
    if state == "ready":
        return 0.0
    left = stall_s - idle_s
    return left if left > 0 else None


def progressed(before: tuple[int, str] | None, now: tuple[int, str] | None) -> bool:
    """Whether a process did work between two samples (CPU ticks, state letter): it used CPU,
    or it is runnable (waiting for a CPU on a busy node) or in disk wait (importing from a cold
    page cache). Asleep with no CPU used is no progress; no sample (not yet spawned) neither."""
    if now is None:
        return False
    ticks, state = now
    return state in ("R", "D") or (before is not None and ticks > before[0])


def cpu_sample(pid: int) -> tuple[int, str] | None:
    """(user + system CPU ticks, state letter) of `pid` from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[11]) + int(fields[12]), fields[0]


class ZygoteProgress:
    """When a starting zygote last showed progress (monotonic), sampled each time it is asked."""

    def __init__(self, since: float | None = None) -> None:
        self.last = time.monotonic() if since is None else since
        self.sample: tuple[int, str] | None = None

    def idle_s(self, pid: int | None, now: float | None = None) -> float:
        """Seconds since the process `pid` last showed progress (from its zygote's start)."""
        now = time.monotonic() if now is None else now
        if pid is not None:
            sample = cpu_sample(pid)
            if progressed(self.sample, sample):
                self.last = now
            self.sample = sample
        return max(0.0, now - self.last)
