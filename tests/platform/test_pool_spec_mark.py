"""A pool instance's spec is marked as one (`Flags.SPEC`) by the agent that sends it, so the
instance knows who frees its slot, whichever build each side is:

- marked (an agent of this build): the instance reads the slot and leaves it; the agent frees it
  at the report that says it was read (no pool lock before the import, #19);
- not marked (an agent of an earlier build): the instance frees it itself once read, before its
  report. An agent from before 7 Dec 2026 never frees it (it was the instance's to free), and
  one of 7 Dec 2026 before the mark frees it at that report, finding it freed (its generation
  moved on): nothing is freed twice, even when the slot is in use again by then.

Until the mark, a pool instance of this build on an agent from before 7 Dec 2026 left the slot
to an agent that never freed it: one slot per pool start, for the agent's lifetime (the upgrade
order rule of docs/kubernetes.md). The runner and the runtime are real, on a real slot pool;
the runner's link records what it would send, and the instance's sends are kept."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from hearth.agent.instance import ProcessInstance
from hearth.agent.runner import ProcessRunner, instance_spec
from hearth.dataplane.descriptor import Descriptor, Flags, Kind
from hearth.dataplane.shm import SlotPool
from hearth.runtime.codec import unpack_meta
from hearth.runtime.instance import write_slot
from hearth.spec import parse_spec
from test_pool_spec_first import Unspecialised, _report


@pytest.fixture
def pool():
    p = SlotPool.create(f"hearth-specmark-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        yield p
    finally:
        p.destroy()


class _Recorded:
    """A data-plane link on a real slot pool that keeps what it is given to send."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool, self.sent = pool, []

    def post(self, d: Descriptor) -> None:
        self.sent.append(d)

    hold = post


def _spec(handler: str) -> dict[str, Any]:
    return instance_spec(parse_spec({"name": "f", "handler": handler}))


@pytest.mark.parametrize("handler", ["json:dumps", "json:no_such_handler"])
def test_the_agents_spec_is_marked_and_its_slot_left_to_the_agent(pool, handler) -> None:
    link = _Recorded(pool)
    runner = ProcessRunner(
        link,  # type: ignore[arg-type]
        pool_name=pool.name,
        proxy_socket="",
        log_dir=None,
        on_started=lambda inst: None,
        on_exit=None,  # type: ignore[arg-type]
    )
    pooled = ProcessInstance(id="pool-1", eid=7, function=None, node="n")
    runner.specialise(pooled, parse_spec({"name": "f", "handler": handler}))
    (d,) = link.sent
    # (an earlier runtime reads the kind only)
    assert d.kind == Kind.INVOKE and d.flags == Flags.SPEC | Flags.SPEC_REPORT
    assert pooled.spec_slot == (d.slot, d.gen)
    inst = Unspecialised(pool)
    inst.handle_specialise(d)
    (r,) = inst.sent
    meta = unpack_meta(pool.view(r.slot, r.gen, r.meta_len))
    assert meta["type"] == ("ready" if handler == "json:dumps" else "failed")
    assert meta["spec_read"] is True
    if handler == "json:dumps":  # the ready report is written in the spec's own slot
        assert (r.kind, r.slot, r.gen) == (Kind.PONG, d.slot, d.gen)
    else:  # a failure reports in a slot of its own, which the agent frees once read
        assert (r.slot, r.gen) != (d.slot, d.gen)
        pool.release(r.slot, r.gen)
    assert pool.owner(d.slot, d.gen) is not None  # left to the agent
    assert pool.release_if_owner(d.slot, d.gen)  # which frees it at that report
    assert pool.stats()["used"] == 0


@pytest.mark.parametrize("handler", ["json:dumps", "json:no_such_handler"])
def test_an_unmarked_spec_is_freed_by_the_instance_and_never_twice(pool, handler) -> None:
    slot, mlen, _ = write_slot(pool, {"spec": _spec(handler)}, b"")
    inst = Unspecialised(pool)
    inst.handle_specialise(slot.descriptor(7, 1, meta_len=mlen))  # no mark: an earlier agent
    meta = _report(inst)
    assert meta["type"] == ("ready" if handler == "json:dumps" else "failed")
    assert meta["spec_read"] is True
    assert pool.owner(slot.index, slot.gen) is None  # freed by the instance, before its report
    assert pool.stats()["used"] == 0
    # an agent that frees it at that report (7 Dec 2026, before the mark) frees nothing, even
    # with the slot in use again meanwhile
    again, _, _ = write_slot(pool, {"other": 1}, b"")
    assert (again.index, again.gen != slot.gen) == (slot.index, True)  # the same slot, reused
    assert not pool.release_if_owner(slot.index, slot.gen)
    assert pool.owner(again.index, again.gen) is not None
    pool.release(again.index, again.gen)


def test_the_agent_reads_a_report_in_the_spec_slot_of_that_instance_only(pool) -> None:
    """The agent's reader takes a report written in a spec's slot from the instance it sent
    that spec to (and leaves the slot to `spec_read`), and drops one naming another
    instance's spec slot, unread and not freed: an instance cannot make the agent read or
    free a slot it was not sent."""
    from hearth.agent.link import DataplaneLink
    from hearth.runtime.codec import pack_meta

    link = DataplaneLink(pool=pool, proxy_socket="")
    a = ProcessInstance(id="pool-a", eid=7, function="f", node="n")
    b = ProcessInstance(id="pool-b", eid=8, function="f", node="n")
    insts = {7: a, 8: b}
    link.instance_of = insts.get
    reports: list[tuple[int, dict]] = []
    link.on_report = lambda eid, meta: reports.append((eid, meta))
    for inst in (a, b):  # each sent its spec, as `Runner.specialise` does
        slot, _, _ = write_slot(pool, {"spec": _spec("json:dumps")}, b"")
        inst.spec_slot = (slot.index, slot.gen)
    mb = pack_meta({"type": "ready", "spec_read": True})
    ia, ga = a.spec_slot
    pool.view(ia, ga, len(mb))[:] = mb
    # b names a's spec slot: dropped, a's slot neither read nor freed
    link.dispatch(Descriptor(dst=1, src=8, slot=ia, gen=ga, meta_len=len(mb), kind=Kind.PONG))
    assert reports == [] and pool.owner(ia, ga) is not None
    # a names its own: read, and left held (freed by `spec_read` in the report's handling)
    link.dispatch(Descriptor(dst=1, src=7, slot=ia, gen=ga, meta_len=len(mb), kind=Kind.PONG))
    assert reports == [(7, {"type": "ready", "spec_read": True})]
    assert pool.owner(ia, ga) is not None
    for inst in (a, b):
        assert pool.release_if_owner(*inst.spec_slot)
    assert pool.stats()["used"] == 0


def test_a_spec_marked_without_spec_report_gets_the_report_in_a_slot_of_its_own(pool) -> None:
    """An agent that marks SPEC but not SPEC_REPORT (built on 7 Dec 2026 before it took reports
    in spec slots) drops a report written there: the instance then reports in a slot of its
    own, and still leaves the spec's slot to the agent."""
    slot, mlen, _ = write_slot(pool, {"spec": _spec("json:dumps")}, b"")
    d = slot.descriptor(7, 1, meta_len=mlen, flags=Flags.SPEC)
    inst = Unspecialised(pool)
    inst.handle_specialise(d)
    (r,) = inst.sent
    assert (r.slot, r.gen) != (d.slot, d.gen)
    meta = unpack_meta(pool.view(r.slot, r.gen, r.meta_len))
    assert (meta["type"], meta["spec_read"]) == ("ready", True)
    pool.release(r.slot, r.gen)  # (the agent frees a report's own slot once read)
    assert pool.release_if_owner(d.slot, d.gen)  # left to the agent
    assert pool.stats()["used"] == 0


def test_a_report_naming_a_spec_slot_freed_and_reused_is_never_read(pool) -> None:
    """A pool instance's late report in its spec's slot, after the agent freed that slot (the
    instance counted gone: a pod cut off after `KILL_GRACE_S`, `JoinedInstance.kill`) and the
    slot was written again by its next owner: the generation check drops the report, unread,
    and the new owner's slot is neither read as a report nor freed."""
    from hearth.agent.link import DataplaneLink
    from hearth.runtime.codec import pack_meta

    link = DataplaneLink(pool=pool, proxy_socket="")
    a = ProcessInstance(id="pool-a", eid=7, function="f", node="n")
    link.instance_of = {7: a}.get
    reports: list[tuple[int, dict]] = []
    link.on_report = lambda eid, meta: reports.append((eid, meta))
    slot, _, _ = write_slot(pool, {"spec": _spec("json:dumps")}, b"")
    a.spec_slot = old = (slot.index, slot.gen)
    assert pool.release_if_owner(*old)  # the agent frees it (`Starts.spec_read`, its exit)
    a.spec_slot = None
    again, again_mlen, _ = write_slot(pool, {"type": "ready", "not": "a report"}, b"")
    assert again.index == slot.index and again.gen != slot.gen  # reused
    mb = pack_meta({"type": "ready", "spec_read": True})
    late = Descriptor(dst=1, src=7, slot=old[0], gen=old[1], meta_len=len(mb), kind=Kind.PONG)
    for known in (a, None):  # still in the table, or forgotten already
        link.instance_of = {7: known}.get
        link._received(late)  # (as the endpoint's reader callback calls it)
        assert reports == []
        assert pool.owner(again.index, again.gen) is not None
        meta = unpack_meta(pool.view(again.index, again.gen, again_mlen))
        assert meta == {"type": "ready", "not": "a report"}
    pool.release(again.index, again.gen)
    assert pool.stats()["used"] == 0
