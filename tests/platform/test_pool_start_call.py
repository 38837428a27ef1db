"""A call that needs a start, read whole in a protocol callback, starts it there when a free
warm-pool instance can take it at once (`Invoker.start_call` → `Admitter.start_now` →
`Starts.start_now`, #19): the pool instance is sent its spec and the request in one message
with no task step, second admission or waiter in between. Through a real node agent in this
process (real pool instances, proxy and slot pool; `hearth.up.Platform`): the call is cold and
answered once, its books kept and its slots freed; its timeout runs from the instance's ready
report, as for a request the admitter hands a starting instance; with no pool instance free it
does nothing and says so. A start that fails answers 502 `cold_start_failed`
(test_pool_spec_slot.py, through HTTP)."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from call_outcomes import Outcomes, pool_node, pool_ready, until
from hearth.invoke import InvokeResult
from hearth.spec import parse_spec

pytestmark = pytest.mark.asyncio(loop_scope="module")

H = "hearth.functions.examples.handlers"
J = "application/json"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server):
    async with pool_node(redis_server.url, "hearth-psc-") as p:
        yield p


async def test_a_call_that_needs_a_start_is_started_from_a_pool_instance_at_once(platform):
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "psc-a", "handler": f"{H}:sleep"}))
    await pool_ready(agent)
    await asyncio.sleep(0.2)  # the pool's own start settled (its slots and reports)
    used = agent.pool.stats()["used"]
    pooled = next(i for i in agent.table.pooled.values() if i.state == "pooled")
    out = Outcomes()
    assert agent.invoker.start_call("psc-a", b'{"seconds": 0}', done=out, content_type=J)
    assert out.got == []  # never from inside start_call
    fs = agent.functions["psc-a"]
    assert pooled.function == "psc-a" and pooled.inflight == 1  # claimed for this call
    assert fs.starting == 1 and not fs.waiters  # counted as a start; nobody queued for it
    res = await out.one()
    assert isinstance(res, InvokeResult) and res.status == 200, res
    assert json.loads(res.body)["slept"] == 0
    assert (res.instance_id, res.cold) == (pooled.id, True)
    await until(lambda: not fs.starting, "the start's end", timeout=30)
    assert list(fs.instances) == [pooled.id] and pooled.state == "idle"
    assert pooled.inflight == 0
    await until(lambda: agent.pool.stats()["used"] <= used + 1, "slots freed", timeout=30)
    # (+1: the refilled pool instance's report may still be in flight; then back to `used`)
    await pool_ready(agent)
    await until(
        lambda: agent.pool.stats()["used"] <= used, "slots back to the baseline", timeout=30
    )


async def test_its_timeout_runs_from_the_ready_report_not_from_the_send(platform, tmp_path):
    """The function's import takes longer than its timeout: the call still gets its answer
    (the timeout covers the handler, counted from the ready report), not a 504."""
    agent = platform.agent
    (tmp_path / "pscslow.py").write_text(
        "import time\ntime.sleep(0.8)\n\ndef h(event):\n    return {'ok': 1}\n"
    )
    spec = {"name": "psc-slow", "handler": "pscslow:h", "code_path": str(tmp_path)}
    await agent.deploy(parse_spec({**spec, "timeout_s": 0.4}))
    await pool_ready(agent)
    out = Outcomes()
    assert agent.invoker.start_call("psc-slow", b"{}", done=out, content_type=J)
    res = await out.one()
    assert isinstance(res, InvokeResult) and res.status == 200, res
    assert json.loads(res.body) == {"ok": 1} and res.cold


async def test_with_no_pool_instance_free_it_does_nothing(platform):
    """A pool instance busy with another start (none free): False, with no slot taken, no
    arrival observed, nothing started; `invoke` then starts (or waits for) one."""
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "psc-b", "handler": f"{H}:sleep"}))
    await agent.deploy(parse_spec({"name": "psc-c", "handler": f"{H}:sleep"}))
    await pool_ready(agent)
    first = Outcomes()
    assert agent.invoker.start_call("psc-b", b'{"seconds": 0}', done=first, content_type=J)
    assert not any(i.state == "pooled" for i in agent.table.pooled.values())
    used, fs = agent.pool.stats()["used"], agent.functions["psc-c"]
    arrivals = len(fs.arrivals)
    never = Outcomes()
    assert not agent.invoker.start_call("psc-c", b'{"seconds": 0}', done=never, content_type=J)
    assert agent.pool.stats()["used"] == used and len(fs.arrivals) == arrivals
    assert not fs.starting and not fs.instances
    assert (await first.one()).status == 200
    assert never.got == []
