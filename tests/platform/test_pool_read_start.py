"""A pool start made from the gateway's read (`Invoker.start_call` → `Admitter.plan_now` /
`start_now` → `Starts.start_now`, #19), through HTTP on a real node agent in this process
(real pool instances, proxy and slot pool; `hearth.up.Platform`): the decision comes first,
then the slots, then the spec and the request leave together, then the start is booked.

Pipelined requests on one connection, the first of which starts a pool instance, are answered
in order, each started from the read; a burst at a function limited to one instance and a
queue of one gives one cold answer from the pool and 429s past the queue, as the
autoscaler's rule says; and a call that is going to wait, on a node whose pool
instance is free, writes no slot at all before the task's way takes it (review L2)."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from call_outcomes import TOKEN, Outcomes, pool_node, pool_ready, until
from hearth.dataplane.slots import PoolExhausted
from hearth.spec import parse_spec

pytestmark = pytest.mark.asyncio(loop_scope="module")

H = "hearth.functions.examples.handlers"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server):
    async with pool_node(redis_server.url, "hearth-prs-") as p:
        yield p


def _ask(name: str, body: bytes) -> bytes:
    return (
        f"POST /v1/functions/{name}:invoke HTTP/1.1\r\nHost: h\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
    }
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, body


async def test_pipelined_requests_after_a_start_from_the_read_are_answered_in_order(platform):
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "prs-echo", "handler": f"{H}:echo"}))
    await pool_ready(agent)
    pooled = next(i for i in agent.table.pooled.values() if i.state == "pooled")
    direct = agent.metrics.fast_path_direct.n
    reader, writer = await asyncio.open_connection("127.0.0.1", platform.settings.port)
    try:
        writer.write(b"".join(_ask("prs-echo", f'"{k}"'.encode()) for k in (1, 2, 3)))
        got = [await _answer(reader) for _ in range(3)]
    finally:
        writer.close()
    assert [(st, body) for st, _, body in got] == [(200, b'"1"'), (200, b'"2"'), (200, b'"3"')]
    assert [h["x-hearth-cold"] for _, h, _ in got] == ["1", "0", "0"]
    assert {h["x-hearth-instance"] for _, h, _ in got} == {pooled.id}  # the pool instance
    assert agent.metrics.fast_path_direct.n == direct + 3  # each started from the read


async def test_a_burst_gets_the_start_and_its_queue_then_429s(platform, tmp_path):
    """One instance at most, a queue of one: the first request starts the pool instance from
    the read (the one cold answer), two wait for that start (a start in progress counts for
    one more), and the other three are refused 429 + Retry-After at once; the import takes
    0.3 s, so all six are read before the start is ready."""
    agent = platform.agent
    (tmp_path / "prsslow.py").write_text(
        "import time\ntime.sleep(0.3)\n\ndef h(event):\n    return {'ok': 1}\n"
    )
    spec = {"name": "prs-burst", "handler": "prsslow:h", "code_path": str(tmp_path)}
    await agent.deploy(parse_spec({**spec, "max_instances": 1, "queue_size": 1}))
    await pool_ready(agent)
    conns = [await asyncio.open_connection("127.0.0.1", platform.settings.port) for _ in range(6)]
    try:
        for _, w in conns:
            w.write(_ask("prs-burst", b"{}"))
        got = await asyncio.gather(*(_answer(r) for r, _ in conns))
    finally:
        for _, w in conns:
            w.close()
    statuses = sorted(st for st, _, _ in got)
    # three 429s on arrival (two queued for the start already), and no fourth: the first
    # waiter, woken by the ready report while the first call still runs, keeps its place (until
    # 7 Dec 2026 it was judged again as an arrival, the queue full without the start's
    # allowance, and refused: 1 run in 11 on e7cc91e, about half with the start from the read)
    assert statuses == [200, 200, 200, 429, 429, 429], got
    assert all("retry-after" in h for st, h, _ in got if st == 429)
    assert all(b"queue_size 1" in body for st, _, body in got if st == 429)
    assert sorted(h["x-hearth-cold"] for st, h, _ in got if st == 200)[-1] == "1"
    assert [h["x-hearth-cold"] for st, h, _ in got if st == 200].count("1") == 1
    (inst,) = agent.functions["prs-burst"].instances.values()
    assert inst.from_pool


async def test_a_call_that_will_wait_writes_no_slot(platform):
    """A node with a free pool instance and a function at its limit (one instance, busy): the
    call is going to wait, so `start_call` says so before it writes anything (it used to write
    the request's slot and free it again)."""
    agent = platform.agent
    await agent.deploy(
        parse_spec({"name": "prs-wait", "handler": f"{H}:sleep", "max_instances": 1})
    )
    await pool_ready(agent)
    first = Outcomes()
    assert agent.invoker.start_call(
        "prs-wait", b'{"seconds": 1}', done=first, content_type="application/json"
    )
    fs = agent.functions["prs-wait"]
    await until(lambda: fs.live(), "the started instance ready", timeout=30)
    await pool_ready(agent)  # refilled: a pool instance is free again
    allocs = []
    alloc = agent.pool.alloc

    def counted(*a, **k):
        allocs.append(a)
        return alloc(*a, **k)

    agent.pool.alloc = counted
    try:
        never = Outcomes()
        assert not agent.invoker.start_call(
            "prs-wait", b'{"seconds": 0}', done=never, content_type="application/json"
        )
    finally:
        del agent.pool.alloc
    assert allocs == [] and not fs.starting
    assert json.loads((await first.one()).body)["slept"] == 1
    assert never.got == []


@pytest.mark.parametrize("fails", ["spec_write", "send"])
async def test_a_start_from_the_read_that_cannot_be_made_leaves_nothing_behind(platform, fails):
    """The spec's slot cannot be written (the pool is full) or the send fails: `start_call`
    says no, with its request's slot and the spec's freed, nothing counted or claimed and the
    pool instance still free; the same call through `invoke` then starts it."""
    agent = platform.agent
    name = f"prs-fail-{fails.replace('_', '-')}"
    await agent.deploy(parse_spec({"name": name, "handler": f"{H}:echo"}))
    await pool_ready(agent)
    pooled = next(i for i in agent.table.pooled.values() if i.state == "pooled")
    used = agent.pool.stats()["used"]

    if fails == "spec_write":
        target, attr = agent.runner, "specialise_with"

        def broken(*a, **k):
            raise PoolExhausted("slot pool full (test)")
    else:
        target, attr = agent.runner.link, "send_pair"

        def broken(*a, **k):
            raise ConnectionError("data plane closed (test)")

    setattr(target, attr, broken)
    try:
        never = Outcomes()
        assert not agent.invoker.start_call(
            name, b'"x"', done=never, content_type="application/json"
        )
    finally:
        delattr(target, attr)
    fs = agent.functions[name]
    assert agent.pool.stats()["used"] == used  # both slots freed
    assert not fs.starting and not fs.instances and never.got == []
    assert pooled.state == "pooled" and pooled.spec_slot is None
    r = await agent.invoke(name, b'"x"', content_type="application/json")
    assert r.body == b'"x"' and r.cold
