"""The agent-to-agent link on real sockets and real shared-memory pools (two pools stand for two
nodes): token handshake, slot-to-slot payloads, refusal statuses, a vanished peer, no leaked slot."""

from __future__ import annotations

import asyncio
import os
import socket

import numpy as np
import pytest
from hearth.cluster.landing import ReplySlot, SlotLanding
from hearth.cluster.link import LinkClient, NodeUnavailable
from hearth.cluster.serve import LinkServer
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError, Overloaded, UnknownFunction

TOKEN = b"link-test-token-0123456789"


@pytest.fixture
def pools():
    tag = os.urandom(4).hex()
    a = SlotPool.create(f"hearth-test-la-{tag}", [(64 << 10, 64), (1 << 20, 8), (16 << 20, 2)])
    b = SlotPool.create(f"hearth-test-lb-{tag}", [(64 << 10, 64), (1 << 20, 8), (16 << 20, 2)])
    yield a, b
    a.destroy()
    b.destroy()


class Remote:
    """Node b's side: a link server whose calls land in pool b; the handler records what it saw."""

    def __init__(self, pool: SlotPool, behaviour=None):
        self.pool = pool
        self.seen: list[tuple[str, bytes, bool]] = []
        self.behaviour = behaviour
        self.server = LinkServer("node-b", TOKEN, self.handle, SlotLanding(pool), max_inflight=4)

    async def handle(self, fn, meta, payload, timeout, reply=None):
        try:
            view = payload.slot.buf[payload.offset : payload.offset + payload.length]
            in_pool = np.shares_memory(
                np.frombuffer(view, np.uint8), np.frombuffer(self.pool._mm, np.uint8)
            )
            self.seen.append((fn, bytes(view[:16]), bool(in_pool)))
            total = int(np.frombuffer(view, np.uint8).sum(dtype=np.uint64))
            del view, in_pool
        finally:
            self.pool.release(payload.slot.index, payload.slot.gen)
        if self.behaviour is not None:
            await self.behaviour(fn)
        return {"status": 200, "content_type": "text/plain"}, f"{fn}:{total}".encode()


def take(pool: SlotPool, payload) -> bytes:
    """A landed request's bytes; its slot goes back."""
    view = payload.slot.buf[payload.offset : payload.offset + payload.length]
    try:
        return bytes(view)
    finally:
        del view
        pool.release(payload.slot.index, payload.slot.gen)


async def client_for(server: LinkServer, token: bytes = TOKEN, name: str = "node-b") -> LinkClient:
    return await LinkClient(
        "node-a", name, server.address, token, ping_s=0.2, dead_after_s=0.8
    ).connect()


async def test_payload_lands_in_a_remote_slot_and_the_reply_in_a_local_one(pools):
    a, b = pools
    remote = Remote(b)
    await remote.server.start()
    c = await client_for(remote.server)
    try:
        for size in (0, 1000, 200_000, 5 << 20):
            src = a.put(np.arange(size, dtype=np.uint8))  # the caller's slot
            sink = lambda n, meta: (lambda r: (r.view, r))(ReplySlot(a, meta, n))  # noqa: E731
            rep = await c.call("sum", {}, src.payload, timeout=10, sink=sink)
            src.release()
            want = f"sum:{int(np.arange(size, dtype=np.uint8).sum(dtype=np.uint64))}".encode()
            assert bytes(rep.body.view) == want
            rep.body.release_slot()
            if size:
                assert remote.seen[-1][2], "the payload was not received into node b's pool"
        assert c.stats.sent_bytes == 1000 + 200_000 + (5 << 20)
        assert a.stats()["used"] == 0 and b.stats()["used"] == 0
    finally:
        await c.close()
        await remote.server.close()


async def test_concurrent_calls_of_every_size_each_get_their_own_bytes(pools):
    """Many calls at once on one link, small ones (whole in one read, handled in the reader
    callback, several per read or split over reads) mixed with ones larger than the read buffer
    (streamed straight into slots): every reply carries exactly its own request's bytes, in both
    directions, and no slot is left held."""
    import msgpack
    from hearth.cluster.wire import BUF, HEADER

    a, _ = pools
    b = SlotPool.create(
        f"hearth-test-lc-{os.urandom(4).hex()}", [(64 << 10, 64), (1 << 20, 40), (16 << 20, 4)]
    )

    async def echo(fn, meta, payload, timeout, reply=None):
        data = take(b, payload)
        await asyncio.sleep(len(data) % 3 * 0.001)  # replies come back out of order
        return {"status": 200, "n": len(data)}, data

    server = await LinkServer("node-b", TOKEN, echo, SlotLanding(b), max_inflight=64).start()
    c = await client_for(server)
    # data sizes whose frame (header + meta + data) is exactly the read buffer, the largest
    # handled whole in the reader callback: one for the requests, one for the echoed replies
    # (whose meta grows with n)
    req_meta = msgpack.packb({"function": "echo", "timeout": 20}, use_bin_type=True)
    req_edge = BUF - HEADER.size - len(req_meta)
    rep_edge = BUF - HEADER.size
    for _ in range(4):
        rep_edge = BUF - HEADER.size - len(msgpack.packb({"status": 200, "n": rep_edge}))
    assert HEADER.size + len(msgpack.packb({"status": 200, "n": rep_edge})) + rep_edge == BUF
    edges = [e + d for e in (req_edge, rep_edge) for d in (-1, 0, 1)]
    sizes = [0, 1, 64, 1000, 30_000, *edges, BUF, 200_000, 3 << 20] * 3
    rng = np.random.default_rng(7)
    rng.shuffle(sizes)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    try:
        reps = await asyncio.gather(*(c.call("echo", {}, p, timeout=20) for p in payloads))
        for p, rep in zip(payloads, reps, strict=True):
            assert rep.meta["n"] == len(p) and bytes(rep.body) == p
        assert c.stats.received_bytes == sum(sizes)
        assert a.stats()["used"] == 0 and b.stats()["used"] == 0
    finally:
        await c.close()
        await server.close()
        b.destroy()


async def test_wrong_token_is_refused_and_the_server_keeps_serving(pools):
    a, b = pools
    remote = Remote(b)
    await remote.server.start()
    try:
        with pytest.raises(NodeUnavailable) as e:
            await client_for(remote.server, token=b"not-the-cluster-token-xx")
        assert e.value.status == 503 and "node-b" in e.value.detail
        # a stranger speaking nothing: the server closes on it and carries on
        r, w = await asyncio.open_connection("127.0.0.1", remote.server.port)
        assert (await r.readexactly(8)) == b"HRTHLNK1"
        w.write(b"\xff" * 400)  # a name, a nonce and a MAC that are all wrong
        await r.readexactly(16)
        assert (await asyncio.wait_for(r.read(), 5)) == b"\x00"  # refused, then closed
        w.close()
        # a client that expects another node name at that address is refused too
        with pytest.raises(NodeUnavailable):
            await client_for(remote.server, name="node-z")
        c = await client_for(remote.server)
        assert bytes((await c.call("ok", {}, b"x", timeout=5)).body) == b"ok:120"
        await c.close()
    finally:
        await remote.server.close()


async def test_refusals_keep_their_status_and_leak_nothing(pools):
    a, b = pools

    async def refuse(fn):
        if fn == "ghost":
            raise UnknownFunction(fn)
        if fn == "full":
            raise Overloaded(fn)
        if fn == "boom":
            raise RuntimeError("handler shell broke")

    remote = Remote(b, refuse)
    await remote.server.start()
    c = await client_for(remote.server)
    try:
        for fn, status in (("ghost", 404), ("full", 429), ("boom", 500)):
            with pytest.raises(InvokeError) as e:
                await c.call(fn, {}, b"payload", timeout=5)
            assert e.value.status == status, (fn, e.value)
        # a payload larger than node b's largest slot: 413 from the landing, data drained
        with pytest.raises(InvokeError) as e:
            await c.call("big", {}, bytes(17 << 20), timeout=10)
        assert e.value.status == 413
        # node b's pool full: 429, and the link still carries the next call
        held = [b.alloc(16 << 20) for _ in range(2)]
        with pytest.raises(InvokeError) as e:
            await c.call("big", {}, bytes(9 << 20), timeout=10)
        assert e.value.status == 429 and e.value.error == "no_space"
        for s in held:
            s.release()
        assert bytes((await c.call("ok", {}, b"\x01", timeout=5)).body) == b"ok:1"
        # headers larger than the peer can read: 413 here, and the link still carries calls
        with pytest.raises(InvokeError) as e:
            await c.call("ok", {"headers": {"x": "a" * (70 << 10)}}, b"\x01", timeout=5)
        assert e.value.status == 413 and e.value.error == "meta_too_large"
        assert bytes((await c.call("ok", {}, b"\x03", timeout=5)).body) == b"ok:3"
        assert a.stats()["used"] == 0 and b.stats()["used"] == 0
    finally:
        await c.close()
        await remote.server.close()


async def test_a_peer_that_vanishes_fails_calls_in_flight_with_503_naming_it(pools):
    a, b = pools
    hang = asyncio.Event()

    async def stall(fn):
        await hang.wait()

    remote = Remote(b, stall)
    await remote.server.start()
    c = await client_for(remote.server)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    calls = [asyncio.create_task(c.call("slow", {}, b"x" * 100, timeout=30)) for _ in range(3)]
    await asyncio.sleep(0.3)
    await remote.server.close()  # the node goes away with the calls in flight
    for t in calls:
        with pytest.raises(NodeUnavailable) as e:
            await t
        assert e.value.status == 503 and "node-b" in str(e.value)
    assert loop.time() - t0 < 10  # far inside the calls' 30 s timeout
    with pytest.raises(NodeUnavailable):  # and the link says so to new callers at once
        await c.call("slow", {}, b"", timeout=5)
    await c.close()
    assert a.stats()["used"] == 0 and b.stats()["used"] == 0


async def test_a_silent_peer_is_declared_dead_by_missing_pongs(pools):
    """A node that stops answering without closing (frozen, or its network gone): no RST ever
    comes; the pings find it out and the call fails with 503 well before its timeout."""
    a, _ = pools
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.setblocking(False)
    loop = asyncio.get_running_loop()

    async def accept_and_freeze():
        from hearth.cluster.wire import Reader, handshake_server

        conn, _ = await loop.sock_accept(srv)
        conn.setblocking(False)
        await handshake_server(conn, Reader(conn), TOKEN, "node-b")
        return conn  # ... and never read or write again

    frozen = asyncio.create_task(accept_and_freeze())
    c = await LinkClient(
        "node-a", "node-b", f"127.0.0.1:{srv.getsockname()[1]}", TOKEN, ping_s=0.2, dead_after_s=0.8
    ).connect()
    t0 = loop.time()
    with pytest.raises(NodeUnavailable) as e:
        await c.call("slow", {}, b"x", timeout=30)
    assert "node-b" in str(e.value) and loop.time() - t0 < 10
    await c.close()
    (await frozen).close()
    srv.close()


async def test_a_peer_that_sends_and_never_reads_meets_back_pressure(pools):
    """An authenticated peer that keeps sending requests (and pings) after ``link_busy`` and
    never reads the refusals: once the socket buffers toward it are full, the server stops
    reading that connection instead of starting a task per refusal; the peer's sends block, the
    server's tasks stay bounded, and another peer's calls are still served."""
    import msgpack
    from hearth.cluster.serve import MAX_PENDING_ANSWERS
    from hearth.cluster.wire import PING, REQ, Reader, frame, handshake_client, tune

    a, b = pools
    hang = asyncio.Event()

    async def stall(fn):
        if fn == "hold":
            await hang.wait()

    remote = Remote(b, stall)
    remote.server.max_inflight = 1
    await remote.server.start()
    loop = asyncio.get_running_loop()
    rude = socket.socket()
    rude.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few refusals
    good = None
    try:
        tune(rude)
        await loop.sock_connect(rude, ("127.0.0.1", remote.server.port))
        await handshake_client(rude, Reader(rude), TOKEN, "node-rude")
        meta = msgpack.packb({"function": "hold", "timeout": 30}, use_bin_type=True)
        rude.sendall(frame(REQ, 1, meta, 1) + b"x")  # takes the one place in flight, holds it
        burst = b"".join(frame(REQ, 2 + i, meta) + frame(PING, 0, b"") for i in range(500))
        # 100,000 requests and as many pings, 7 MB: the refusals (~95 B each) fill the server's
        # socket send buffer (up to 4 MiB on Linux) long before the end
        out = memoryview(burst * 200)
        most_tasks = sent = 0
        while sent < out.nbytes:
            try:
                sent += rude.send(out[sent : sent + 65536])
            except BlockingIOError:  # the server stopped taking bytes: wait a little for it
                w = loop.create_future()
                loop.add_writer(rude, lambda w=w: w.done() or w.set_result(None))
                try:
                    await asyncio.wait_for(w, 1.0)
                except TimeoutError:
                    break  # it reads no more: back-pressure
                finally:
                    loop.remove_writer(rude)
            await asyncio.sleep(0)  # the server's callbacks and tasks run
            most_tasks = max(most_tasks, len(remote.server._work))
        # the held call, its refusals and pongs waiting to go out: nothing more
        assert most_tasks <= 1 + MAX_PENDING_ANSWERS, most_tasks
        assert sent < out.nbytes, "the server read everything the peer sent without answering"
        good = await client_for(remote.server)
        assert bytes((await good.call("ok", {}, b"\x02", timeout=5)).body) == b"ok:2"
    finally:
        hang.set()
        rude.close()
        if good is not None:
            await good.close()
        await remote.server.close()
    assert b.stats()["used"] == 0


async def test_reply_headers_too_large_for_the_link_are_an_error_not_a_broken_link(pools):
    _, b = pools

    async def handler(fn, meta, payload, timeout, reply=None):
        b.release(payload.slot.index, payload.slot.gen)
        size = 70 << 10 if fn == "huge" else 1
        return {"status": 200, "headers": {"x": "a" * size}}, b"body"

    server = await LinkServer("node-b", TOKEN, handler, SlotLanding(b)).start()
    c = await client_for(server)
    try:
        with pytest.raises(InvokeError) as e:
            await c.call("huge", {}, b"x", timeout=5)
        assert e.value.status == 502 and e.value.error == "reply_meta_too_large"
        rep = await c.call("small", {}, b"x", timeout=5)
        assert bytes(rep.body) == b"body" and rep.meta["headers"] == {"x": "a"}
        assert b.stats()["used"] == 0
    finally:
        await c.close()
        await server.close()


async def test_early_replies_leave_whole_from_a_buffer_reused_at_once(pools, monkeypatch):
    """A reply sent the moment its body exists (``reply``, as the agent's reader callback does
    from the instance's reply slot) reaches its caller whole even when the socket takes only
    part of it and the body's buffer is reused right after (the rest is copied and finishes
    under the write lock); when it cannot go at once, what the handler returns is sent, once."""
    from hearth.cluster import wire, writer

    a, b = pools
    rests: list[int] = []
    real_rest = wire.send_rest

    async def counted_rest(sock, lock, rest, *args, **kw):
        rests.append(sum(v.nbytes for v in rest))
        await real_rest(sock, lock, rest, *args, **kw)

    monkeypatch.setattr(wire, "send_rest", counted_rest)  # serve.py's early reply
    monkeypatch.setattr(writer, "send_rest", counted_rest)  # send_frame's rest
    real_tune = wire.tune

    def small_buffers(sock):  # the socket takes a big reply in parts
        real_tune(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)

    monkeypatch.setattr(wire, "tune", small_buffers)
    early: dict[bytes, bool] = {}

    async def handler(fn, meta, payload, timeout, reply=None):
        data = take(b, payload)
        slot = bytearray(data)  # stands for the instance's reply slot
        reply({"status": 200, "how": "early"}, memoryview(slot))
        early[data[:8]] = reply.sent
        slot[:] = bytes(len(slot))  # the slot is freed and reused at once
        await asyncio.sleep(0)
        return {"status": 200, "how": "returned"}, data

    server = await LinkServer("node-b", TOKEN, handler, SlotLanding(b), max_inflight=64).start()
    c = await client_for(server)
    rng = np.random.default_rng(11)
    sizes = [64, 20_000, 200_000, 900_000] * 6
    payloads = [i.to_bytes(8, "little") + rng.bytes(n) for i, n in enumerate(sizes)]
    try:
        reps = await asyncio.gather(*(c.call("echo", {}, p, timeout=20) for p in payloads))
        for p, rep in zip(payloads, reps, strict=True):
            assert rep.meta["how"] == ("early" if early[p[:8]] else "returned")
            assert bytes(rep.body) == p
        n_early = sum(early.values())
        assert server.stats.early_replies == n_early
        assert 0 < n_early < len(payloads)  # both ways taken: at once, and after a busy lock
        assert rests  # and some early replies only partly taken by the socket
        assert a.stats()["used"] == 0 and b.stats()["used"] == 0
        rep = await c.call("echo", {}, b"after-all-that", timeout=5)  # the link carries on
        assert bytes(rep.body) == b"after-all-that"
    finally:
        await c.close()
        await server.close()


async def test_the_serving_agent_yields_its_cpu_only_when_serving_one_call(pools, monkeypatch):
    """After an early reply the agent yields its CPU to the caller it woke, but not while other
    calls are being served (their frames must not wait behind whatever else the CPU runs)."""
    from hearth.cluster import serve

    _, b = pools
    yields: list[int] = []
    monkeypatch.setattr(serve.os, "sched_yield", lambda: yields.append(1))

    async def handler(fn, meta, payload, timeout, reply=None):
        data = take(b, payload)
        await asyncio.sleep(0.01)  # the instance at work: calls overlap when sent together
        reply({"status": 200}, memoryview(data))
        return {"status": 200}, data

    server = await LinkServer("node-b", TOKEN, handler, SlotLanding(b), max_inflight=64).start()
    c = await client_for(server)
    try:
        for i in range(5):
            assert (await c.call("echo", {}, b"%d" % i, timeout=5)).body == b"%d" % i
        assert len(yields) == server.stats.early_replies == 5
        reps = await asyncio.gather(*(c.call("echo", {}, b"x%d" % i, timeout=5) for i in range(20)))
        assert [r.body for r in reps] == [b"x%d" % i for i in range(20)]
        assert server.stats.early_replies == 25
        assert len(yields) <= 12  # 5 + the last of the overlapping calls (without the rule: 25)
    finally:
        await c.close()
        await server.close()


async def test_calls_in_flight_share_one_deadline_timer_and_each_still_times_out(pools):
    """The link client keeps no timer per call (a handle, two heap operations and a cancelled
    entry each): many calls waiting on the peer leave one timer pending, and a call whose
    peer does not answer in time still gets its 504 while the others are answered."""
    _, b = pools
    release = asyncio.Event()

    async def handler(fn, meta, payload, timeout, reply=None):
        data = take(b, payload)
        if fn == "slow":
            await asyncio.sleep(30)
        await release.wait()
        return {"status": 200}, data

    server = await LinkServer("node-b", TOKEN, handler, SlotLanding(b), max_inflight=64).start()
    c = await client_for(server)
    loop = asyncio.get_running_loop()
    try:
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        calls = [asyncio.ensure_future(c.call("f", {}, b"%d" % i, timeout=20)) for i in range(40)]
        for _ in range(1000):  # until every call is on the wire and waiting (10 s at most)
            if server.stats.calls == 40:
                break
            await asyncio.sleep(0.01)
        assert server.stats.calls == 40
        assert len(loop._scheduled) - before <= 2  # type: ignore[attr-defined]  # was 40
        with pytest.raises(InvokeError) as e:
            await asyncio.wait_for(c.call("slow", {}, b"s", timeout=0.3), 10)
        assert e.value.status == 504
        release.set()
        reps = await asyncio.gather(*calls)
        assert [r.body for r in reps] == [b"%d" % i for i in range(40)]
    finally:
        await c.close()
        await server.close()


def test_a_request_meta_is_decoded_once_per_distinct_bytes_and_each_call_gets_its_own_copy(
    monkeypatch,
):
    """The serving side decodes a caller's repeated meta once; a call that changes what it got
    (or its headers) changes nothing another call sees; the memo stays bounded."""
    import msgpack
    from hearth.cluster import serve

    decoded: list[int] = []
    real = msgpack.unpackb

    def counted(raw, *a, **kw):
        decoded.append(1)
        return real(raw, *a, **kw)

    monkeypatch.setattr(serve.msgpack, "unpackb", counted)
    memo = serve.MetaMemo()
    raw = msgpack.packb({"function": "f", "headers": {"x-a": "1"}, "timeout": 5.0})
    first = memo(memoryview(raw))
    first["function"] = "changed"
    first["headers"]["x-a"] = "changed"
    second = memo(memoryview(bytearray(raw)))
    assert second == {"function": "f", "headers": {"x-a": "1"}, "timeout": 5.0}
    assert len(decoded) == 1  # the second call was not decoded again
    assert memo(memoryview(b"")) == {}
    big = msgpack.packb({"function": "f", "pad": "x" * serve.META_MEMO_BYTES})
    assert memo(memoryview(big))["function"] == "f" and len(decoded) == 2
    for i in range(3 * serve.META_MEMO):
        assert memo(memoryview(msgpack.packb({"function": f"f{i}"})))["function"] == f"f{i}"
    assert len(memo.known) <= serve.META_MEMO


async def test_a_call_started_without_a_task_is_answered_once_in_the_callback_that_ends_it(pools):
    """`LinkClient.start` (node a's gateway forwarding without a task): its `done` runs in the
    callback that settles the call, outside any task, exactly once, with the reply, the peer's
    refusal status, 504 at the deadline (a late reply then dropped), or 503 naming the node when
    the link goes; at the in-flight bound it starts nothing (the caller then waits in `call`)."""
    a, b = pools
    hang = asyncio.Event()

    async def behave(fn):
        if fn == "ghost":
            raise UnknownFunction(fn)
        if fn == "full":
            raise Overloaded(fn)
        if fn in ("slow", "stall"):
            await asyncio.wait_for(hang.wait(), 1.0 if fn == "slow" else 30)

    remote = Remote(b, behave)  # max_inflight=4 on node b's side
    await remote.server.start()
    c = LinkClient("node-a", "node-b", remote.server.address, TOKEN, max_inflight=2)
    c.ping_s, c.dead_after_s = 0.2, 5.0
    await c.connect()
    got: dict[str, list] = {}

    def start(key: str, fn: str, payload: bytes, timeout: float = 5) -> bool:
        got[key] = []

        def done(outcome):
            got[key].append((outcome, asyncio.current_task()))

        return c.start(fn, {}, payload, timeout=timeout, done=done)

    async def settled(*keys: str) -> None:
        for _ in range(1000):
            if all(got[k] for k in keys):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never answered: {[k for k in keys if not got[k]]}")

    try:
        assert start("ok", "ok", b"\x02\x03") and start("ghost", "ghost", b"x")
        await settled("ok", "ghost")
        (rep, task), (err, task2) = got["ok"][0], got["ghost"][0]
        assert task is None and task2 is None  # in the reader callback, not a resumed task
        assert rep.body == b"ok:5" and rep.meta["status"] == 200
        assert isinstance(err, InvokeError) and err.status == 404
        assert start("full", "full", b"x")
        await settled("full")
        assert got["full"][0][0].status == 429  # the peer's refusal keeps its status
        # the deadline: 504 from the timer; the reply that comes later is dropped
        assert start("slow", "slow", b"x", timeout=0.3)
        await settled("slow")
        assert got["slow"][0][0].status == 504 and got["slow"][0][1] is None
        # two calls in flight fill this link's bound: a third is not started (nothing sent)
        assert start("s1", "stall", b"x", timeout=30) and start("s2", "stall", b"x", timeout=30)
        assert not start("s3", "ok", b"x")
        await asyncio.sleep(1.2)  # the slow call's late reply has come and gone meanwhile
        assert len(got["slow"]) == 1 and not got["s1"] and remote.server.stats.calls == 6
        await remote.server.close()  # node b goes away with two calls in flight
        await settled("s1", "s2")
        for k in ("s1", "s2"):
            (e, _t), *more = got[k]
            assert isinstance(e, NodeUnavailable) and e.status == 503 and "node-b" in str(e)
            assert not more
        assert not start("after", "ok", b"x")  # the link is down: the caller's `call` says so
        assert all(len(v) == 1 for k, v in got.items() if k not in ("s3", "after"))
        assert c.stats.started == 6 and not c.calls
    finally:
        hang.set()
        await c.close()
        await remote.server.close()
    assert a.stats()["used"] == 0 and b.stats()["used"] == 0


async def test_a_starter_serves_calls_without_a_task_and_declines_to_the_handler(pools):
    """Node b's side with a starter (the agent's warm call with nothing to wait for): a call it
    takes is answered from its callbacks (the early reply, or the outcome sent after), with no
    task; a refusal keeps its status, a starter's bug is a 500 and the link carries on; a call
    it declines goes to the handler's task. The books close on every path (nothing in flight)."""
    _, b = pools
    loop = asyncio.get_running_loop()
    tasks: list = []

    async def handler(fn, meta, payload, timeout, reply=None):
        tasks.append(asyncio.current_task())
        return {"status": 200}, b"task:" + take(b, payload)

    def starter(fn, meta, payload, timeout, reply, done):
        if fn == "decline":
            return False
        data = take(b, payload)
        if fn == "bug":  # (having dropped the payload, as the agent's start_call does)
            raise RuntimeError("starter broke")
        if fn == "early":  # the reply hook sends it at once; done only closes the books
            loop.call_soon(reply, {"status": 201}, memoryview(b"early:" + data))
            loop.call_soon(done, ({"status": 201}, b"early:" + data))
        elif fn == "late":  # no early reply: the outcome is what goes back
            loop.call_soon(done, ({"status": 202}, b"late:" + data))
        else:
            loop.call_soon(done, Overloaded(fn))
        return True

    server = LinkServer("node-b", TOKEN, handler, SlotLanding(b), starter=starter)
    await server.start()
    c = await client_for(server)
    try:
        r1, r2, r3 = await asyncio.gather(
            c.call("early", {}, b"1", timeout=5),
            c.call("late", {}, b"2", timeout=5),
            c.call("decline", {}, b"3", timeout=5),
        )
        assert (r1.meta["status"], bytes(r1.body)) == (201, b"early:1")
        assert (r2.meta["status"], bytes(r2.body)) == (202, b"late:2")
        assert (r3.meta["status"], bytes(r3.body)) == (200, b"task:3") and len(tasks) == 1
        for fn, status in (("full", 429), ("bug", 500)):
            with pytest.raises(InvokeError) as e:
                await c.call(fn, {}, b"x", timeout=5)
            assert e.value.status == status
        assert bytes((await c.call("early", {}, b"4", timeout=5)).body) == b"early:4"
        assert server.stats.served_now == 4 and server.stats.early_replies >= 2
        await asyncio.sleep(0.05)
        assert server.inflight == 0 and len(tasks) == 1
    finally:
        await c.close()
        await server.close()
    assert b.stats()["used"] == 0


async def test_a_malformed_request_frame_is_that_calls_400_and_the_connection_goes_on(pools):
    """An authenticated peer's request frame whose meta cannot be decoded, is not a map, or
    names no usable function or timeout (small, and larger than the read buffer) gets a 400
    `bad_request` for that request id alone, takes no slot, and the calls before and after it
    on the same connection are answered as usual. A frame whose header is impossible (meta
    longer than any frame may carry) loses the framing: that connection ends, others go on."""
    import msgpack
    from hearth.cluster.wire import (
        BUF,
        ERR,
        HEADER,
        MAX_META,
        REP,
        REQ,
        LinkError,
        Reader,
        frame,
        handshake_client,
    )

    a, b = pools
    remote = Remote(b)
    await remote.server.start()
    loop = asyncio.get_running_loop()
    peer = socket.socket()
    peer.setblocking(False)
    good = None
    try:
        await loop.sock_connect(peer, ("127.0.0.1", remote.server.port))
        reader = Reader(peer)
        await handshake_client(peer, reader, TOKEN, "node-odd")
        ok = msgpack.packb({"function": "ok", "timeout": 5}, use_bin_type=True)
        big = BUF + 1000  # streamed straight into a slot when well-formed
        bad = [
            b"\xc1",  # never valid msgpack
            msgpack.packb([1, 2]),  # not a map
            msgpack.packb({"function": "ok", "timeout": "soon"}),
            msgpack.packb({"function": 7, "timeout": 5}),
            msgpack.packb({"function": "ok", "timeout": float("nan")}),
            msgpack.packb({"function": "ok", "timeout": -1}),
            b"\x81\x91\x01\x02",  # a map with a list for a key
        ]
        out = frame(REQ, 1, ok, 1) + b"\x01"
        for i, meta in enumerate(bad):
            out += frame(REQ, 10 + i, meta, 3) + b"abc"
        out += frame(REQ, 20, b"\xc1", big) + b"z" * big  # a large one, streamed
        out += frame(REQ, 2, ok, 1) + b"\x02"
        await loop.sock_sendall(peer, out)
        answers = {}
        while len(answers) < 2 + len(bad) + 1:
            kind, _f, status, meta_len, rid, n = await asyncio.wait_for(reader.header(), 10)
            meta = msgpack.unpackb(bytes(await reader.exact(meta_len))) if meta_len else {}
            data = bytes(await reader.exact(n)) if n else b""
            answers[rid] = (kind, status, meta.get("error"), data)
        assert answers[1] == (REP, 0, None, b"ok:1")
        assert answers[2] == (REP, 0, None, b"ok:2")
        for rid in [*range(10, 10 + len(bad)), 20]:
            assert answers[rid][:3] == (ERR, 400, "bad_request"), (rid, answers[rid])
        assert [s[0] for s in remote.seen] == ["ok", "ok"]  # the bad ones reached no handler
        assert b.stats()["used"] == 0
        # the framing itself lost: that connection is closed; the server serves others
        await loop.sock_sendall(peer, HEADER.pack(REQ, 0, 0, MAX_META + 1, 3, 0))
        with pytest.raises(LinkError, match="closed"):
            await asyncio.wait_for(reader.header(), 10)
        good = await client_for(remote.server)
        assert bytes((await good.call("ok", {}, b"\x03", timeout=5)).body) == b"ok:3"
    finally:
        peer.close()
        if good is not None:
            await good.close()
        await remote.server.close()
    assert b.stats()["used"] == 0
