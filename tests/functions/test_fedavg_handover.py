"""The round endpoint lends a receive slot to the next update while a fold pass still reads it
(``recvslots.py``): the pass reports how far it read (``Accumulator.reader``), and the next
writer may write only below that frontier (its credit).

* the pass never reads below its frontier again: bytes overwritten there right after each
  report leave the result exact;
* slot accounting: a handed-over slot is never on the free list twice, a writer that leaves
  gives it back, the pass's end gives the writer all of it;
* whole rounds at N=16 and 32 (tiny models, credits every few KiB): exact for every client,
  every slot back, credits were actually followed.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import numpy as np
import pytest
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import TRIM_OFF
from hearth.functions.fedavg import foldgroups, wire
from hearth.functions.fedavg import foldpasses as passes
from hearth.functions.fedavg.client import RoundClient
from hearth.functions.fedavg.fold import Accumulator
from hearth.functions.fedavg.pack import Header, Layout, pack, packed_size, parse
from hearth.functions.fedavg.recvslots import ALL, RecvSlots
from hearth.functions.fedavg.roundserver import RoundServer

TOKEN = "handover-test-token-0123456789"
SHAPES = [("a", (3000,)), ("b", (17, 100)), ("c", (5000,))]


def update(i: int, r: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(100 * i + r)
    return [(nm, rng.standard_normal(s).astype(np.float32)) for nm, s in SHAPES]


def samples(i: int, r: int) -> int:
    return 5 + 3 * i + r


@pytest.fixture
def pool():
    p = SlotPool.create(
        f"hearth-test-handover-{uuid.uuid4().hex[:8]}", [(1 << 20, 8)], trim_threshold=TRIM_OFF
    )
    yield p
    p.destroy()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_pass_never_reads_behind_its_frontier(monkeypatch, threads):
    """Right after each report, the watcher writes NaN over every input below the reported
    address (what the next writer may do there): the sum is still exactly the sum of the
    original inputs, and the reports move forward to each input's end."""
    monkeypatch.setattr(foldgroups, "READ_REPORT", 500)  # elements between two reports
    ups = [update(i, 1) for i in range(4)]
    bufs = [bytearray(pack(u, samples(i, 1), round=1, client=f"c{i}")) for i, u in enumerate(ups)]
    payloads = [parse(memoryview(b)) for b in bufs]
    lay = Layout.of(ups[0])
    want = Accumulator(lay, check="precheck", threads=threads, chunk=1000)
    want.fold_batch([(p, p.header.n, p.header.client) for p in payloads], validated=True)
    want_sum = want.value.copy()

    reports: list[tuple[list[int], list[int], bool]] = []
    lo = [np.frombuffer(b, np.uint8).ctypes.data for b in bufs]

    def trample(starts: list[int], upto: list[int], final: bool) -> None:
        reports.append((starts, upto, final))
        for b, base, u in zip(bufs, lo, upto, strict=True):
            mem = np.frombuffer(b, np.uint8)
            mem[: u - base] = 0xFF  # NaN (float32 0xFFFFFFFF) below the frontier

    payloads = [parse(memoryview(b)) for b in bufs]
    acc = Accumulator(lay, check="precheck", threads=threads, chunk=1000)  # tasks of 1000
    acc.reader = trample
    errs = acc.fold_batch([(p, p.header.n, p.header.client) for p in payloads], validated=True)
    assert errs == [None] * 4
    assert np.array_equal(acc.value, want_sum)  # bit-identical: nothing read behind the frontier
    assert reports[0][1] == reports[0][0] and not reports[0][2]  # the start: nothing read yet
    assert reports[-1][2] and len(reports) > 4  # progress reports, then the end
    ends = [base + len(b) for base, b in zip(lo, bufs, strict=True)]
    assert reports[-1][1] == ends
    for (_s, a, _f), (_s2, b, _f2) in zip(reports, reports[1:], strict=False):
        assert all(x <= y for x, y in zip(a, b, strict=True))  # each frontier only moves on


def test_an_unchecked_first_pass_is_not_handed_over():
    """A first pass over inputs not known finite may have to refold them one by one (to refuse
    only the bad one): it must not hand their memory on, and does not report."""
    ups = [update(i, 1) for i in range(2)]
    ups[1][2][1][7] = np.nan
    payloads = [
        parse(memoryview(bytearray(pack(u, 3, round=1, client=f"c{i}")))) for i, u in enumerate(ups)
    ]
    acc = Accumulator(Layout.of(ups[0]), check="precheck")
    reports: list = []
    acc.reader = lambda *a: reports.append(a)
    errs = acc.fold_batch([(p, 3, p.header.client) for p in payloads], validated=False)
    assert errs[0] is None and "non-finite" in str(errs[1])
    assert reports == []


def _landed(slots: RecvSlots, nbytes: int):
    rs = slots.take(nbytes)
    rs.land()
    return rs


def test_slot_accounting_through_a_hand_over(pool):
    """A handed-over slot goes back to the free list once; the writer that takes it gets the
    frontier as credit (and every later one), a socket writer waits for it; the pass's release
    ends the read; a writer that leaves mid-pass gives the slot back with the read going on."""
    n = 40_000
    slots = RecvSlots(pool, 1, n)
    base = slots._all[0].base
    old = _landed(slots, n)
    assert slots.held() == 1
    slots.reading([base + 100], [base + 100])  # the pass starts: data from byte 100
    assert slots.handovers == 1 and slots.held() == 0 and slots.reads() == 1
    got: list[int] = []
    granted: list[int] = []
    new = slots.take(n, grant=lambda rs, c: granted.append(c), sink=lambda c: got.append(c) or True)
    assert granted == [100] and new.credit() == 100 and slots.held() == 1
    waited: list[int] = []
    t = threading.Thread(target=lambda: waited.append(new.wait_credit(30_000)))
    t.start()
    slots.reading([base + 100], [base + 20_000])
    assert got == [20_000]
    t.join(timeout=0.2)
    assert t.is_alive()  # 20 000 < 30 000: still waiting
    slots.reading([base + 100], [base + 20_000])  # no progress: no frame
    assert got == [20_000]
    old.release()  # the pass is over (its read ends with its lending)
    t.join(timeout=10)
    assert waited == [ALL] and got == [20_000, 40_000] and slots.reads() == 0
    old.release()  # twice: no effect
    assert slots.held() == 1  # the new writer still has it; never on the free list twice
    new.land()
    # the next pass over the new update; its writer leaves mid-pass
    slots.reading([base + 64], [base + 64])
    assert slots.held() == 0
    third = slots.take(n, sink=lambda c: True)
    third.release()  # left before writing: the slot is free, still read
    assert slots.held() == 0 and slots.reads() == 1
    slots.reading([base + 64], [base + 64], final=True)
    assert slots.reads() == 0 and slots._free.qsize() == 1
    new.release()  # the second pass's lending: ends nothing more, frees nothing more
    assert slots._free.qsize() == 1 and slots.held() == 0
    slots.close()


@pytest.mark.parametrize("n", [16, 32])
def test_rounds_with_hand_over_are_exact_and_return_every_slot(monkeypatch, n):
    """N clients (shared memory in place, shared memory copying, TCP) on 4 slots, 2 rounds:
    passes hand their slots over, writers follow the credits (a report every 2 000 elements,
    SLOT_PROGRESS every 8 KiB), and every client gets the exact FedAvg model."""
    monkeypatch.setattr(foldgroups, "READ_REPORT", 2000)
    pool = SlotPool.create(
        f"hearth-test-handover-{uuid.uuid4().hex[:8]}", [(1 << 20, 8)], trim_threshold=TRIM_OFF
    )
    model = [(nm, np.zeros(s, np.float32)) for nm, s in SHAPES]
    size = packed_size(Header("update", 2**40, Layout.of(model), 2**40, "c" * 64))
    srv = RoundServer(
        n, pool=pool, token=TOKEN, max_update_bytes=size, initial=model, handover=True
    ).start()
    srv.sessions.ingest.progress_bytes = 8192
    reading = srv.slots.reading

    def paused(starts: list[int], upto: list[int], final: bool = False) -> None:
        """A pass starts: while updates of its round are still to come, wait until a writer has
        taken one of its slots (so a copy always runs behind a pass here, on any machine)."""
        reading(starts, upto, final)
        rnd = srv.agg.round
        r = srv.table.find(rnd.round_id) if rnd is not None else None
        deadline = time.monotonic() + 10
        while (
            not final
            and upto == starts
            and r is not None
            and len(r.submitted) < r.expected
            and srv.slots_held() == 0
            and time.monotonic() < deadline
        ):
            time.sleep(0.001)

    for role in srv.plan.entry_roles():
        srv.agg.aggs[role.name].reader = paused
    res: dict = {}
    errors: list = []

    def client(i: int) -> None:
        try:
            with RoundClient(srv.address, TOKEN, f"c{i}", shm=i % 3 != 2, in_place=i % 3 == 0) as c:
                for r in (1, 2):
                    m = c.round(update(i, r), samples(i, r))
                    res[(i, r)] = [a.copy() for _nm, a in m.layers]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"c{i}: {e!r}")

    try:
        ths = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(timeout=120)
        assert not errors and not any(t.is_alive() for t in ths)
        for r in (1, 2):
            total = sum(samples(i, r) for i in range(n))
            for j in range(len(SHAPES)):
                want = sum(update(i, r)[j][1].astype(np.float64) * samples(i, r) for i in range(n))
                want /= total
                for i in range(n):
                    np.testing.assert_allclose(res[(i, r)][j], want, rtol=1e-5, atol=1e-6)
        # writers followed a frontier: shared-memory ones were sent credits, socket reads waited
        assert srv.slots.handovers > 0
        assert srv.slots.credits_sent + srv.slots.credit_waits > 0
        assert srv.slots_held() == 0 and srv.slots.reads() == 0
        assert all(st.folded == n for st in list(srv.stats)[1:])
    finally:
        srv.close()
        pool.destroy()


def _handed_over_server(pool):
    """A (not started) round endpoint with one slot whose update c0 a pass has begun to read
    (frontier at its data's start): the next writer of that slot has only the header as
    credit."""
    model = [(nm, np.zeros(s, np.float32)) for nm, s in SHAPES]
    size = packed_size(Header("update", 2**40, Layout.of(model), 2**40, "c" * 64))
    srv = RoundServer(1, pool=pool, token=TOKEN, max_update_bytes=size, initial=model, fan_in=1)
    buf = pack(update(0, 1), samples(0, 1), round=1, client="c0")
    old = srv.slots.take(len(buf))
    old.view[: len(buf)] = buf
    old.land()
    base = old.kept.base
    data_off = len(buf) - parse(memoryview(buf)).header.layout.data_nbytes
    srv.slots.reading([base + data_off], [base + data_off])
    assert srv.slots.handovers == 1
    return srv, old, len(buf), data_off


def test_slot_progress_past_the_credit_is_refused(pool):
    """A shared-memory writer cannot say it wrote bytes a pass still reads: the server would
    scan the other client's bytes in its place and take its update for checked."""
    srv, old, length, data_off = _handed_over_server(pool)
    try:
        new = srv.slots.take(length, sink=lambda c: True)
        assert new.credit() == data_off
        with pytest.raises(wire.WireError, match="credit"):
            srv.sessions.ingest.progress("c0", new, {"upto": length})
        assert new.done  # refused: the slot went back
        old.release()
        assert srv.slots_held() == 0 and srv.slots.reads() == 0
    finally:
        srv.close()


def test_a_grant_to_a_client_that_does_not_read_never_blocks_the_slots(pool):
    """SLOT_GRANT is sent under the slots' lock (no credit overtakes it): a client whose socket
    is full must not hold that lock (every fold pass's frontier report takes it)."""
    srv, old, length, data_off = _handed_over_server(pool)
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        try:  # fill the server side's send buffer: the client reads nothing
            while True:
                a.send(b"x" * 65536)
        except BlockingIOError:
            pass
        a.setblocking(True)
        out: list = []

        def grant() -> None:
            try:
                out.append(srv.sessions.ingest.grant(a, length, 1, credits=True))
            except OSError as e:
                out.append(e)

        t = threading.Thread(target=grant, daemon=True)
        t.start()
        t.join(timeout=10)
        alive = t.is_alive()
        reported = threading.Thread(
            target=lambda: srv.slots.reading([old.kept.base + data_off], [0], True),
            daemon=True,
        )
        reported.start()
        reported.join(timeout=10)
        assert not alive and not reported.is_alive()
        assert isinstance(out[0], OSError)  # the client is dropped, the slot is back
        old.release()
        assert srv.slots_held() == 0 and srv.slots.reads() == 0
    finally:
        a.close()
        b.close()
        t.join(timeout=10)
        srv.close()


def test_an_interleaved_split_gives_worker_i_every_kth_task():
    """The frontier's arithmetic (first unfinished task = min over workers of i + done·k)
    holds only if worker i takes tasks i, i + k, ... in that order."""
    seen: dict[int, list[int]] = {}
    passes.split(lambda part, i: seen.setdefault(i, list(part)), list(range(10)), 3, True)
    assert seen == {0: [0, 3, 6, 9], 1: [1, 4, 7], 2: [2, 5, 8]}


def test_the_frontier_waits_for_the_slowest_worker():
    """Worker 1 runs ahead: nothing past worker 0's first unfinished task is reported, and the
    frontier never moves back."""
    src = np.zeros(100, np.float32)
    base = passes.Frontier.address(src)
    tasks = [(0, s, s + 10) for s in range(0, 100, 10)]
    got: list[int] = []
    front = passes.Frontier(tasks, [[(src, 0)]], 2, lambda upto: got.extend(upto), 1)
    for _ in range(3):
        front.done(1)  # tasks 1, 3, 5 read; task 0 not yet
    assert got == []
    front.done(0)  # task 0: tasks 0 and 1 are read, task 2 is not
    assert got == [base + 20 * 4]
    front.done(0)  # task 2
    front.done(1)  # task 7 (behind it: task 4 is not read)
    assert got == [base + 20 * 4, base + 40 * 4]
    for _ in range(3):
        front.done(0)  # tasks 4, 6, 8: task 9 (worker 1) is the first unread
    assert got[-1] == base + 90 * 4 and got == sorted(got)


def test_a_writer_without_credits_never_gets_a_slot_still_read_at_close(pool):
    """A client that cannot follow credits waits for the pass to end; if the server closes
    first it gets no slot (it would write all of it while the pass still reads)."""
    slots = RecvSlots(pool, 1, 4096)
    base = slots._all[0].base
    _landed(slots, 4096)
    slots.reading([base + 64], [base + 64])  # handed over, the pass goes on
    out: list = []

    def take() -> None:
        try:
            out.append(slots.take(4096, credits=False))
        except OSError as e:
            out.append(e)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout=0.2)
    assert t.is_alive()  # waits for the pass
    slots.close()
    t.join(timeout=10)
    assert len(out) == 1 and isinstance(out[0], OSError)


def test_update_in_slot_before_the_whole_credit_is_refused(pool):
    """A shared-memory writer that says its update is complete while a pass still reads the
    slot's end is refused, and the slot goes back (still read, on the free list once)."""
    srv, old, length, data_off = _handed_over_server(pool)
    try:
        new = srv.slots.take(length, sink=lambda c: True)
        msg = {"slot": new.slot.index, "gen": new.slot.gen, "length": length}
        with pytest.raises(wire.WireError, match="credited"):
            srv.sessions.ingest.in_slot("c0", new, msg)
        assert new.done and srv.slots_held() == 0 and srv.slots.reads() == 1
        old.release()
        assert srv.slots_held() == 0 and srv.slots.reads() == 0
        assert srv.slots._free.qsize() == 1
    finally:
        srv.close()
