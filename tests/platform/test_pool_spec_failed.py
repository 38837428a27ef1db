"""A warm-pool instance whose specialisation fails (its handler cannot be loaded) reports it
and runs no request until the agent stops it. The request the agent sent ahead of that report
(#19: the spec and the first request come in one message) ran without a handler and answered
the caller 500 `handler_error` whenever that reply beat the agent's kill, instead of the 502
`cold_start_failed` every failed start gets (seen racing in test_pool_spec_slot.py). The
instance runs its real serve loop on a real slot pool; the frames it reads are given, what it
sends is kept."""

from __future__ import annotations

import collections
import os
import threading
import uuid

from hearth.dataplane.descriptor import Descriptor, Flags, Kind
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
        self.serving = self.stopping = self.failed = False
        self.allocs = {}
        self.reader = threading.current_thread()
        self.inline_ok, self.avg_s, self.pooled_busy = True, 1.0, 0
        self.busy_lock = threading.Lock()
        self.stash = collections.deque()
        self.outq, self.outq_t0 = [], 0.0
        self.sent: list[Descriptor] = []

    def send(self, d: Descriptor, *_: object) -> None:  # type: ignore[override]
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


def _served(pool: SlotPool, handler: str) -> tuple[Pooled, object]:
    """A pool instance read its spec (`handler`) and a request sent with it, to the end of its
    frames ("data plane closed"), any handler thread done; and the request's slot."""
    spec, smlen, _ = write_slot(pool, {"spec": _spec(handler)}, b"")
    req, rmlen, rlen = write_slot(pool, {"content_type": "application/json"}, b"{}")
    frames = [
        spec.descriptor(7, AGENT, meta_len=smlen, flags=Flags.SPEC).pack(),  # as the agent sends
        req.descriptor(7, AGENT, length=rlen, meta_len=rmlen, corr=b"r" * 16).pack(),
    ]
    inst = Pooled(pool, frames)
    assert inst.serve() == 1  # its frames ran out
    if inst.executor is not None:  # (a request run on a handler thread: its answer too)
        inst.executor.shutdown(wait=True)
    return inst, req


def _answers(inst: Pooled) -> list:
    """What the instance sent or queued besides its first report."""
    return inst.sent[1:] + inst.ep.sent + inst.outq


def test_a_pool_instance_whose_handler_fails_to_load_runs_no_request() -> None:
    pool = SlotPool.create(f"hearth-specfail-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        inst, req = _served(pool, "json:no_such_handler")
        report = inst.sent[0]
        assert report.kind == Kind.PONG
        meta = unpack_meta(pool.view(report.slot, report.gen, report.meta_len))
        assert meta["type"] == "failed" and "no_such_handler" in meta["error"]
        assert _answers(inst) == []  # nothing answers the request sent with the spec
        assert inst.executor is None  # nor was it handed to a handler thread
        assert pool.owner(req.index, req.gen) is not None  # its slot left to the agent
    finally:
        pool.destroy()


def test_a_pool_instance_whose_handler_loads_runs_the_request_sent_with_its_spec() -> None:
    """The same frames with a handler that loads: the request is run and answered (so the
    harness would see an answer if the failed one ran its request)."""
    pool = SlotPool.create(f"hearth-specok-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        inst, _ = _served(pool, "json:dumps")
        assert inst.sent[0].kind == Kind.PONG
        assert _answers(inst), "the request sent with the spec was run and answered"
    finally:
        pool.destroy()
