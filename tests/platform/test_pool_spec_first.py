"""A warm-pool instance takes its first message for its spec. One that carries none (a request
that overtook its spec) is reported as precisely that, and its slot is left alone: a chained
call's request slot is its caller's, lent (BORROWED) with one reference the agent holds for the
call; releasing it here dropped a reference the instance never had, so the slot was freed under
its caller at the call's end. The instance runs on a real slot pool; what it sends is kept."""

from __future__ import annotations

import os
import uuid

from hearth.dataplane.descriptor import Descriptor, Flags, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import payload_offset
from hearth.runtime.codec import unpack_meta
from hearth.runtime.instance import Instance, write_slot


class Unspecialised(Instance):
    """A pool instance before its spec, on `pool`; its sends kept in `sent`."""

    def __init__(self, pool: SlotPool) -> None:  # (no endpoint: nothing is read here)
        self.pool, self.agent, self.phases, self.spec = pool, 1, {}, None
        self.sent: list[Descriptor] = []

    def send(self, d: Descriptor) -> None:  # type: ignore[override]
        self.sent.append(d)


def _report(inst: Unspecialised) -> dict:
    (d,) = inst.sent
    assert d.kind == Kind.PONG
    meta = unpack_meta(inst.pool.view(d.slot, d.gen, d.meta_len))
    inst.pool.release(d.slot, d.gen)
    return meta


def test_a_request_before_the_spec_is_reported_and_its_lent_slot_left_alone() -> None:
    pool = SlotPool.create(f"hearth-spec1-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        inst = Unspecialised(pool)
        slot, mlen, blen = write_slot(pool, {"function": "echo"}, b"hi-chain")
        pool.incref(slot.index, slot.gen)  # the agent's reference for the chained call
        d = slot.descriptor(7, 1, length=blen, meta_len=mlen, flags=Flags.BORROWED, corr=b"c" * 16)
        inst.handle_specialise(d)
        meta = _report(inst)
        assert meta["type"] == "failed"
        assert "spec_read" not in meta  # the agent frees the spec (on its way) at the exit
        assert meta["error"] == (
            f"pool instance: its first message (kind INVOKE, corr {(b'c' * 16).hex()}) "
            "carried no spec: the spec must come first"
        )
        # both references are still there: the agent's (dropped at the call's end) and the
        # caller's own (its request), and the payload is intact
        payload = pool.view(slot.index, slot.gen, blen, offset=payload_offset(mlen))
        assert bytes(payload) == b"hi-chain"
        del payload
        assert pool.release(slot.index, slot.gen) == 1
        assert pool.release(slot.index, slot.gen) == 0
    finally:
        pool.destroy()


def test_a_spec_is_read_and_its_slot_left_to_the_agent() -> None:
    """The usual first message: the instance reads the agent's spec slot, marked as one
    (`Flags.SPEC`), and leaves it (no pool lock before its import, #19); the agent frees it
    when the report comes (or the instance ends: `test_pool_start.py::test_the_agent_frees_a_
    spec_slot_*`). An unmarked spec: `test_pool_spec_mark.py`."""
    pool = SlotPool.create(f"hearth-spec2-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        inst = Unspecialised(pool)
        slot, mlen, _ = write_slot(pool, {"spec": {"name": "f"}}, b"")  # not a valid RunSpec
        inst.handle_specialise(slot.descriptor(7, 1, meta_len=mlen, flags=Flags.SPEC))
        meta = _report(inst)
        assert "carried no spec" not in meta["error"]  # read as a spec (a bad one)
        assert meta["spec_read"] is True  # so the agent frees the slot at this report
        assert pool.owner(slot.index, slot.gen) is not None  # still the agent's, in use
        assert unpack_meta(pool.view(slot.index, slot.gen, mlen)) == {"spec": {"name": "f"}}
        assert pool.release(slot.index, slot.gen) == 0  # one reference: the agent's
    finally:
        pool.destroy()
