"""A pool start made from a call's read waits for its instance's ready report with a bound on
the lifecycle's heap of such bounds (`agent.starts._ReadyWatch`, `agent.deadlines.Deadlines`),
and the call itself has its deadline on the link's heap (`agent.link._Then`): a heap keeps an
ended entry until its time (30 s) is due or the heap is compacted. Those entries must not keep
the instance alive: once it has ended and the node has forgotten it, nothing of it is reachable
from either heap. Through a real node agent in this process (real pool instances, proxy, slot
pool, Redis; `hearth.up.Platform`)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import pytest_asyncio
from call_outcomes import Outcomes, pool_node, pool_ready, pool_start, until
from hearth.invoke import InvokeResult
from hearth.spec import parse_spec

pytestmark = pytest.mark.asyncio(loop_scope="module")

H = "hearth.functions.examples.handlers"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server):
    async with pool_node(redis_server.url, "hearth-rwr-") as p:
        yield p


async def test_an_ended_instance_is_not_held_by_its_start_bound(platform):
    from hearth.agent.starts import RECORD_WAIT_S

    agent = platform.agent
    res = await pool_start(agent, {"name": "rwr-a", "handler": f"{H}:hello"}, b'{"name": "x"}')
    assert isinstance(res, InvokeResult) and res.status == 200 and res.cold, res
    bounds = agent.lifecycle._ready_bounds
    assert bounds is not None and len(bounds) >= 1  # the start's bound, not due for 30 s
    inst = agent.table.find(res.instance_id)
    assert inst is not None and inst.from_pool
    gone = weakref.ref(inst)
    await asyncio.sleep(RECORD_WAIT_S + 0.05)  # (its record's timer, if it still runs)
    assert await agent.lifecycle.stop_instance(res.instance_id, graceful=False)
    del inst, res
    await until(lambda: agent.table.find(gone().id if gone() else "") is None, "its exit")
    await asyncio.sleep(0.1)  # (the exit's handling: `Lifecycle.exited`)
    assert len(bounds) >= 1  # the entry is still there...
    gc.collect()
    # ...and holds nothing of the instance (before: the ended wait held its launch, and the
    # answered call's entry, when its deadline was armed, the instance and the call's books)
    assert gone() is None, gc.get_referrers(gone())


async def test_an_instance_whose_function_went_while_it_started_is_stopped(platform, tmp_path):
    """A pool start whose function is undeployed during the instance's import: the instance
    is stopped once it reports ready, not left running idle and unowned (no tick looks at a
    function no longer served; the node's close then waited 10 s for it)."""
    agent = platform.agent
    marker = tmp_path / "rwrslow.importing"
    (tmp_path / "rwrslow.py").write_text(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(1)\n"
        "def h(event):\n    return 1\n"
    )
    await agent.deploy(
        parse_spec({"name": "rwr-slow", "handler": "rwrslow:h", "code_path": str(tmp_path)})
    )
    await pool_ready(agent)
    out = Outcomes()
    assert agent.invoker.start_call("rwr-slow", b"{}", done=out, content_type="application/json")
    await until(marker.exists, "the instance in its import")
    (inst,) = [i for i in agent.table.by_eid.values() if i.function == "rwr-slow"]
    assert inst.state == "starting"
    assert await agent.undeploy("rwr-slow")
    res = await out.one()  # the call sent with the spec is still answered
    assert isinstance(res, InvokeResult) and res.status == 200, res
    # stopped after its report and that answer (before: idle, running, in no function)
    await until(lambda: inst.state == "dead", "the instance stopped", timeout=15)
    assert not inst.running
