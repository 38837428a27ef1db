"""Slot pool against real /dev/shm and real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import stat
import subprocess
import sys
import uuid

import dp_workers
import numpy as np
import pytest
from hearth.dataplane.segment import (
    ROW_U32,
    SHM_DIR,
    cleanup_stale_segments,
    pid_alive,
    segment_info,
)
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import PayloadTooLarge, PoolExhausted, StaleSlot, payload_offset

CTX = mp.get_context("spawn")


def _unswept_name() -> str:
    """A pool name outside the "hearth-" prefix every node start sweeps
    (``cleanup_stale_segments()``): a test that asserts what its own cleanup removes must not
    race a node started by another test process (the suite's parts run at once) removing the
    dead segment first."""
    return f"hearth_unswept-{uuid.uuid4().hex[:8]}"


def test_segment_is_owner_only(pool):
    st = os.stat(pool.path)
    assert pool.path.startswith(SHM_DIR + "/")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_default_classes_fit_resnet152_and_are_page_aligned():
    p = SlotPool.create(f"hearth-test-{uuid.uuid4().hex[:8]}")
    try:
        s = p.alloc(233_000_000)
        assert s.capacity >= 233_000_000
        assert all(size % 4096 == 0 for size, *_ in p.classes)
        addr = np.frombuffer(s.buf, np.uint8).ctypes.data
        assert addr % 4096 == 0
        assert os.stat(p.path).st_blocks * 512 < 16 << 20  # sparse: nothing allocated yet
    finally:
        p.destroy()


def test_alloc_view_release_and_generation(pool):
    s = pool.alloc(100)
    assert s.capacity == 4096 and pool.stats()["used"] == 1
    s.buf[:5] = b"hello"
    assert bytes(pool.view(s.index, s.gen, 5)) == b"hello"
    assert pool.release(s.index, s.gen) == 0
    for op in (pool.adopt, pool.incref, pool.release):
        with pytest.raises(StaleSlot):
            op(s.index, s.gen)
    with pytest.raises(StaleSlot, match="is stale"):
        pool.view(s.index, s.gen, 5)
    # the slot is reused with a new generation; the old descriptor still can't read it
    s2 = pool.alloc(100)
    assert s2.index == s.index and s2.gen == s.gen + 1
    s2.buf[:5] = b"WORLD"
    with pytest.raises(StaleSlot):
        pool.view(s.index, s.gen, 5)
    assert bytes(pool.view(s2.index, s2.gen, 5)) == b"WORLD"


def test_refcount(pool):
    s = pool.alloc(10)
    assert pool.incref(s.index, s.gen) == 2
    assert pool.release(s.index, s.gen) == 1
    pool.view(s.index, s.gen, 10)  # still alive
    assert pool.release(s.index, s.gen) == 0
    with pytest.raises(StaleSlot):
        pool.view(s.index, s.gen, 10)


def test_size_classes_exhaustion_and_too_large(pool):
    small = [pool.alloc(4096) for _ in range(8)]
    spill = pool.alloc(10)  # 4 KiB class full -> next class
    assert spill.capacity == 1 << 20
    with pytest.raises(PayloadTooLarge, match="largest slot class"):
        pool.alloc((64 << 20) + 1)
    big = [pool.alloc(64 << 20) for _ in range(2)]
    with pytest.raises(
        PoolExhausted, match=r"no free slot for 67108864 bytes \(64 MiB: 2/2 used\)"
    ):
        pool.alloc(64 << 20)
    assert isinstance(PoolExhausted("x"), RuntimeError)
    st = pool.stats()["classes"]
    assert st["4096"] == {
        "slot_size": 4096,
        "total": 8,
        "used": 8,
        "free": 0,
        "used_bytes": 8 * 4096,
    }
    for s in small + big + [spill]:
        pool.release(s.index, s.gen)
    assert pool.stats()["used"] == 0


def test_alloc_is_first_fit_across_processes(pool):
    """The header's first-free hints keep allocation first-fit (low slots reused, their pages
    stay warm) whoever frees: a slot freed by another process is the next one handed out."""
    a, b, c = (pool.alloc(100) for _ in range(3))
    assert [a.index, b.index, c.index] == [0, 1, 2]
    other = SlotPool.attach(pool.name)  # a second mapping: shares the table and the hints
    try:
        other.release(b.index, b.gen)
        assert pool.alloc(100).index == 1  # the hole, not slot 3
        assert pool.alloc(100).index == 3
        other.release(a.index, a.gen)
        assert other.alloc(100).index == 0
        rest = [pool.alloc(4096) for _ in range(4)]  # 4..7: the 4 KiB class is full
        assert [s.index for s in rest] == [4, 5, 6, 7]
        with pytest.raises(PoolExhausted, match="4 KiB: 8/8 used"):
            pool.alloc(100, exact=True)
        other.release(rest[2].index, rest[2].gen)
        assert pool.alloc(100, exact=True).index == 6
    finally:
        other.close()


def test_view_bounds(pool):
    s = pool.alloc(10)
    with pytest.raises(ValueError, match="exceeds slot"):
        pool.view(s.index, s.gen, 4097)
    with pytest.raises(StaleSlot, match="out of range"):
        pool.view(10_000, 0, 1)


def test_put_meta_and_aligned_payload(pool):
    arr = np.arange(1000, dtype=np.float64)
    s = pool.put(arr, meta={"dtype": "f8", "shape": [1000]})
    d = s.descriptor(dst=1, src=2)
    assert d.meta_len > 0 and payload_offset(d.meta_len) % 64 == 0
    assert pool.meta(d) == {"dtype": "f8", "shape": [1000]}
    got = np.frombuffer(pool.payload(d), np.float64)
    assert np.array_equal(got, arr)
    assert got.ctypes.data % 64 == 0
    assert np.shares_memory(got, np.frombuffer(s.buf, np.uint8))


def test_64mib_payload_across_processes_is_shared_not_copied(pool):
    """Another process writes 64 MiB; our view is the same memory (writes are visible back)."""
    parent, child = CTX.Pipe()
    pool.close()  # reopen below: attach works from any process
    p = SlotPool.attach(pool.name)
    n = (64 << 20) // 4
    proc = CTX.Process(target=_write_big, args=(pool.name, n, child))
    proc.start()
    index, gen = parent.recv()
    p.adopt(index, gen)
    view = p.view(index, gen, n * 4)
    arr = np.frombuffer(view, np.float32)
    assert arr[123456] == 123456.0 and arr.sum(dtype=np.float64) == n * (n - 1) / 2
    slot_map = np.frombuffer(p.slot(index, gen).buf, np.uint8)
    assert np.shares_memory(arr, slot_map)
    arr[0] = -1.0  # the producer sees our write: same physical pages
    parent.send("check")
    assert parent.recv() == -1.0
    p.release(index, gen)
    proc.join(10)
    p.destroy()


def _write_big(name, n, conn):
    pool = SlotPool.attach(name)
    s = pool.alloc(n * 4)
    a = np.frombuffer(s.buf, np.float32, count=n)
    a[:] = np.arange(n, dtype=np.float32)
    conn.send((s.index, s.gen))
    conn.recv()
    conn.send(float(a[0]))


def test_kill9_owner_slots_are_reclaimed(pool):
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=dp_workers.hold_slots, args=(pool.name, 3, 1000, child))
    proc.start()
    held = parent.recv()
    mine = pool.alloc(10)
    assert pool.stats()["used"] == 4
    assert pool.reclaim_dead() == 0  # owner still alive
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert pool.reclaim_dead() == 3
    assert pool.stats()["used"] == 1  # our own slot is untouched
    for index, gen in held:
        with pytest.raises(StaleSlot):
            pool.view(index, gen, 8)
    pool.release(mine.index, mine.gen)


def test_adopt_transfers_ownership(pool):
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=dp_workers.hold_slots, args=(pool.name, 2, 10, child))
    proc.start()
    (i1, g1), (i2, g2) = parent.recv()
    pool.adopt(i1, g1)  # we took over the first one: it must survive its producer
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert pool.reclaim_dead() == 1
    assert bytes(pool.view(i1, g1, 8)) == b"childpid"
    with pytest.raises(StaleSlot):
        pool.view(i2, g2, 8)


def test_a_slot_handed_to_the_creator_names_who_handed_it_over(pool):
    """`give_to_creator` records the handing process (the agent frees a stray reply's slot only
    when its sender handed it over); the slot is the creator's (it survives that process), its
    length is kept, and a slot the creator wrote itself or another process owns names nobody."""
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=dp_workers.hand_over, args=(pool.name, 1000, child))
    proc.start()
    i, g, pid, start = parent.recv()
    proc.join(10)
    assert pool.reclaim_dead() == 0  # the creator's now
    assert pool.owner(i, g) == (os.getpid(), pool.creator_start) and pid != os.getpid()
    assert pool.handed_by(i, g) == (pid, start)  # its pid and start time
    assert pool.slot(i, g).length == 1000 and bytes(pool.view(i, g, 8)) == b"handover"
    assert pool.stats()["used_bytes"] >= 1000
    mine = pool.alloc(10)
    assert pool.handed_by(mine.index, mine.gen) is None  # written by the creator itself
    pool._u32[i * ROW_U32 + 3] = pid  # (as if that process had adopted it again)
    assert pool.handed_by(i, g) is None
    pool.release(i, g)
    with pytest.raises(StaleSlot):
        pool.handed_by(i, g)
    mine.release()


def test_pid_reuse_is_detected():
    me = os.getpid()
    assert pid_alive(me)
    from hearth.dataplane.segment import proc_start

    assert pid_alive(me, proc_start(me))
    assert not pid_alive(me, proc_start(me) + 1)  # same pid, different process


def test_no_segment_leak_after_creator_kill9():
    name = _unswept_name()
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=dp_workers.create_pool_and_hang, args=(name, child))
    proc.start()
    parent.recv()
    path = os.path.join(SHM_DIR, name)
    assert os.path.exists(path)
    with pytest.raises(FileExistsError, match="alive"):
        SlotPool.create(name)  # a live owner's pool is never clobbered
    assert cleanup_stale_segments(name) == []  # its own name: no other test's segment
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert cleanup_stale_segments(name) == [name]
    assert not os.path.exists(path)
    # and a restarted node agent re-creating the same name removes leftovers itself
    proc2 = CTX.Process(target=dp_workers.create_pool_and_hang, args=(name, child))
    proc2.start()
    parent.recv()
    os.kill(proc2.pid, signal.SIGKILL)
    proc2.join(10)
    p = SlotPool.create(name, [(4096, 2)])
    assert p.creator_pid == os.getpid()
    p.destroy()
    assert not os.path.exists(path)


def test_concurrent_alloc_from_many_processes_never_double_allocates(pool):
    pipes, procs = [], []
    for _ in range(3):
        a, b = CTX.Pipe()
        pr = CTX.Process(target=dp_workers.alloc_churn, args=(pool.name, 300, b))
        pr.start()
        pipes.append(a)
        procs.append(pr)
    assert [a.recv() for a in pipes] == [0, 0, 0]
    for pr in procs:
        pr.join(10)
    assert pool.stats()["used"] == 0


def test_bad_names_and_classes():
    with pytest.raises(ValueError, match="plain file name"):
        SlotPool.create("a/b")
    with pytest.raises(ValueError, match="positive"):
        SlotPool.create(f"hearth-test-{uuid.uuid4().hex[:8]}", [(0, 3)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SlotPool.attach(f"hearth-test-missing-{uuid.uuid4().hex[:8]}")


def test_foreign_file_with_the_same_name_is_not_clobbered():
    name = f"hearth-test-{uuid.uuid4().hex[:8]}"
    path = os.path.join(SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(b"not a pool")
    try:
        with pytest.raises(FileExistsError, match="not a Hearth slot pool"):
            SlotPool.create(name)
        assert open(path, "rb").read() == b"not a pool"
    finally:
        os.unlink(path)


_NS_CREATOR = """
import sys
from hearth.dataplane.shm import SlotPool
p = SlotPool.create(sys.argv[1])
print(p.creator_pid, flush=True)
i, g = map(int, sys.stdin.readline().split())  # a slot the other pid namespace's process owns
print(p.owner(i, g)[0], p.creators(i, g), p.handed_by(i, g), p.release_if_owner(i, g), flush=True)
sys.stdin.readline()
p.destroy()
"""
_NS_OWNER = """
import sys
from hearth.dataplane.shm import SlotPool
s = SlotPool.attach(sys.argv[1]).alloc(100)
print(s.index, s.gen, flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare")
def test_a_joined_pods_slot_is_not_the_creators_when_their_pids_collide():
    """A node agent and a joined pod in their own pid namespaces can have the same pid number
    (pid 1 in their containers): the pool tells the creator's slots by pid *and* start time.
    Seen in the pods test: the agent took a pod's ready report for one of its own slots."""
    name = f"hearth-test-{uuid.uuid4().hex[:8]}"
    ns = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]
    kw = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    creator = subprocess.Popen([*ns, _NS_CREATOR, name], **kw)
    owner = None
    try:
        assert creator.stdout.readline().strip() == "1"
        owner = subprocess.Popen([*ns, _NS_OWNER, name], **kw)
        slot = owner.stdout.readline()
        creator.stdin.write(slot)
        creator.stdin.flush()
        pid, creators, handed, released = creator.stdout.readline().split()
        assert pid == "1"  # the same pid number as the creator's
        assert (creators, handed, released) == ("False", "None", "False")
    finally:
        for p in (owner, creator):
            if p is not None:
                p.stdin.write("\n")
                p.stdin.flush()
                p.wait(10)


# pid 1 of its own namespace: creates a pool, says its pid, and on a line dies without unlinking
_NS_HOLDER = """
import os, sys
from hearth.dataplane.shm import SlotPool
p = SlotPool.create(sys.argv[1], [(4096, 2)])
print(p.creator_pid, flush=True)
sys.stdin.readline()
os._exit(0)
"""
# cleans up (or creates) the pool named argv[1] from its own pid namespace; prints the outcome
_NS_CLEAN = """
import sys
from hearth.dataplane.segment import cleanup_stale_segments
from hearth.dataplane.shm import SlotPool
print(cleanup_stale_segments(sys.argv[1]), flush=True)
try:
    SlotPool.create(sys.argv[1], [(4096, 2)]).destroy()
    print("created", flush=True)
except FileExistsError as e:
    print("refused:", e, flush=True)
"""
_NS = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare")
def test_a_live_creator_in_another_pid_namespace_keeps_its_segment():
    """Its pid 1 is another process in this namespace's /proc, so by pid and start time it
    looks dead: another process's cleanup (a node agent's start) unlinked the live pool
    under it, and the joined-pods test found no pool file in a parallel suite run. The
    creator's lock says it lives; once it dies, its leftovers are removed as before."""
    name = _unswept_name()
    path = os.path.join(SHM_DIR, name)
    holder = subprocess.Popen(
        [*_NS, _NS_HOLDER, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "1"
        assert not pid_alive(1, segment_info(path)["creator_start"])  # by /proc here: dead
        assert cleanup_stale_segments(name) == []
        with pytest.raises(FileExistsError, match="alive"):
            SlotPool.create(name, [(4096, 2)])
        assert os.path.exists(path)
        SlotPool.attach(name).close()
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
    assert cleanup_stale_segments(name) == [name]
    assert not os.path.exists(path)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare")
def test_a_cleanup_in_another_pid_namespace_keeps_a_live_segment(pool):
    """The reverse: a node agent starting in a container that shares /dev/shm sees no process
    with the host creator's pid. It may neither unlink nor re-create the live pool, also after
    the creator opened and closed the file on other descriptors (closing one of a process's
    descriptors drops its POSIX record locks; the creator's lock is not one). A dead host
    creator's pool is removed from there."""
    SlotPool.attach(pool.name).close()
    assert segment_info(pool.path)["creator_pid"] == os.getpid()
    run = subprocess.run([*_NS, _NS_CLEAN, pool.name], capture_output=True, text=True, timeout=60)
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == "[]", (run.stdout, run.stderr)
    assert lines[1].startswith("refused:") and "alive" in lines[1]
    assert os.path.exists(pool.path) and pool.alloc(10).capacity == 4096
    name = _unswept_name()
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=dp_workers.create_pool_and_hang, args=(name, child))
    proc.start()
    parent.recv()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    run = subprocess.run([*_NS, _NS_CLEAN, name], capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines() == [str([name]), "created"], run.stderr
    assert not os.path.exists(os.path.join(SHM_DIR, name))  # re-created there, then destroyed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's segment")
def test_a_cleanup_leaves_another_users_segment_alone_and_does_not_fail():
    """In the sticky /dev/shm a user cannot remove another's file: a node agent started by one
    user, whose start sweeps stale segments, failed on an old unreadable one of another user
    (EPERM from the unlink). The sweep leaves it and goes on."""
    name = _unswept_name()
    path = os.path.join(SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(b"not readable by nobody")
    os.chmod(path, 0o600)
    os.utime(path, (1, 1))  # old: a half-made segment is swept after 60 s
    try:
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:  # the other user: this process, forked, its uid dropped
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(wr, repr(cleanup_stale_segments(name)).encode())
                os._exit(0)
            except BaseException as e:
                os.write(wr, f"{type(e).__name__}: {e}".encode())
                os._exit(1)
        os.close(wr)
        with os.fdopen(rd) as f:
            out = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert out == "[]"
        assert os.path.exists(path)  # still there: not that user's to remove
    finally:
        os.unlink(path)
