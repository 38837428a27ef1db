"""A dead node agent behind the front gateway must not turn into 429s for a busy client.

The front's per-client admission bounds bodies being received. A call to a node that died
without a word (a killed container: its address stops answering, connects hang until their
timeout) has its body read already, so it holds no admission while the front waits for that
connect and then fails over: one client at a steady rate gets every call answered 200 by the
live node, none 429. Real parts: `hearth up --role gateway` in front of a real `hearth up` node
and a listening socket whose accept queue is full (the kernel drops new SYNs: a silent node)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest
from hearth.gateway.front import rendezvous
from hearth.localnode import LocalNode, start_front
from sec_helpers import TOKEN, deploy, silent_listener

RATE = 200  # calls/s from one client address
DURATION_S = 4.0  # twice the front's 2 s connect timeout: the dead node is tried, then avoided


NODE_ENV: dict[str, str] = {}  # the live node (conftest.size_node), as configured by default


@pytest.fixture(scope="module")
def front_over_a_dead_node(size_node, tmp_path_factory) -> Iterator[tuple[LocalNode, str]]:
    with silent_listener() as dead:
        front = start_front(
            tmp_path_factory.mktemp("sec-front"), [dead, size_node.url], token=TOKEN
        )
        try:
            yield front, dead
        finally:
            front.stop()


async def _steady(url: str) -> list[tuple[int, str]]:
    """RATE calls/s for DURATION_S from one address, sent on schedule (open loop)."""
    out: list[tuple[int, str]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            try:
                async with s.post(
                    url, data=b"{}", headers={"content-type": "application/json"}
                ) as r:
                    body = await r.read()
                    out.append((r.status, r.headers.get("X-Hearth-Node-Agent", body.decode())))
            except (aiohttp.ClientError, TimeoutError) as e:
                out.append((0, type(e).__name__))

        loop = asyncio.get_running_loop()
        t0, tasks = loop.time(), []
        for i in range(int(RATE * DURATION_S)):
            await asyncio.sleep(max(0.0, t0 + i / RATE - loop.time()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return out


def test_a_dead_node_costs_a_busy_client_no_429(size_node, front_over_a_dead_node):
    front, dead = front_over_a_dead_node
    # a function whose home (the front's first choice) is the dead node; it lives on the other
    fn = next(
        f"steady-{i}"
        for i in range(1000)
        if rendezvous(f"steady-{i}", [dead, size_node.url])[0] == dead
    )
    deploy(
        size_node,
        fn,
        "size",
        concurrency=32,
        min_instances=1,
        max_instances=1,
        queue_size=4000,
    )
    out = asyncio.run(_steady(f"{front.url}/v1/functions/{fn}:invoke"))
    statuses = Counter(status for status, _ in out)
    assert len(out) == int(RATE * DURATION_S)  # every call ended (none hung)
    assert statuses[429] == 0, (statuses, front.log_tail())
    # every call was answered by the live node: the dead one only cost a failed connect
    assert statuses == {200: len(out)}, [x for x in out if x[0] != 200][:5]
    assert {where for _, where in out} == {size_node.url}
    assert front.client.request("GET", "/healthz").json()["down"] == [dead]
