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
    from hearth.gateway.shed import LagState, sheds

    one_hiccup = LagState(due=10.0, last_lag_s=0.2, prev_lag_s=0.0)
    assert not sheds(one_hiccup, 10.0, 0.05)  # descheduled once: not overload
    assert sheds(one_hiccup, 10.1, 0.05)  # ...but still stuck now: it is
    assert sheds(LagState(due=10.0, last_lag_s=0.08, prev_lag_s=0.06), 10.0, 0.05)
    assert not sheds(LagState(due=10.0, last_lag_s=9.0, prev_lag_s=9.0), 10.0, None)  # off


async def test_a_lagging_loop_answers_503_with_retry_after_then_recovers():
    """A real aiohttp server whose loop is kept busy (callbacks that block 300 ms each) answers
    invokes 503 + Retry-After at once; once the loop is free again they are served."""
    import asyncio
    import time

    import aiohttp
    from aiohttp import web
    from hearth.gateway.app import jerror
    from hearth.gateway.shed import LoopLag, shed_middleware

    lag = LoopLag(0.2, interval_s=0.005)
    mw = shed_middleware(
        lag,
        lambda r: r.path.endswith(":invoke"),
        lambda d: jerror(503, "overloaded", d, {"Retry-After": "1"}),
    )

    async def ok(_r):
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[mw])
    app.router.add_post("/v1/functions/f:invoke", ok)
    app.router.add_get("/healthz", ok)
    app.on_startup.append(lag.on_startup)
    app.on_cleanup.append(lag.on_cleanup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    busy = True

    def hog():
        if busy:
            time.sleep(0.3)
            asyncio.get_running_loop().call_soon(hog)

    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/functions/f:invoke", data=b"{}") as r:
                assert r.status == 200  # a quiet loop serves
            asyncio.get_running_loop().call_soon(hog)
            async with s.post(f"{url}/v1/functions/f:invoke", data=b"{}") as r:
                body = await r.json()
                assert (r.status, body["error"], r.headers["Retry-After"]) == (
                    503,
                    "overloaded",
                    "1",
                )
            async with s.get(f"{url}/healthz") as r:
                assert r.status == 200  # only invokes are shed
            assert lag.state.shed == 1
            busy = False
            for _ in range(250):  # a few on-time ticks clear the state
                await asyncio.sleep(0.02)
                if not lag.sheds():
                    break
            async with s.post(f"{url}/v1/functions/f:invoke", data=b"{}") as r:
                assert r.status == 200
    finally:
        busy = False
        await runner.cleanup()


async def test_a_waiter_past_the_queue_bound_gets_429_not_a_late_504():
    """HEARTH_MAX_QUEUE_WAIT_S bounds the wait itself (not only its estimate): an invocation
    that finds every instance busy hears 429 + Retry-After at the bound, not 504 at the
    function's timeout plus the start budget."""
    import time
    from types import SimpleNamespace

    import pytest
    from hearth.agent.admitter import Admitter
    from hearth.agent.table import InstanceTable
    from hearth.invoke import InvokeError
    from hearth.spec import FunctionSpec

    spec = FunctionSpec(name="f", handler="m:h", concurrency=1, max_instances=1, queue_size=100)
    table = InstanceTable()
    fs = table.ensure(spec)
    busy = SimpleNamespace(id="i", live=True, state="busy", inflight=1, last_used=0.0)
    fs.instances["i"] = busy
    adm = Admitter(table, scale_out=lambda fs: None, arrived=lambda fs, t: None)
    adm.max_queue_wait_s = 0.05
    with pytest.raises(InvokeError) as e:
        await adm.acquire(fs, time.monotonic() + 2.0)
    assert (e.value.status, e.value.error, e.value.retry_after) == (429, "overloaded", 1)
    assert not fs.waiters
    adm.max_queue_wait_s = None  # no bound: the deadline decides (504)
    with pytest.raises(InvokeError) as e:
        await adm.acquire(fs, time.monotonic() + 0.1)
    assert e.value.status == 504
