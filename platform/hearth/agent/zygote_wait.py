"""Whether a start of a built-in function waits for the built-ins' zygote that is still coming up,
or takes a generic warm-pool instance now: `zygote_wait` (pure) on what `ZygoteProgress` saw of
the zygote's process (/proc/<pid>/stat).

Why progress and not a fixed bound: a pool instance specialised as FedAvg has to do the same
imports and kernel loads (or, on a fresh machine, numba compiles) that the zygote is doing, from
scratch and competing with it for the CPUs; a zygote that works on them is ahead of any pool
instance, so waiting is the quicker start even past a fixed bound (a fresh machine's first
`make demo`: seconds of numba compiles, which a fixed 10 s bound turned into 10 s waited plus a
12.7 s compile in the pool instance). Only a zygote that stopped working (asleep on a lock, a
socket, a hung preload) is not worth a wait: after `stall_s` without progress a start takes the
pool. A zygote can also work without getting anywhere (a preload that spins, a process stuck
in disk wait on a hung network file system on sys.path): so starts wait for it only until
`ZYGOTE_WAIT_MAX_S` after its start, and disk wait without CPU used counts as progress only for
`DISK_WAIT_S`. (The zygote's own start timeout, `agent.zygote_server.START_TIMEOUT_S`, 120 s, stops it.)
"""

from __future__ import annotations

import math
import time

from hearth.dataplane.segment import STATE, STIME, UTIME, stat_fields

# how long a start waits on a starting built-ins' zygote that shows no progress (no CPU time,
# not runnable, not in disk wait) before it takes a pool instance (HEARTH_ZYGOTE_WAIT_S)
ZYGOTE_WAIT_S = 2.0
# how long after its start starts wait for it at all, progress or not (HEARTH_ZYGOTE_WAIT_MAX_S):
# a fresh machine's first FedAvg start waited 13.6 s (median, docs/platform.md, 7 Dec 2026), the
# zygote was ready 22.3 s after the deploy
ZYGOTE_WAIT_MAX_S = 30.0
# how long a start waits for a ready zygote to answer its fork (HEARTH_ZYGOTE_FORK_TIMEOUT_S; a
# fork takes milliseconds, seconds on a loaded node): past it that start goes on as a plain
# process and the zygote forks no more (hung: SIGSTOP, a stuck preload thread), see
# agent.zygote_server.Zygote.hang
FORK_TIMEOUT_S = 10.0
# a zygote whose start failed (or timed out: 120 s), or that hung on a fork, is not started
# again for this long (HEARTH_ZYGOTE_RETRY_S): starts meanwhile are plain processes instead of
# each starting one more and waiting for it again
ZYGOTE_RETRY_S = 30.0
# disk wait with no CPU used counts as progress this long (an import from a cold page cache
# waits on the disk for moments between CPU bursts; a hung NFS/FUSE mount forever)
DISK_WAIT_S = 3.0
# how often a waiting start looks at the zygote's progress (it stops waiting as soon as the
# zygote is ready, whatever this is)
POLL_S = 0.1


def zygote_wait(
    builtin: bool, state: str, idle_s: float, stall_s: float, left_s: float = math.inf
) -> float | None:
    """How long a start waits for its zygote before a free generic pool instance would be
    taken instead: 0 (fork now: it is ready), the seconds it may still wait (it is starting,
    has shown progress within the last `stall_s` (`idle_s` is how long ago), and `left_s` is
    left of the cap on waits for it, counted from its start), or None (take the pool). Only the built-ins' zygote
    is worth a wait: it has run their imports and warm-ups (FedAvg's numba kernels: 0.6-0.9 s
    that a pool instance pays itself); a user `preload` zygote forks slower than the pool
    specialises. `state`: ready, starting or gone."""
    if not builtin or state == "gone":
        return None
    if state == "ready":
        return 0.0
    left = min(stall_s - idle_s, left_s)
    return left if left > 0 else None


def progressed(
    before: tuple[int, str] | None, now: tuple[int, str] | None, cpu_idle_s: float
) -> bool:
    """Whether a process did work between two samples (CPU ticks, state letter): it used CPU,
    or it is runnable (waiting for a CPU on a busy node), or in disk wait (importing from a
    cold page cache) while its last CPU use is less than `DISK_WAIT_S` ago (`cpu_idle_s`).
    Asleep with no CPU used is no progress; no sample (gone, not yet spawned) neither."""
    if now is None:
        return False
    ticks, state = now
    if before is not None and ticks > before[0]:
        return True
    return state == "R" or (state == "D" and cpu_idle_s < DISK_WAIT_S)


def cpu_sample(pid: int) -> tuple[int, str] | None:
    """(user + system CPU ticks, state letter) of `pid` from /proc; None if it is gone or
    its stat line does not parse (this runs on the request path: never an exception)."""
    try:
        fields = stat_fields(pid)
        if fields is None:
            return None
        return int(fields[UTIME]) + int(fields[STIME]), fields[STATE].decode("ascii")
    except (OSError, ValueError):
        return None


class ZygoteProgress:
    """When a starting zygote started, last showed progress, and last used CPU (monotonic),
    sampled each time it is asked. The cap on the starts' wait (`ZYGOTE_WAIT_MAX_S`) runs from
    `started`, not from each start's: a zygote that never comes up delays only the starts of its
    first seconds, not every cold start of a built-in until its start timeout."""

    def __init__(self, since: float | None = None) -> None:
        self.started = time.monotonic() if since is None else since
        self.last = self.started
        self.cpu_last = self.last
        # a new process has used no CPU: its first sample counts what it used since its spawn
        self.sample: tuple[int, str] = (0, "")

    def idle_s(self, pid: int | None, now: float | None = None) -> float:
        """Seconds since the process `pid` last showed progress (from its zygote's start)."""
        now = time.monotonic() if now is None else now
        if pid is not None:
            sample = cpu_sample(pid)
            if sample is not None and sample[0] > self.sample[0]:
                self.cpu_last = now
            if progressed(self.sample, sample, now - self.cpu_last):
                self.last = now
            if sample is not None:
                self.sample = sample
        return max(0.0, now - self.last)
