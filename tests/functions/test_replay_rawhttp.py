"""The replay driver's keep-alive HTTP/1.1 client against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from hearth.functions.replay.rawhttp import HTTPError, RawClient


@pytest.fixture
async def server():
    async def plain(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=b"echo:" + body, headers={"X-Hearth-Cold": "1"})

    async def chunked(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=201)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"ab", b"cde", b"f" * 5000):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def close(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=503, body=b"bye", headers={"Connection": "close"})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=b"late")

    app = web.Application()
    app.router.add_post("/plain", plain)
    app.router.add_post("/chunked", chunked)
    app.router.add_post("/close", close)
    app.router.add_post("/slow", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_keepalive_reuse_headers_and_bodies(server):
    c = RawClient(server, {"Content-Type": "application/json"})
    for i in range(20):
        status, h, body = await c.post("/plain", b'{"i": %d}' % i, 5)
        assert status == 200 and body == b'echo:{"i": %d}' % i
        assert h["x-hearth-cold"] == "1"
    assert c.opened == 1  # one connection reused 20 times
    # many concurrent requests open more connections, all answered in order per request
    outs = await asyncio.gather(*[c.post("/plain", str(i).encode(), 5) for i in range(50)])
    assert [o[2] for o in outs] == [b"echo:" + str(i).encode() for i in range(50)]
    status, _, body = await c.post("/chunked", b"", 5)
    assert status == 201 and body == b"abcde" + b"f" * 5000
    c.close()


async def test_connection_close_timeout_and_refused(server):
    c = RawClient(server)
    status, _, body = await c.post("/close", b"x", 5)
    assert status == 503 and body == b"bye"
    assert c.idle == []  # not reused after Connection: close
    assert (await c.post("/plain", b"y", 5))[0] == 200
    with pytest.raises(TimeoutError):
        await c.post("/slow", b"", 0.2)
    c.close()
    with pytest.raises(OSError):
        await RawClient("http://127.0.0.1:9").post("/x", b"", 2)
    with pytest.raises(ValueError, match="http://"):
        RawClient("https://example.org")
    assert issubclass(HTTPError, ConnectionError)
