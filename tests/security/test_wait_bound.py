"""The node's wait bound (HEARTH_MAX_QUEUE_WAIT_S) under overload: it counts from when the
gateway read the request, a call already past it is answered 503 at once, and `hearth up`
applies it at all (it did not: the setting was read and dropped)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gateway_in_process import gateway_in_process
from hearth.client import ClientError
from hearth.localnode import LocalNode

#: the module's node (conftest `size_node`): calls may wait 0.5 s for an instance, no longer
NODE_ENV = {"HEARTH_MAX_QUEUE_WAIT_S": "0.5"}


def test_the_wait_counts_from_when_the_gateway_read_the_request():
    from hearth.agent.admitter import wait_until
    from hearth.gateway.sojourn import over_wait, waited

    assert waited(10.0, 10.3) == pytest.approx(0.3)
    assert waited(None, 10.3) == 0.0  # no stamp (served without `listen`): nothing is shed
    assert waited(10.5, 10.3) == 0.0  # a read after `now` (a later chunk): no wait
    assert over_wait(10.0, 10.3, 0.25) and not over_wait(10.0, 10.3, 0.5)
    assert not over_wait(10.0, 99.0, None) and not over_wait(10.0, 99.0, 0)  # no bound
    assert not over_wait(None, 99.0, 0.25)
    # admission waits for what is left of the bound, counted from the read
    assert wait_until(10.0, 10.3, 0.5) == pytest.approx(10.5)
    assert wait_until(None, 10.3, 0.5) == pytest.approx(10.8)
    assert wait_until(10.0, 10.3, None) == float("inf")


async def test_admission_waits_only_for_what_is_left_of_the_bound():
    """A call that already waited its bound in the gateway gets 429 at once, though an
    instance frees up well within the bound counted from the admission."""
    from hearth.agent.admitter import Admitter
    from hearth.invoke import InvokeError
    from sec_helpers import one_busy_admitter

    adm, fs, inst = one_busy_admitter(max_queue_wait_s=5.0)

    def free_soon() -> None:  # the busy instance finishes 0.2 s from now
        inst.state, inst.inflight = "idle", 0
        Admitter.wake(fs)

    loop = asyncio.get_running_loop()
    loop.call_later(0.2, free_soon)
    with pytest.raises(InvokeError) as e:  # read 10 s ago: no wait left
        await adm.acquire(fs, time.monotonic() + 30, since=time.monotonic() - 10)
    assert (e.value.status, e.value.error) == (429, "overloaded")
    got, _ = await adm.acquire(fs, time.monotonic() + 30, since=time.monotonic())
    assert got is inst  # read just now: it waits the 0.2 s and is served


HOG_S, WAIT_S = 0.1, 0.05  # each loop turn blocks 2x the bound


async def test_a_call_that_waited_in_the_gateway_past_the_bound_is_answered_503(
    tmp_path, redis_url
):
    """The node gateway as `hearth up` builds and serves it (`make_app` with a real agent,
    unstarted; `listen` on loopback, every read stamped), with no loop-lag shedding: while its
    loop is slow, an invoke read from its socket waits two loop turns before its handler runs,
    longer than the bound, and is answered 503 + Retry-After; health is served; once the loop
    is free the same invoke reaches the handler."""
    import aiohttp

    async with gateway_in_process(
        tmp_path, redis_url, hog_s=HOG_S, agent_kw={"max_queue_wait_s": WAIT_S}
    ) as gw:
        invoke = f"{gw.url}/v1/functions/nosuch:invoke"
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0k"}) as s:
            async with s.post(invoke, data=b"{}") as resp:
                assert resp.status == 404  # a quiet loop: the handler answers
            gw.slow()
            async with s.post(invoke, data=b"{}") as resp:
                body = await resp.json()
                assert (resp.status, body["error"], resp.headers.get("Retry-After")) == (
                    503,
                    "overloaded",
                    "1",
                ), body
                assert "waited" in body["detail"]
            async with s.get(gw.url + "/healthz") as resp:
                assert resp.status == 200  # not an invoke: served however late
            gw.fast()
            async with s.post(invoke, data=b"{}") as resp:
                assert resp.status == 404
        assert gw.agent.metrics.rejected.labels("overloaded")._value.get() == 1


def test_hearth_up_bounds_the_wait_for_an_instance(size_node: LocalNode):
    """Through a real `hearth up` with HEARTH_MAX_QUEUE_WAIT_S=0.5: with the only instance
    busy for 3 s, the next call is answered 429 + Retry-After instead of waiting its turn
    (before the fix `hearth up` ignored the setting and that call waited, then got 200);
    the call that holds the instance is still answered 200."""
    c = size_node.client
    c.deploy(
        {
            "name": "nap",
            "handler": "hearth.functions.replay.workload:handle",
            "concurrency": 1,
            "max_instances": 1,
            "queue_size": 100,
        }
    )
    nap = json.dumps({"duration_ms": 3000, "memory_mb": 0, "mode": "sleep"}).encode()
    assert c.invoke("nap", b'{"duration_ms": 0, "memory_mb": 0}', "application/json").status == 200
    with ThreadPoolExecutor(1) as ex:
        first = ex.submit(c.invoke, "nap", nap, "application/json")
        for _ in range(200):  # until the call holds the instance
            inst = c.status()["functions"]["nap"]["instances"]
            if any(i["inflight"] for i in inst) or first.done():
                break
            time.sleep(0.02)
        with pytest.raises(ClientError) as e:
            c.invoke("nap", nap, "application/json")
        assert e.value.status == 429, e.value
        assert json.loads(e.value.body)["error"] == "overloaded"
        assert first.result(timeout=60).status == 200  # the admitted call: answered
