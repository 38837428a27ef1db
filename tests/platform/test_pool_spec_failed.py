"""A warm-pool instance whose specialisation fails (its handler cannot be loaded) reports it
and ends, as a new instance whose start fails does. It does not run the request the agent sent
ahead of its report (#19: the spec and the first request come in one message) without a
handler: that answered the caller 500 `handler_error` whenever the reply beat the agent's kill,
instead of the 502 `cold_start_failed` every failed start gets (seen racing in
test_pool_spec_slot.py). The instance runs its real serve loop on a real slot pool; the frames
it reads are given, what it sends is kept."""

from __future__ import annotations

import collections
import os
import threading
import uuid

from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.dataplane.shm import SlotPool
from hearth.runtime.codec import unpack_meta
from hearth.runtime.instance import Instance, write_slot

AGENT = 1


class Frames:
    """An endpoint that hands out `frames`, then reports the data plane closed; what is sent
    through it is kept in `sent`."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames, self.sent = frames, []

    def buffered(self) -> bool:
        return bool(self.frames)

    def recv_frame(self) -> bytes:
        if not self.frames:
            raise ConnectionError("no more frames")
        return self.frames.pop(0)

    def send_frame(self, frame: bytes) -> None:
        self.sent.append(frame)


class Pooled(Instance):
    """A pool instance before its spec (what `Instance.__init__` sets, without its endpoint
    and pool attach), on `pool`, reading `frames`; every send kept in `sent`."""

    def __init__(self, pool: SlotPool, frames: list[bytes]) -> None:
        self.instance_id, self.eid, self.agent, self.node = "pool-1", 7, AGENT, "local"
        self.boot, self.phases, self.pool, self.ep = {}, {}, pool, Frames(frames)
        self.send_lock = threading.Lock()
        self.waiters, self.spec, self.handler, self.loop, self.executor = {}, None, None, None, None
        self.is_async = False
        self.serving = self.stopping = False
        self.exit_code = 0
        self.allocs = {}
        self.reader = threading.current_thread()
        self.inline_ok, self.avg_s, self.pooled_busy = True, 1.0, 0
        self.busy_lock = threading.Lock()
        self.stash = collections.deque()
        self.outq, self.outq_t0 = [], 0.0
        self.sent: list[Descriptor] = []

    def send(self, d: Descriptor) -> None:  # type: ignore[override]
        self.sent.append(d)


def _spec(handler: str) -> dict:
    return {
        "name": "f",
        "handler": handler,
        "init": None,
        "code_path": None,
        "env": {},
        "concurrency": 1,
        "timeout_s": 5.0,
    }


def test_a_pool_instance_whose_handler_fails_to_load_ends_without_running_the_request() -> None:
    pool = SlotPool.create(f"hearth-specfail-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        spec, smlen, _ = write_slot(pool, {"spec": _spec("json:no_such_handler")}, b"")
        req, rmlen, rlen = write_slot(pool, {"content_type": "application/json"}, b"{}")
        frames = [
            spec.descriptor(7, AGENT, meta_len=smlen).pack(),
            req.descriptor(7, AGENT, length=rlen, meta_len=rmlen, corr=b"r" * 16).pack(),
        ]
        inst = Pooled(pool, frames)
        assert inst.serve() == 1  # ended, as a start that fails does (not "data plane closed")
        if inst.executor is not None:  # (a request run on a worker thread: its answer too)
            inst.executor.shutdown(wait=True)
        (report,) = inst.sent  # the failure, and nothing answering the request
        assert report.kind == Kind.PONG
        meta = unpack_meta(pool.view(report.slot, report.gen, report.meta_len))
        assert meta["type"] == "failed" and "no_such_handler" in meta["error"]
        assert inst.ep.sent == []  # no reply queued and flushed either
        assert inst.ep.frames  # the request was never read
        assert pool.owner(req.index, req.gen) is not None  # its slot left to the agent
    finally:
        pool.destroy()


def test_a_pool_instance_whose_handler_loads_runs_the_request_sent_with_its_spec() -> None:
    """The same two frames with a handler that loads: the request is run (the harness holds)."""
    pool = SlotPool.create(f"hearth-specok-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        spec, smlen, _ = write_slot(pool, {"spec": _spec("json:dumps")}, b"")
        req, rmlen, rlen = write_slot(pool, {"content_type": "application/json"}, b"{}")
        frames = [
            spec.descriptor(7, AGENT, meta_len=smlen).pack(),
            req.descriptor(7, AGENT, length=rlen, meta_len=rmlen, corr=b"r" * 16).pack(),
        ]
        inst = Pooled(pool, frames)
        assert inst.serve() == 1  # the frames ran out: "data plane closed"
        if inst.executor is not None:
            inst.executor.shutdown(wait=True)
        assert [d.kind for d in inst.sent][:1] == [Kind.PONG]
        answered = len(inst.sent) > 1 or inst.ep.sent
        assert answered, "the request sent with the spec was run and answered"
    finally:
        pool.destroy()
