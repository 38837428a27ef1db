"""H4 at the front gateway (`--role gateway`): a body that stalls is answered 408 by its
deadline (grace + length at the minimum rate), one client may send only so many bodies at once
(429 + Retry-After), and normal bodies still stream through to the node agent. The front is the
real `make_front` on a loopback port; behind it a real HTTP server stands in for a node agent
and counts the body bytes it received."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from hearth.gateway.body import BodyLimits
from hearth.gateway.front import Agents, make_front


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def _stall(
    port: int, n: int, sent: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(
        f"POST /v1/functions/f:invoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {n}\r\n\r\n".encode()
        + sent
    )
    await w.drain()
    return r, w


async def _status(r: asyncio.StreamReader) -> tuple[int, dict, dict]:
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
    lines = head.decode().split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await asyncio.wait_for(r.readexactly(int(hdrs["content-length"])), 20)
    return int(lines[0].split()[1]), hdrs, json.loads(body)


async def test_front_gateway_bodies_have_deadlines_and_per_client_limits():
    got: list[int] = []

    async def agent(request: web.Request) -> web.Response:
        body = await request.read()
        got.append(len(body))
        return web.json_response({"len": len(body)})

    upstream = web.Application()
    upstream.router.add_post("/v1/functions/{name}", agent)
    up_runner, up_url = await _serve(upstream)
    limits = BodyLimits(max_body_bytes=1 << 20, grace_s=2.0, min_rate=64 << 10, per_client=2)
    front_runner, front_url = await _serve(make_front(Agents(up_url), body_limits=limits))
    port = int(front_url.rsplit(":", 1)[1])
    try:
        # a normal body streams through
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{front_url}/v1/functions/f:invoke", data=b"x" * 300_000) as r:
                assert r.status == 200 and (await r.json())["len"] == 300_000
        # two stalled bodies from one address: the third is refused at once
        stalled = [await _stall(port, 1000, b"[1,") for _ in range(2)]
        for _ in range(500):  # both are being received by now
            if limits.active == 2:
                break
            await asyncio.sleep(0.01)
        assert limits.active == 2
        r3, w3 = await _stall(port, 10, b"")
        status, hdrs, body = await _status(r3)
        assert (status, body["error"], hdrs.get("retry-after")) == (429, "too_many_requests", "1")
        w3.close()
        # the stalled ones are answered 408 by their deadline (2 s + 1000 B at 64 KiB/s)
        for r, w in stalled:
            status, _, body = await _status(r)
            assert (status, body["error"]) == (408, "request_timeout")
            w.close()
        assert 3 not in got and 1000 not in got  # no stalled body reached the agent whole
        # their slots are free again: the same client may send
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{front_url}/v1/functions/f:invoke", data=b"{}") as r:
                assert r.status == 200
    finally:
        await front_runner.cleanup()
        await up_runner.cleanup()
