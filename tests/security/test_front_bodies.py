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
from hearth.gateway.front import Agents, make_front, rendezvous
from sec_helpers import silent_listener


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


async def _chunked(port: int, parts: list[bytes]) -> tuple[int, dict, dict]:
    """A POST without Content-Length (chunked), its status and JSON answer."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(
        b"POST /v1/functions/f:invoke HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    try:
        for part in parts:
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
    except ConnectionError:
        pass  # answered (and closed) before the body ended: the status is still there
    try:
        return await _status(r)
    finally:
        w.close()


async def test_front_gateway_bodies_have_deadlines_and_per_client_limits():
    got: list[int] = []  # bodies the agent received whole
    cut: list[str] = []  # bodies the agent began to receive that were cut off

    async def agent(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except Exception as e:
            cut.append(type(e).__name__)
            raise
        got.append(len(body))
        return web.json_response({"len": len(body)})

    upstream = web.Application(client_max_size=8 << 20)  # the front's limit is the one tested
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
        # two stalled bodies from one address, a small one (read whole before any agent is
        # asked) and a streamed one: the third is refused at once
        stalled = [await _stall(port, n, b"[1,") for n in (1000, 100_000)]
        for _ in range(500):  # both are being received by now
            if limits.active == 2:
                break
            await asyncio.sleep(0.01)
        assert limits.active == 2
        r3, w3 = await _stall(port, 10, b"")
        status, hdrs, body = await _status(r3)
        assert (status, body["error"], hdrs.get("retry-after")) == (429, "too_many_requests", "1")
        w3.close()
        # past the limit on bodies being received from all clients: 503, whoever sends
        limits.per_client, limits.total = 10, 2
        r4, w4 = await _stall(port, 10, b"")
        status, hdrs, body = await _status(r4)
        assert (status, body["error"], hdrs.get("retry-after")) == (503, "busy", "1")
        w4.close()
        limits.per_client, limits.total = 2, 4096
        # the stalled ones are answered 408 by their deadline (2 s + their length at 64 KiB/s)
        for r, w in stalled:
            status, _, body = await _status(r)
            assert (status, body["error"]) == (408, "request_timeout")
            w.close()
        # the agent never saw the small one; it began receiving the streamed one and saw it cut
        # off, never a (truncated) whole body
        for _ in range(500):
            if cut:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert got == [300_000] and len(cut) == 1, (got, cut)
        # too large: declared (refused before anything is read) or found while streaming
        declared = await _stall(port, (1 << 20) + 1, b"")
        status, _, body = await _status(declared[0])
        assert (status, body.get("error")) == (413, "payload_too_large"), body
        declared[1].close()
        status, _, body = await _chunked(port, [b"y" * (256 << 10)] * 5)
        assert (status, body.get("error")) == (413, "payload_too_large"), body
        status, _, body = await _chunked(port, [b"y" * (256 << 10)] * 3)
        assert (status, body) == (200, {"len": 768 << 10})
        assert got == [300_000, 768 << 10]  # the over-long one never reached the agent whole
        # their admissions are free again: the same client may send
        assert limits.active == 0 and limits.bytes_in_flight == 0
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{front_url}/v1/functions/f:invoke", data=b"{}") as r:
                assert r.status == 200
    finally:
        await front_runner.cleanup()
        await up_runner.cleanup()


async def test_a_body_stops_counting_once_received_not_when_the_response_ends():
    """Admission bounds bodies being received: a slow invocation whose body has arrived does
    not hold its client's admission (with per_client=1 a second request still gets in)."""
    reads: list[int] = []
    release = asyncio.Event()

    async def agent(request: web.Request) -> web.Response:
        reads.append(len(await request.read()))
        await release.wait()  # the function runs on after its body was read
        return web.json_response({"ok": True})

    upstream = web.Application()
    upstream.router.add_post("/v1/functions/{name}", agent)
    up_runner, up_url = await _serve(upstream)
    limits = BodyLimits(per_client=1)
    front_runner, front_url = await _serve(make_front(Agents(up_url), body_limits=limits))
    url = f"{front_url}/v1/functions/f:invoke"
    try:
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(s.post(url, data=b'{"n": 1}'))
            for _ in range(500):  # the first body has been received (its function still runs)
                if reads and limits.active == 0:
                    break
                await asyncio.sleep(0.01)
            second = asyncio.create_task(s.post(url, data=b'{"n": 2}'))
            for _ in range(500):
                if len(reads) == 2 or second.done():
                    break
                await asyncio.sleep(0.01)
            release.set()
            r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), 20)
            assert (r1.status, r2.status) == (200, 200), await r2.text()
            assert reads == [8, 8]
            r1.release()
            r2.release()
    finally:
        release.set()
        await front_runner.cleanup()
        await up_runner.cleanup()


async def test_a_call_waiting_for_a_silent_node_holds_no_admission():
    """While the front waits for a connect to a node that answers nothing, neither a small body
    (read whole first) nor a streamed one (taken when a node takes it) holds its client's place:
    with per_client=1, two calls wait at once, then both fail over to the live agent."""
    reads: list[int] = []

    async def agent(request: web.Request) -> web.Response:
        reads.append(len(await request.read()))
        return web.json_response({"ok": True})

    upstream = web.Application(client_max_size=1 << 20)
    upstream.router.add_post("/v1/functions/{name}", agent)
    up_runner, up_url = await _serve(upstream)
    limits = BodyLimits(per_client=1)
    with silent_listener() as dead:
        fn = next(f"f{i}" for i in range(1000) if rendezvous(f"f{i}", [dead, up_url])[0] == dead)
        front = make_front(Agents(f"{dead},{up_url}"), body_limits=limits, connect_s=1.0)
        front_runner, front_url = await _serve(front)
        url = f"{front_url}/v1/functions/{fn}:invoke"
        try:
            async with aiohttp.ClientSession() as s:
                calls = [
                    asyncio.create_task(s.post(url, data=body))
                    for body in (b'{"n": 1}', b"x" * 100_000)
                ]
                await asyncio.sleep(0.5)  # both wait for the silent node (1 s connect timeout)
                assert not reads and limits.active == 0 and limits.bytes_in_flight == 8
                r1, r2 = await asyncio.wait_for(asyncio.gather(*calls), 20)
                assert (r1.status, r2.status) == (200, 200), await r2.text()
                assert sorted(reads) == [8, 100_000]
                assert limits.active == 0 and limits.bytes_in_flight == 0
                r1.release()
                r2.release()
        finally:
            await front_runner.cleanup()
            await up_runner.cleanup()


async def test_calls_past_the_call_limit_are_answered_503_at_once():
    release = asyncio.Event()

    async def agent(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response({"ok": True})

    upstream = web.Application()
    upstream.router.add_post("/v1/functions/{name}", agent)
    up_runner, up_url = await _serve(upstream)
    front_runner, front_url = await _serve(make_front(Agents(up_url), max_calls=2))
    url = f"{front_url}/v1/functions/f:invoke"
    try:
        async with aiohttp.ClientSession() as s:
            held = [asyncio.create_task(s.post(url, data=b"{}")) for _ in range(2)]
            await asyncio.sleep(0.3)
            async with s.post(url, data=b"{}") as r:
                assert (r.status, r.headers.get("Retry-After")) == (503, "1")
                assert (await r.json())["error"] == "busy"
            async with s.get(f"{front_url}/healthz") as r:  # not a call: always answered
                assert r.status == 200
            release.set()
            for r in await asyncio.wait_for(asyncio.gather(*held), 20):
                assert r.status == 200
                r.release()
            async with s.post(url, data=b"{}") as r:
                assert r.status == 200
    finally:
        release.set()
        await front_runner.cleanup()
        await up_runner.cleanup()
