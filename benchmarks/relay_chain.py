"""The floors of the cross-node benchmarks: a bare aiohttp server whose handler passes the body
along a chain of processes over persistent loopback TCP connections (asyncio Protocols, a 4-byte
length prefix) and answers what comes back — the least a request can cost with that many process
hops and almost no Python on them.

A chain of one process (two hops more than the bare request) has the shape of a same-node invoke
(the agent hands the payload to an instance process); a chain of two (four more) that of a
cross-node one (node a's agent hands it to node b's, which hands it to its instance).

    python benchmarks/relay_chain.py PORT N      # HTTP on 127.0.0.1:PORT, N processes behind it

The chain's processes listen on PORT+1 … PORT+N and exit when the process that started them does.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from collections.abc import Callable

OnFrame = Callable[["Frames", bytes], None]


class Frames(asyncio.Protocol):
    """Length-prefixed frames in, each whole one (prefix included) to ``on_frame``."""

    def __init__(self, on_frame: OnFrame):
        self.on_frame, self.b = on_frame, bytearray()

    def connection_made(self, transport) -> None:  # noqa: ANN001
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.b += data
        while len(self.b) >= 4:
            n = struct.unpack_from("<I", self.b)[0]
            if len(self.b) < 4 + n:
                return
            self.on_frame(self, bytes(self.b[: 4 + n]))
            del self.b[: 4 + n]


async def connect(port: int, on_frame: OnFrame) -> Frames:
    loop = asyncio.get_running_loop()
    for _ in range(400):
        try:
            return (await loop.create_connection(lambda: Frames(on_frame), "127.0.0.1", port))[1]
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"relay hop on port {port} did not start")


def spawn(port: int, rest: int) -> subprocess.Popen:
    """The hop on ``port`` with ``rest`` more behind it; it exits when our pipe closes."""
    return subprocess.Popen(
        [sys.executable, __file__, "--hop", str(port), str(rest)], stdin=subprocess.PIPE
    )


async def chain(port: int, rest: int) -> Frames | None:
    """Start the hops behind ``port - 1``; our connection to the first (None for none)."""
    if rest <= 0:
        return None
    spawn(port, rest - 1)
    return await connect(port, lambda _p, f: _up.pop(0)(f))


_up: list[Callable[[bytes], None]] = []  # who waits for the next frame coming back, in order


async def hop(port: int, rest: int) -> None:
    """Serve ``port``: frames go down the chain and back, or are echoed at its end."""
    loop = asyncio.get_running_loop()
    loop.add_reader(0, os._exit, 0)  # whoever started us is gone
    nxt = await chain(port + 1, rest)

    def on_frame(p: Frames, f: bytes) -> None:
        if nxt is None:
            p.t.write(f)
        else:
            _up.append(p.t.write)
            nxt.t.write(f)

    srv = await loop.create_server(lambda: Frames(on_frame), "127.0.0.1", port)
    await srv.serve_forever()


def serve_http(port: int, n: int) -> None:
    from aiohttp import web

    link: list[Frames | None] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        fut = asyncio.get_running_loop().create_future()
        _up.append(lambda f: fut.set_result(f[4:]))
        link[0].t.write(struct.pack("<I", len(body)) + body)  # type: ignore[union-attr]
        return web.Response(body=await fut)

    async def setup(_app: web.Application):
        link.append(await chain(port + 1, n))
        yield

    app = web.Application()
    app.cleanup_ctx.append(setup)
    app.router.add_post("/echo", echo)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _ports(args: list[str]) -> tuple[bool, int, int]:
    """(is a hop, port, n) from the command line; SystemExit with the usage otherwise."""
    hop_ = args[:1] == ["--hop"]
    rest = args[1:] if hop_ else args
    try:
        a, b = (int(x) for x in rest)
    except ValueError:
        sys.exit(
            "usage: python benchmarks/relay_chain.py PORT N  (the floor server that cross_node.py"
            " and cross_node_ab.py start; not a benchmark of its own)"
        )
    return hop_, a, b


if __name__ == "__main__":
    is_hop, first, second = _ports(sys.argv[1:])
    if is_hop:
        asyncio.run(hop(first, second))
    else:
        serve_http(first, second)
