"""Slot owners in other pid namespaces: a node agent that runs local instances *and* joined pods
(each pod's runtime may be pid 1 of its own namespace) names every slot owner by pid *and* start
time, and keeps a joined pod's slots while its join connection is open. Real processes, each
made pid 1 of a new pid namespace with `unshare`, and a real slot pool."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

from hearth.agent.inflight import InflightBooks
from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.dataplane.shm import SlotPool
from joining import IN_OWN_PID_NS, join_node, needs_unshare
from realnode import wait_for

pytestmark = needs_unshare

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
        [*IN_OWN_PID_NS, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
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


def test_reclaim_keeps_the_slots_of_owners_it_is_told_are_alive():
    """A pod's process is pid 1 of its namespace: here /proc/1 is another process, so by /proc
    its slots look dead. The owners passed as alive (joined pods) keep theirs."""
    pool = SlotPool.create(f"hearth-test-{uuid.uuid4().hex[:8]}", [(4096, 8)])
    procs: list[subprocess.Popen] = []
    try:
        procs = [_in_own_pid_namespace(_POD, pool.name)]
        pid, start, i, g, *_ = (int(v) for v in procs[0].stdout.readline().split())
        assert pool.reclaim_dead([(pid, start)]) == 0
        assert pool.owner(i, g) == (pid, start)
        assert pool.reclaim_dead() == 1  # no longer said to be alive: by /proc, gone
        assert pool.owner(i, g) is None
    finally:
        _end(procs)
        pool.destroy()


# pid 1 of its own namespace: joins the node agent as a warm-pool pod's runtime does (with the
# owner it is in the slot table), owns a slot, and on a line closes its join connection but
# stays alive; ends on the next line
_JOINED = """
import sys
from hearth.dataplane.shm import SlotPool
from hearth.runtime.pod import join
boot, conn, f = join(sys.argv[1], sys.argv[2], None)
s = SlotPool.attach(boot["pool"]).alloc(10)
print(s.index, s.gen, flush=True)
sys.stdin.readline()
f.close()
conn.close()
print("left", flush=True)
sys.stdin.readline()
"""


def test_a_joined_pods_slots_live_while_its_join_connection_is_open(tmp_path, redis_url):
    """The agent frees the slots of dead owners every couple of seconds. A joined pod's process
    is not visible in the agent's pid namespace: by /proc its slots looked dead and were freed
    under it. They are kept while its join connection is open, and freed once it is closed."""
    node = join_node(tmp_path, redis_url)
    sock_dir = node.sock_dir
    procs: list[subprocess.Popen] = []
    pool = None
    try:
        pod = _in_own_pid_namespace(_JOINED, str(sock_dir), "pidns-pod-1")
        procs.append(pod)
        i, g = (int(v) for v in pod.stdout.readline().split())
        pool = SlotPool.attach(node.client.status()["pool"]["name"])
        assert pool.owner(i, g)[0] == 1  # pid 1 of its namespace: another process here

        def a_dead_owners_slot() -> tuple[int, int]:
            """A slot whose owner (a process of this namespace) has exited: the next reclaim
            frees it, which tells a reclaim has run since."""
            code = "import sys; from hearth.dataplane.shm import SlotPool as P; "
            code += "s = P.attach(sys.argv[1]).alloc(10); print(s.index, s.gen)"
            out = subprocess.run(
                [sys.executable, "-c", code, pool.name], capture_output=True, text=True, check=True
            ).stdout
            slot, gen = (int(v) for v in out.split())
            return slot, gen

        dead = a_dead_owners_slot()
        wait_for(lambda: pool.owner(*dead) is None, 30, "a reclaim of the agent")
        assert pool.owner(i, g) is not None, "a joined pod's slot was freed under it"
        pod.stdin.write("\n")  # it leaves (its process lives on): its slots are not kept
        pod.stdin.flush()
        assert pod.stdout.readline().strip() == "left"
        wait_for(lambda: pool.owner(i, g) is None, 30, "the slot of the pod that left")
    finally:
        if pool is not None:
            pool.close()
        _end(procs)
        node.stop()


def test_an_instance_whose_start_time_cannot_be_read_is_logged_by_name(caplog):
    """A process that ended at once (a zombie, not reaped yet) has no start time to read: its
    instance then names no process in the slot table (its chained calls can lend none of its
    slots, its stray replies free none), which used to happen silently. The agent says so,
    naming the instance; a live process's start time is read without a word."""
    import logging

    from hearth.agent.instance import ProcessInstance
    from hearth.dataplane.segment import proc_start

    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=-1)
    try:
        wait_for(lambda: proc_start(quick.pid) is None, 30, "the child to end")  # a zombie
        ended, running = (ProcessInstance(id=f"fn-{n}-1", eid=5, function="fn") for n in "ab")
        with caplog.at_level(logging.WARNING, logger="hearth.node"):
            running.note_start(live.pid)
            assert not caplog.records
            ended.note_start(quick.pid)
        assert running.pid_start == proc_start(live.pid) > 0 and ended.pid_start == 0
        (rec,) = caplog.records
        assert rec.levelno == logging.WARNING
        assert f"instance fn-a-1: the start time of its process {quick.pid}" in rec.getMessage()
    finally:
        quick.wait()
        live.stdin.close()
        live.wait(10)
