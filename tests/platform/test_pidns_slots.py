"""Slot owners in other pid namespaces: a node agent that runs local instances *and* joined pods
(each pod's runtime may be pid 1 of its own namespace) names every slot owner by pid *and* start
time. Real processes, each made pid 1 of a new pid namespace with `unshare`, and a real slot
pool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from typing import Any

import pytest
from hearth.agent.inflight import InflightBooks
from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.dataplane.shm import SlotPool

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare (root)"
)
NS = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]

# pid 1 of its own namespace: owns one slot, hands another to the pool's creator (as a reply
# is), prints its pid, start time and both slots, and waits for a line on stdin
_POD = """
import sys
from hearth.dataplane.segment import _Me, _my_start
from hearth.dataplane.shm import SlotPool
p = SlotPool.attach(sys.argv[1])
own, handed = p.alloc(10), p.alloc(10)
p.give_to_creator(handed.index, handed.gen)
print(_Me.pid, _my_start(), own.index, own.gen, handed.index, handed.gen, flush=True)
sys.stdin.readline()
"""


def _in_own_pid_namespace(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*NS, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.stdin.write("\n")
            p.stdin.flush()
    for p in procs:
        p.wait(10)


class _Books(InflightBooks):
    """The link's decisions over a real pool, with no call in flight."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.pending: dict[bytes, Any] = {}
        self.requests: dict[tuple[int, int], bytes] = {}


def test_a_local_instance_with_a_joined_pods_pid_can_neither_lend_nor_claim_its_slots():
    """Two instances, each pid 1 of its own namespace, as a local instance and a joined pod can
    share a pid number: one's chained call may not send on a slot the other owns, and one's
    stray reply may not free a slot the other handed over. By pid alone both were allowed."""
    pool = SlotPool.create(f"hearth-test-{uuid.uuid4().hex[:8]}", [(4096, 8)])
    procs: list[subprocess.Popen] = []
    try:
        lines = []
        for _ in range(2):  # one after the other: two start times (10 ms clock ticks)
            procs.append(_in_own_pid_namespace(_POD, pool.name))
            lines.append([int(v) for v in procs[-1].stdout.readline().split()])
        a, b = lines
        (a_pid, a_start), (b_pid, b_start) = a[:2], b[:2]
        assert a_pid == b_pid == 1 and a_start != b_start  # same pid, two processes
        a_own, a_handed = (a[2], a[3]), (a[4], a[5])
        books = _Books(pool)

        def chained(slot: tuple[int, int]) -> Descriptor:
            return Descriptor(dst=0, src=9, kind=Kind.INVOKE, slot=slot[0], gen=slot[1])

        assert books.lendable(chained(a_own), (a_pid, a_start))  # its own slot
        assert not books.lendable(chained(a_own), (b_pid, b_start))  # the other's
        assert books._handed(a_handed, (a_pid, a_start))
        assert not books._handed(a_handed, (b_pid, b_start))
    finally:
        _end(procs)
        pool.destroy()
