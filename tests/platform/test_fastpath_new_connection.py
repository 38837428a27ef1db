"""New connections on the node gateway's fast path (`gateway.fastpath.FastTap`, #19): a burst of
200 new connections is each answered on the fast path, and a connection that never sends a
byte is still closed by aiohttp's idle timer, as is one served on the fast path and then left
idle (the guard for any change to when aiohttp's protocol learns of a connection: one that
deferred its `connection_made` was tried and dropped, docs/performance-journal.md
"Fourteenth stop")."""

from __future__ import annotations

import asyncio
import time

import pytest
from gateway_in_process import gateway_in_process

ASK = (
    b"POST /v1/functions/nosuch:invoke HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer t0k\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(n)
    return head


@pytest.mark.asyncio
async def test_a_burst_of_new_connections_is_each_accepted_and_answered(tmp_path, redis_url):
    async with gateway_in_process(tmp_path, redis_url) as gw:
        conns = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", gw.port) for _ in range(200))
        )
        for _, w in conns:
            w.write(ASK)
        heads = await asyncio.gather(*(_answer(r) for r, _ in conns))
        assert all(h.startswith(b"HTTP/1.1 404 ") for h in heads)
        assert gw.agent.metrics.fast_path.n == 200  # each a first read, on the fast path
        for _, w in conns:
            w.close()


@pytest.mark.asyncio
async def test_a_connection_that_sends_nothing_is_closed_by_the_idle_timer(tmp_path, redis_url):
    async with gateway_in_process(tmp_path, redis_url, runner_kw={"keepalive_timeout": 0.3}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed, never asked
        assert time.monotonic() - t0 >= 0.25
        writer.close()
        # and one served on the fast path, then idle, the same way
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(ASK)
        assert (await _answer(reader)).startswith(b"HTTP/1.1 404 ")
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()
