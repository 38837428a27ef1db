"""A call awaited through the agent's data-plane link (`DataplaneLink.call`, the path of
`Invoker.invoke` and of the queue's batches) has its deadline on the link's heap, which keeps an
entry until its time is due (the function's timeout) or the heap is compacted. Once the call has
ended, that entry must hold nothing of it: before 8 Dec 2026 it held the call's future, whose
error (an instance that died in the call) kept its traceback, and through it the caller's frames
(the request's payload, the instance) for as long as the timeout. Through a real node agent in
this process (real instances, proxy, slot pool, Redis; `hearth.up.Platform`)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import pytest_asyncio
from call_outcomes import pool_node, until
from hearth.agent.deadlines import Bound
from hearth.invoke import InvokeError, InvokeResult
from hearth.spec import parse_spec

pytestmark = pytest.mark.asyncio(loop_scope="module")

SLOW = """
import time


def h(event):
    time.sleep(float(event.data()["sleep_s"]))
    return {"ok": True}
"""


class Payload(bytearray):
    """The request's body, weakly referable: whether anything still holds it."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server, tmp_path_factory):
    code = tmp_path_factory.mktemp("lcr-code")
    (code / "lcrslow.py").write_text(SLOW)
    async with pool_node(redis_server.url, "hearth-lcr-") as p:
        spec = {"name": "lcr", "handler": "lcrslow:h", "code_path": str(code), "timeout_s": 60}
        await p.agent.deploy(parse_spec(spec))
        yield p


async def test_an_answered_call_leaves_nothing_on_the_heap(platform):
    agent = platform.agent
    for _ in range(2):  # the first starts an instance (its deadline is not on the heap)
        body = Payload(b'{"sleep_s": 0}')
        gone = weakref.ref(body)
        res = await agent.invoker.invoke("lcr", body, content_type="application/json")
        assert isinstance(res, InvokeResult) and res.status == 200, res
    assert not res.cold, res
    heap = agent.link._deadlines
    assert len(heap) >= 1  # its entry is still there, not due for 60 s
    # ...and holds no future: the reply (its slot's descriptor) was the caller's alone
    entries = [e[2] for e in heap._heap]
    assert all(isinstance(e, Bound) and e.fut is None for e in entries), entries
    del body, res
    gc.collect()
    assert gone() is None, gc.get_referrers(gone())


async def _died_call(agent) -> tuple[weakref.ref, weakref.ref, weakref.ref]:
    """A call whose instance is killed while it runs: weak references to its payload, the
    error its caller got and the instance (the strong ones end with this frame)."""
    from hearth.agent.starts import RECORD_WAIT_S

    body = Payload(b'{"sleep_s": 30}')
    task = asyncio.create_task(agent.invoker.invoke("lcr", body, content_type="application/json"))

    def at_work() -> list:
        return [i for i in agent.table.instances() if i.function == "lcr" and i.inflight]

    await until(at_work, "the call at work")
    (inst,) = at_work()
    await asyncio.sleep(RECORD_WAIT_S + 0.05)  # (its start's record timer, if it started for it)
    assert await agent.lifecycle.stop_instance(inst.id, graceful=False)
    try:
        await task
    except InvokeError as e:
        assert e.error == "instance_died", e
        return weakref.ref(body), weakref.ref(e), weakref.ref(inst)
    raise AssertionError("the call was answered")


async def test_a_call_whose_instance_died_leaves_nothing_on_the_heap(platform):
    """The instance is killed in the call: the caller gets `instance_died`; the entry, due in
    60 s, holds neither that error nor the payload nor the instance (before: all three)."""
    agent = platform.agent
    body, error, inst = await _died_call(agent)
    assert len(agent.link._deadlines) >= 1  # its entry is still there
    await until(lambda: agent.table.find(inst().id if inst() else "") is None, "its exit")
    await asyncio.sleep(0.1)  # (the exit's handling)
    gc.collect()
    for ref in (body, error, inst):
        assert ref() is None, gc.get_referrers(ref())
