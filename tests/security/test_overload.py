"""Overload answers are back-pressure (503/429 + Retry-After), never 502 or 507."""

from __future__ import annotations

from hearth.agent.invoker import dataplane_error
from hearth.dataplane.descriptor import PROXY_ID, Descriptor, Kind, Status


def _err(**kw) -> Descriptor:
    return Descriptor(dst=1, kind=Kind.ERROR, **kw)


def test_a_full_pool_or_queue_is_back_pressure():
    no_slot = dataplane_error(_err(src=7, status=5, aux=507))  # the instance found no free slot
    assert (no_slot.status, no_slot.retry_after) == (503, 1)
    full = dataplane_error(_err(src=PROXY_ID, status=Status.QUEUE_FULL, aux=7))
    assert (full.status, full.retry_after) == (503, 1)  # aux is the lost dst: not a status


def test_other_data_plane_errors_are_not_back_pressure():
    assert dataplane_error(_err(src=7, status=5, aux=413)).error == "reply_too_large"
    assert dataplane_error(_err(src=7, status=5, aux=400)).status == 400
    assert dataplane_error(_err(src=7, status=5, aux=0)).status == 502
    bounced = dataplane_error(_err(src=PROXY_ID, status=Status.UNKNOWN_DST, aux=9))
    assert bounced.status == 502 and bounced.retry_after is None


def test_queueing_is_bounded_at_the_measured_handler_time():
    from hearth.agent.admitter import queue_admits

    assert queue_admits(0, 4, 0.01, 0.025)  # a free wait of 2.5 ms
    assert queue_admits(9, 4, 0.01, 0.025)  # 10 ahead on 4 slots of 10 ms: 25 ms
    assert not queue_admits(10, 4, 0.01, 0.025)  # 27.5 ms: 429 now, not a hidden wait
    assert queue_admits(10_000, 4, 0.01, None)  # no bound configured: the queue size decides
    assert queue_admits(10_000, 4, None, 0.025)  # nothing measured yet


def test_the_loops_lag_is_sustained_lateness_not_one_hiccup():
    from hearth.gateway.shed import LagState, record_tick, sheds

    def ticks(lags: list[float], limit: float = 0.05, t: float = 10.0) -> LagState:
        """A loop whose ticks (5 ms apart) ran these many seconds late."""
        st = LagState(due=t)
        for lag in lags:
            record_tick(st, st.due + lag, limit, 0.005)
        return st

    # one stall, however long, ends with an on-time tick: not overload
    st = ticks([3.0, 0.0])
    assert not sheds(st, st.due, 0.05)
    # a run of late ticks shorter than HOLD x the limit (0.2 s), or than LATE_TICKS: not yet
    st = ticks([0.06, 0.06])
    assert not sheds(st, st.due, 0.05)
    st = ticks([0.5, 0.5])  # two long ones (the loaded-CI case: 2 x 583 ms at a 0.5 s limit)
    assert not sheds(st, st.due, 0.5)
    st = ticks([1.0, 1.5])  # two stalls back to back, far past HOLD x the limit: still two
    assert not sheds(st, st.due, 0.1)
    # sustained: every tick late, over more than HOLD x the limit
    st = ticks([0.08, 0.08, 0.08])
    assert sheds(st, st.due, 0.05)
    st = ticks([0.6, 0.6, 0.6, 0.6])
    assert sheds(st, st.due, 0.5)
    # the tick overdue now counts: two late ones and the loop still behind
    st = ticks([0.08, 0.08])
    assert not sheds(st, st.due, 0.05) and sheds(st, st.due + 0.06, 0.05)
    # an on-time tick ends the run
    st = ticks([0.08, 0.08, 0.08, 0.0])
    assert not sheds(st, st.due, 0.05)
    assert not sheds(ticks([9.0] * 5), 10.0, None)  # off


HOG_S, LAG_S = 0.1, 0.04  # the loop is kept 2.5x later than the limit


async def _serve(app):
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def _sheds_invokes_only_while_the_loop_lags(app, token: str, free_invoke: int) -> None:
    """Serve `app` and keep its loop busy (callbacks that block HOG_S each; it sheds past LAG_S):
    an invoke is answered 503 + Retry-After at once; health, metrics and admin requests are
    served meanwhile; once the loop is free an invoke reaches its handler again (status
    `free_invoke`)."""
    import asyncio
    import time

    import aiohttp
    from hearth.gateway.shed import LOOP_LAG

    lag = app[LOOP_LAG]
    runner, url = await _serve(app)
    auth = {"Authorization": f"Bearer {token}"}
    invoke = f"{url}/v1/functions/nosuch:invoke"
    busy = True

    def hog():
        if busy:
            time.sleep(HOG_S)
            asyncio.get_running_loop().call_soon(hog)

    try:
        async with aiohttp.ClientSession(headers=auth) as s:
            async with s.post(invoke, data=b"{}") as r:
                assert r.status == free_invoke  # a quiet loop serves
            asyncio.get_running_loop().call_soon(hog)
            for _ in range(100):  # sustained lag: a few late ticks, over HOLD x LAG_S
                await asyncio.sleep(0)
                if lag.sheds():
                    break
            async with s.post(invoke, data=b"{}") as r:
                body = await r.json()
                assert (r.status, body.get("error"), r.headers.get("Retry-After")) == (
                    503,
                    "overloaded",
                    "1",
                )
            for path in ("/healthz", "/metrics", "/v1/functions"):
                assert lag.sheds()  # still lagging: these are served all the same
                async with s.get(url + path) as r:
                    assert r.status == 200, (path, await r.text())
            assert lag.state.shed == 1
            busy = False
            for _ in range(250):  # a few on-time ticks clear the state
                await asyncio.sleep(0.02)
                if not lag.sheds():
                    break
            async with s.post(invoke, data=b"{}") as r:
                assert r.status == free_invoke
    finally:
        busy = False
        await runner.cleanup()


async def test_a_lagging_node_gateway_sheds_invokes_then_recovers(tmp_path, redis_url):
    """The node gateway as `hearth up` wires it (`make_app` with a real agent, unstarted: a shed
    invoke never reaches it) and the rejection is counted."""
    import os
    import uuid

    import redis.asyncio as aioredis
    from hearth.dataplane.shm import SlotPool
    from hearth.gateway.app import make_app
    from hearth.node import NodeAgent
    from hearth.registry import Registry

    pool = SlotPool.create(f"hearth-shed-{os.getpid()}-{uuid.uuid4().hex[:6]}", [(4096, 4)])
    r = aioredis.Redis.from_url(redis_url)
    try:
        agent = NodeAgent(pool, str(tmp_path / "no-proxy.sock"))
        app = make_app(
            agent, Registry(r), admin_token="t0k", max_body_bytes=1 << 20, shed_lag_s=LAG_S
        )
        # the admin token may learn that `nosuch` is not deployed: 404 from the invoke handler
        await _sheds_invokes_only_while_the_loop_lags(app, "t0k", 404)
        assert agent.metrics.rejected.labels("overloaded")._value.get() == 1
    finally:
        await r.aclose()
        pool.destroy()


async def test_a_lagging_front_gateway_sheds_invokes_then_recovers():
    """The front gateway (`make_front`) sheds the same way, before anything goes to an agent."""
    from aiohttp import web
    from hearth.gateway.front import Agents, make_front

    seen: list[str] = []

    async def agent(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"path": request.path})

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", agent)
    up_runner, up_url = await _serve(upstream)
    try:
        await _sheds_invokes_only_while_the_loop_lags(
            make_front(Agents(up_url), shed_lag_s=LAG_S), "t0k", 200
        )
        invokes = [p for p in seen if p.endswith(":invoke")]
        assert len(invokes) == 2 and "/metrics" in seen  # the shed one never left the front
    finally:
        await up_runner.cleanup()


def test_the_lag_timer_runs_as_often_as_its_limit_needs_and_no_more():
    """An idle gateway is not woken hundreds of times a second: the tick follows the limit
    (the 0.5 s default: every 50 ms), and stays fine enough for the shedding rule
    (LATE_TICKS late ticks fit many times within HOLD x the limit)."""
    from hearth.gateway.shed import HOLD, LATE_TICKS, LoopLag, tick_interval

    assert LoopLag(0.5).interval_s == tick_interval(0.5) == 0.05
    assert tick_interval(0.1) == 0.01 and tick_interval(0.025) == 0.0025
    assert tick_interval(1e-4) == 0.002 and tick_interval(60) == 0.05
    for limit in (0.005, 0.025, 0.1, 0.5, 2.0, 5.0):
        assert LATE_TICKS * tick_interval(limit) < HOLD * limit / 2


async def test_no_lag_timer_runs_when_shedding_is_off():
    from hearth.gateway.shed import LoopLag

    off, on = LoopLag(None), LoopLag(0.5)
    off.start()
    on.start()
    try:
        assert not off.running and on.running
    finally:
        off.stop()
        on.stop()


async def test_a_waiter_past_the_queue_bound_gets_429_not_a_late_504():
    """HEARTH_MAX_QUEUE_WAIT_S bounds the wait itself (not only its estimate): an invocation
    that finds every instance busy hears 429 + Retry-After at the bound, not 504 at the
    function's timeout plus the start budget."""
    import time

    import pytest
    from hearth.invoke import InvokeError
    from sec_helpers import one_busy_admitter

    adm, fs, busy = one_busy_admitter(max_queue_wait_s=0.05)
    with pytest.raises(InvokeError) as e:
        await adm.acquire(fs, time.monotonic() + 2.0)
    assert (e.value.status, e.value.error, e.value.retry_after) == (429, "overloaded", 1)
    assert not fs.waiters
    fs.starting = 1  # another instance starting while one serves: the bound still holds
    with pytest.raises(InvokeError) as e:
        await adm.acquire(fs, time.monotonic() + 2.0)
    assert (e.value.status, e.value.error) == (429, "overloaded")
    del fs.instances["i"]  # a cold start from zero: its callers wait for it (the deadline: 504)
    with pytest.raises(InvokeError) as e:
        await adm.acquire(fs, time.monotonic() + 0.3)
    assert e.value.status == 504
    fs.instances["i"], fs.starting = busy, 0
    adm.max_queue_wait_s = None  # no bound: the deadline decides (504)
    with pytest.raises(InvokeError) as e:
        await adm.acquire(fs, time.monotonic() + 0.1)
    assert e.value.status == 504


async def test_a_call_the_function_cannot_take_gets_429_before_its_body_is_read(
    tmp_path, redis_url
):
    """Back-pressure costs no body: with the only instance busy and the queue full, the node
    gateway answers 429 + Retry-After without reading, storing or parsing the body (a malformed
    one is not even noticed); once an instance is free the same call is
    read and validated (400)."""
    import asyncio
    import os
    import uuid
    from types import SimpleNamespace

    import aiohttp
    import redis.asyncio as aioredis
    from hearth.dataplane.shm import SlotPool
    from hearth.gateway.app import make_app
    from hearth.node import NodeAgent
    from hearth.registry import Registry
    from hearth.spec import FunctionSpec

    pool = SlotPool.create(f"hearth-429-{os.getpid()}-{uuid.uuid4().hex[:6]}", [(4096, 4)])
    r = aioredis.Redis.from_url(redis_url)
    try:
        agent = NodeAgent(pool, str(tmp_path / "no-proxy.sock"))
        spec = FunctionSpec(name="f", handler="m:h", concurrency=1, max_instances=1, queue_size=1)
        fs = agent.table.ensure(spec)
        inst = SimpleNamespace(id="i", live=True, state="busy", inflight=1, last_used=0.0)
        fs.instances["i"] = inst
        fs.waiters.append(asyncio.get_running_loop().create_future())  # the queue is full
        app = make_app(agent, Registry(r), admin_token="t0k", max_body_bytes=1 << 20)
        runner, url = await _serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                post = dict(data=b'{"not json', headers={"Content-Type": "application/json"})
                async with s.post(f"{url}/v1/functions/f:invoke", **post) as resp:
                    body = await resp.json()
                    assert (resp.status, body["error"], resp.headers.get("Retry-After")) == (
                        429,
                        "overloaded",
                        "1",
                    ), body
                assert agent.metrics.rejected.labels("overloaded")._value.get() == 1
                inst.state, inst.inflight = "idle", 0  # a free instance: the body is read now
                async with s.post(f"{url}/v1/functions/f:invoke", **post) as resp:
                    assert (resp.status, (await resp.json())["error"]) == (400, "malformed_body")
        finally:
            await runner.cleanup()
    finally:
        await r.aclose()
        pool.destroy()
