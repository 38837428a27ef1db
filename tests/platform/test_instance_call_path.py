"""The instance's per-call shortcuts (issue #16) keep what they stand for: the serve loop's
descriptor decode, the per-thread msgpack packer, the plain-result checks, and one call through
`Instance.handle` on a real slot pool (the request's metadata, payload and reply in its slot)."""

from __future__ import annotations

import collections
import os
import threading
import time
import types

import msgpack
import pytest
from hearth.dataplane.descriptor import Descriptor, Kind, new_corr
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import payload_offset
from hearth.runtime.codec import META_RESERVE, encode_result, pack_meta, unpack_meta
from hearth.runtime.handling import _awaitable
from hearth.runtime.instance import Instance, RunSpec, _decode
from hearth.runtime.replies import write_slot
from hearth.sdk import OCTET, Response


def test_decode_matches_descriptor_unpack():
    d = Descriptor(
        dst=7, src=1, slot=3, gen=9, length=11, kind=Kind.REPLY, flags=2, status=4,
        corr=new_corr(), sent_ns=123, meta_len=64, aux=5,
    )  # fmt: skip
    frame = d.pack()
    got = _decode(frame)
    assert got == Descriptor.unpack(frame) == d
    assert got.kind == Kind.REPLY and got.pack() == frame
    unknown = Descriptor(kind=99).pack()  # an unknown kind passes through as its int
    assert _decode(unknown).kind == 99


def test_pack_meta_per_thread_and_after_a_failed_pack():
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(2000):
            meta = {"k": k, "i": i, "s": "x" * (i % 50), "h": {"a": str(i)}}
            got = unpack_meta(pack_meta(meta, META_RESERVE if i % 2 else 0))
            if got != meta:
                errors.append(f"{meta} -> {got}")
                return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pytest.raises(TypeError):
        pack_meta({"a": 1, "b": object()})  # fails half-way through the map
    assert pack_meta({"c": 2}) == msgpack.packb({"c": 2}, use_bin_type=True)


def test_awaitable_plain_results_and_awaitables():
    for plain in (b"", b"x", bytearray(b"y"), "s", {}, [], (), 1, 1.5, None, memoryview(b"")):
        assert not _awaitable(plain)

    async def coro() -> int:
        return 1

    c = coro()
    assert _awaitable(c)
    c.close()

    class Awaits(dict):  # a subclass of a plain type is looked at, not assumed plain
        def __await__(self):
            yield from ()

    assert _awaitable(Awaits())

    @types.coroutine
    def gen_coro():
        yield

    g = gen_coro()
    assert _awaitable(g)
    g.close()


def test_encode_result_bytes_and_the_general_path():
    assert encode_result(b"abc", {}) == (200, OCTET, {}, b"abc")

    class Body(bytes):
        pass

    assert encode_result(Body(b"z"), {}) == (200, OCTET, {}, b"z")
    assert encode_result(Response(b"r", 201, "text/x", {"a": "b"}), {}) == (
        201,
        "text/x",
        {"a": "b"},
        b"r",
    )
    assert encode_result({"k": 1}, {})[1:] == ("application/json", {}, b'{"k": 1}')


class _Ep:
    """The endpoint's sending half: the frames sent, for the test to read."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.waiting = 0  # descriptors received and not read yet (`buffered`)

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def send(self, d: Descriptor) -> None:
        self.frames.append(d.pack())

    def buffered(self) -> int:
        return self.waiting


def _instance(pool: SlotPool, handler) -> Instance:
    """An Instance on `pool` with `handler`, its endpoint replaced by `_Ep` (no proxy)."""
    inst = Instance.__new__(Instance)
    inst.boot, inst.instance_id, inst.eid, inst.agent, inst.node = {}, "f-1", 7, 1, "local"
    inst.pool, inst.ep = pool, _Ep()
    inst.send_lock, inst.busy_lock = threading.Lock(), threading.Lock()
    inst.waiters, inst.allocs = {}, {}
    inst.spec = RunSpec("f", "m:h", concurrency=1, timeout_s=30.0)
    inst.handler, inst.is_async, inst.loop, inst.executor = handler, False, None, None
    inst.serving, inst.stopping, inst.inline_ok = True, False, True
    inst.reader = threading.current_thread()
    inst.avg_s, inst.pooled_busy = 0.0, 0
    inst.stash, inst.outq, inst.outq_t0 = collections.deque(), [], 0.0
    return inst


def test_one_call_through_handle_on_a_real_pool():
    pool = SlotPool.create(f"hearth-test-callpath-{os.getpid()}", [(4096, 8)])
    seen = {}

    def handler(event):
        seen.update(
            payload=bytes(event.payload),
            readonly=event.payload.readonly,
            content_type=event.content_type,
            headers=event.headers,
            invocation_id=event.context.invocation_id,
            deadline=event.context.deadline,
            function=event.context.function,
        )
        return b"reply:" + bytes(event.payload)

    try:
        inst = _instance(pool, handler)
        deadline = time.time() + 5
        meta = {
            "function": "f",
            "content_type": "text/plain",
            "headers": {"x-a": "1"},
            "deadline": deadline,
            "idempotency_key": None,
            "invocation_id": "inv-1",
        }
        slot, mlen, blen = write_slot(pool, meta, b"hello", META_RESERVE)
        corr = new_corr()
        d = Descriptor(
            dst=7, src=1, slot=slot.index, gen=slot.gen, length=blen, meta_len=mlen,
            kind=Kind.INVOKE, corr=corr, aux=3,
        )  # fmt: skip
        inst.timed_handle(_decode(d.pack()))
        inst.flush_replies()
        assert seen == {
            "payload": b"hello",
            "readonly": True,
            "content_type": "text/plain",
            "headers": {"x-a": "1"},
            "invocation_id": "inv-1",
            "deadline": deadline,
            "function": "f",
        }
        (frame,) = inst.ep.frames
        r = Descriptor.unpack(frame)
        # the reply went back in the request slot, which stays the agent's (this process)
        assert (r.kind, r.dst, r.src, r.slot, r.gen) == (Kind.REPLY, 1, 7, slot.index, slot.gen)
        assert (r.corr, r.aux, r.status, r.flags) == (corr, 3, 0, 0)
        assert r.sent_ns > 0
        rmeta = unpack_meta(pool.view(r.slot, r.gen, r.meta_len))
        assert rmeta["status"] == 200 and rmeta["content_type"] == OCTET
        body = pool.view(r.slot, r.gen, r.length, payload_offset(r.meta_len))
        assert bytes(body) == b"reply:hello"
        assert pool.creators(slot.index, slot.gen)
        pool.release(slot.index, slot.gen)
    finally:
        pool.destroy()


def test_a_reply_from_a_worker_thread_is_sent_at_once():
    """A call run on a worker thread (a pooled call) sends its reply itself, the same fields
    as the reader's queued one; nothing joins the reader's queue."""
    pool = SlotPool.create(f"hearth-test-callpath-w-{os.getpid()}", [(4096, 8)])
    try:
        inst = _instance(pool, lambda event: b"ok")
        slot, mlen, blen = write_slot(pool, {"invocation_id": "i"}, b"", META_RESERVE)
        corr = new_corr()
        d = Descriptor(
            dst=7, src=1, slot=slot.index, gen=slot.gen, length=blen, meta_len=mlen,
            kind=Kind.INVOKE, corr=corr, aux=4,
        )  # fmt: skip
        t = threading.Thread(target=inst.timed_handle, args=(d,))
        t.start()
        t.join()
        assert inst.outq == []
        (frame,) = inst.ep.frames
        r = Descriptor.unpack(frame)
        assert (r.kind, r.dst, r.src, r.slot, r.gen, r.corr, r.aux) == (
            Kind.REPLY, 1, 7, slot.index, slot.gen, corr, 4,
        )  # fmt: skip
        assert bytes(pool.view(r.slot, r.gen, r.length, payload_offset(r.meta_len))) == b"ok"
        pool.release(slot.index, slot.gen)
    finally:
        pool.destroy()


def test_a_readers_reply_leaves_at_once_unless_more_requests_wait():
    """The reader's reply is sent from the call itself when its next read would block (#19:
    before the call's bookkeeping, not after it); with requests already received it joins
    the queue, and the replies leave together (one send) when the last is done."""
    pool = SlotPool.create(f"hearth-test-callpath-q-{os.getpid()}", [(4096, 8)])
    try:
        inst = _instance(pool, lambda event: b"ok")

        def call() -> Descriptor:
            slot, mlen, blen = write_slot(pool, {"invocation_id": "i"}, b"", META_RESERVE)
            return Descriptor(
                dst=7, src=1, slot=slot.index, gen=slot.gen, length=blen, meta_len=mlen,
                kind=Kind.INVOKE, corr=new_corr(),
            )  # fmt: skip

        inst.timed_handle(call())  # nothing else received: sent at once, nothing queued
        assert len(inst.ep.frames) == 1 and inst.outq == []
        inst.ep.waiting = 1  # a request already received behind it: queued
        first = call()
        inst.timed_handle(first)
        assert len(inst.ep.frames) == 1 and len(inst.outq) == 1
        inst.ep.waiting = 0  # the last one: its read would block, yet one reply waits ahead
        second = call()
        inst.timed_handle(second)
        assert len(inst.ep.frames) == 1 and len(inst.outq) == 2  # in order, behind the first
        inst.flush_replies()
        assert len(inst.ep.frames) == 2 and inst.outq == []
        both = inst.ep.frames[1]
        assert [Descriptor.unpack(both[i : i + 64]).corr for i in (0, 64)] == [
            first.corr,
            second.corr,
        ]
        for f in (inst.ep.frames[0], both[:64], both[64:]):
            r = Descriptor.unpack(f)
            pool.release(r.slot, r.gen)
    finally:
        pool.destroy()
