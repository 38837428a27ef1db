"""A start's cold-start record (its phases, metrics and push to Redis: 0.2-0.5 ms of the
agent's CPU) is made after the answer of the call sent ahead of the instance's ready report,
not between that report and the call's reply, where it ran on the vCPU the handler needed
(#19); an instance that ends before answering is recorded all the same. Through a real node
agent in this process (real pool instances, proxy, slot pool, Redis; `hearth.up.Platform`)."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from call_outcomes import Outcomes, pool_node, pool_ready, until
from hearth.invoke import InvokeError, InvokeResult
from hearth.spec import parse_spec

pytestmark = pytest.mark.asyncio(loop_scope="module")

H = "hearth.functions.examples.handlers"
J = "application/json"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server):
    async with pool_node(redis_server.url, "hearth-psr-") as p:
        yield p


def _recording(agent, out: Outcomes) -> list[tuple[str, int]]:
    """(function, answers its caller had) at each record, through the log's own callback."""
    seen: list[tuple[str, int]] = []
    push = agent.coldstarts.on_record

    def on_record(rec: dict) -> None:
        seen.append((rec["function"], len(out.got)))
        if push is not None:
            push(rec)

    agent.coldstarts.on_record = on_record
    return seen


async def test_the_record_is_made_after_the_first_answer(platform):
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "psr-a", "handler": f"{H}:sleep"}))
    await pool_ready(agent)
    out = Outcomes()
    seen = _recording(agent, out)
    assert agent.invoker.start_call("psr-a", b'{"seconds": 0.05}', done=out, content_type=J)
    res = await out.one()
    assert isinstance(res, InvokeResult) and res.status == 200 and res.cold, res
    await until(lambda: seen, "the start's record")
    await asyncio.sleep(0.3)  # (past RECORD_WAIT_S: no second record)
    # the caller had its answer when the record was made (the call's 50 ms keep its reply
    # apart from the ready report, well inside RECORD_WAIT_S)
    assert seen == [("psr-a", 1)]
    rec = agent.coldstarts.records[-1]
    assert rec["function"] == "psr-a" and rec["from_pool"]
    p = rec["phases"]
    assert p["requested"] <= p["spawned"] <= p["code_imported"] <= p["ready"]
    assert not agent.table.get("psr-a").instances[res.instance_id].after_answer


async def test_an_instance_that_ends_in_its_first_call_is_still_recorded(platform, tmp_path):
    agent = platform.agent
    (tmp_path / "psrexit.py").write_text("import os\n\ndef h(event):\n    os._exit(3)\n")
    spec = {"name": "psr-exit", "handler": "psrexit:h", "code_path": str(tmp_path)}
    await agent.deploy(parse_spec(spec))
    await pool_ready(agent)
    out = Outcomes()
    seen = _recording(agent, out)
    assert agent.invoker.start_call("psr-exit", b"{}", done=out, content_type=J)
    res = await out.one()
    assert isinstance(res, InvokeError) and res.status == 502, res
    await until(lambda: seen, "the record of the start that ended")
    await asyncio.sleep(0.3)  # (past RECORD_WAIT_S: no second record)
    assert [f for f, _ in seen] == ["psr-exit"]
    assert agent.coldstarts.records[-1]["function"] == "psr-exit"


async def test_a_long_first_call_does_not_hold_the_record(platform):
    """A first call that runs on (a long job) does not keep its start out of /v1/coldstarts,
    the metrics and the keep-alive policy's cold-start cost: recorded RECORD_WAIT_S after the
    ready report at the latest, while the call still runs."""
    from hearth.agent.starts import RECORD_WAIT_S

    agent = platform.agent
    await agent.deploy(parse_spec({"name": "psr-long", "handler": f"{H}:sleep"}))
    await pool_ready(agent)
    out = Outcomes()
    seen = _recording(agent, out)
    t0 = time.monotonic()
    assert agent.invoker.start_call("psr-long", b'{"seconds": 1.5}', done=out, content_type=J)
    await until(lambda: seen, "the long call's start record")
    assert seen == [("psr-long", 0)] and time.monotonic() - t0 < 1.0  # the call still runs
    assert agent.functions["psr-long"].cold_start_s is not None
    assert RECORD_WAIT_S < 0.5
    res = await out.one()
    assert isinstance(res, InvokeResult) and res.status == 200, res
    assert len(seen) == 1
