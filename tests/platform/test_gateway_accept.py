"""The node gateway's accept (`hearth.gateway.accept`) and aiohttp's `connection_made` after a
new connection's first read (`gateway.fastpath.FastTap`), #19.

A burst of new connections, more than arrive in one readiness of the listening socket, is
each accepted and answered; a connection that never sends a byte is still closed by aiohttp's
idle timer (its `connection_made` still runs when no request comes); a server out of file
descriptors backs off and accepts the rest once descriptors are free again, as asyncio's own
accept does (in a process of its own, under a low descriptor limit)."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gateway_in_process import gateway_in_process

ROOT = Path(__file__).resolve().parents[2]
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


SERVER = """
import asyncio, os, resource, sys
from aiohttp import web
from hearth.gateway.sojourn import READ_STAMPS, ReadStamps, listen

async def main():
    app = web.Application()
    app[READ_STAMPS] = ReadStamps()
    async def ok(request):
        return web.Response(text="ok")
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    server = await listen(runner, "127.0.0.1", 0)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(float(sys.argv[1]))
    server.close()
    await runner.cleanup()

asyncio.run(main())
"""


def test_out_of_descriptors_it_backs_off_and_accepts_the_rest_later(tmp_path):
    """Room for about two connections: eight are opened at once; each answered one is closed
    by the client, and every one of the eight is answered within a few of asyncio's 1 s
    back-offs (without the back-off's re-arm, the rest would never be accepted)."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    proc = subprocess.Popen(
        [sys.executable, str(script), "15"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    socks: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        waiting, answered = list(socks), 0
        until = time.monotonic() + 12
        while waiting and time.monotonic() < until:
            ready, _, _ = select.select(waiting, [], [], 0.5)
            for s in ready:
                assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
                waiting.remove(s)
                s.close()  # its descriptor in the server comes free
                answered += 1
        assert answered == 8
    finally:
        for s in socks:
            s.close()
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "out of system resource" in err  # it did run out (the limit is what is tested)
