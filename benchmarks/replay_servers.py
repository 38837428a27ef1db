"""The targets replay_accuracy.py drives: a bare aiohttp server in its own process (a no-op
answering 200; the overload floor answering a constant 503 at once; or the relay baseline, a
front relaying every body to one worker process), and a private Hearth node with the replay
workload deployed as the no-op function, shedding on or off, from this tree or a revision's
``platform/``."""

from __future__ import annotations

import subprocess
import sys

SERVER = r"""
import asyncio, collections, socket, subprocess, sys
from aiohttp import web
MODE = sys.argv[1] if len(sys.argv) > 1 else ""
# the relay baseline's worker: answers every length-prefixed body, one at a time; the answers
# to one read leave together (as a Hearth instance batches its replies)
WORKER = '''
import socket, sys
s = socket.socket(fileno=int(sys.argv[2]))
buf = b""
while True:
    data = s.recv(65536)
    if not data:
        break
    buf += data
    out = []
    while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
        buf = buf[4 + int.from_bytes(buf[:4], "big"):]
        out.append((2).to_bytes(4, "big") + b"{}")
    if out:
        s.sendall(b"".join(out))
'''
class Relay:
    # the cheapest two-process design: each body over one unix socket to a worker process,
    # its answer (in order) back as the response
    def __init__(self):
        a, b = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, "relay-worker", str(b.fileno())],
                                     pass_fds=[b.fileno()])
        b.close()
        self.sock, self.waiting = a, collections.deque()
    async def start(self):
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        asyncio.get_running_loop().create_task(self.read())
    async def read(self):
        while True:
            n = int.from_bytes(await self.reader.readexactly(4), "big")
            self.waiting.popleft().set_result(await self.reader.readexactly(n))
    async def call(self, body):
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.writer.write(len(body).to_bytes(4, "big") + body)
        return await fut
RELAY = Relay() if MODE == "relay" else None
async def invoke(request):
    if MODE == "503":  # the cheapest back-pressure answer: constant, body unread
        return web.Response(status=503, body=b'{"error":"overloaded","detail":"retry later"}',
                            content_type="application/json", headers={"Retry-After": "1"})
    body = await request.read()
    if RELAY is not None:
        return web.Response(body=await RELAY.call(body), content_type="application/json")
    return web.Response(body=b"{}", content_type="application/json",
                        headers={"X-Hearth-Cold": "0", "X-Hearth-Instance": "noop-1"})
async def main():
    if RELAY is not None:
        await RELAY.start()
    app = web.Application()
    app.router.add_post("/v1/functions/{tail}", invoke)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def start_noop_server(bare_503: bool = False, relay: bool = False) -> tuple[str, subprocess.Popen]:
    """A bare aiohttp server on loopback, its own process: a no-op answering 200, or (`bare_503`)
    one answering every POST at once with a constant 503 + Retry-After (the overload floor), or
    (`relay`) one relaying every body to a worker process over a unix socket and answering 200
    with its reply (the relay baseline: what any design that runs the function in a process of
    its own pays, in the same language)."""
    args = ["503"] if bare_503 else ["relay"] if relay else []
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, *args], stdout=subprocess.PIPE, text=True
    )
    port = int(proc.stdout.readline().strip())
    return f"http://127.0.0.1:{port}", proc


SHED_ENV = {"HEARTH_MAX_QUEUE_WAIT_S": "0.025", "HEARTH_SHED_LOOP_LAG_S": "0.025"}
NO_SHED_ENV = {"HEARTH_MAX_QUEUE_WAIT_S": "", "HEARTH_SHED_LOOP_LAG_S": "0"}


def start_hearth_gateway(shed: bool = True, dataplane: str = "auto", platform: str | None = None):
    """A private Hearth node (hearth.localnode: own state dir, port, redis-server; `dataplane`
    as `hearth up` takes it: auto is eBPF where it loads, else the unix relay) with the replay
    workload deployed and warmed up (the first call pays the cold start; the benchmark measures
    the steady state). Raises NodeStartError with the node's log.

    `shed`: a call's wait bounded at 25 ms from when the gateway read it (503 if its handler
    runs later, 429 if no instance takes it by then) and invokes shed while the gateway's loop
    lags > 25 ms, so overload answers 429/503 + Retry-After rather than seconds of hidden
    queueing (environment variables of the same names override); False: both off (the
    baseline). `platform`: another revision's ``platform/`` to run the node from (``--rev``)."""
    import os
    from pathlib import Path

    import yaml
    from hearth.localnode import start_node

    env = {k: os.environ.get(k, v) for k, v in SHED_ENV.items()} if shed else dict(NO_SHED_ENV)
    if platform is not None:
        env["PYTHONPATH"] = platform
    # a private state directory, removed by node.stop() (a mkdtemp of its own was left behind)
    node = start_node(None, dataplane=dataplane, env=env)
    try:
        spec = Path(__file__).resolve().parents[1] / "functions/replay/specs/replay-workload.yaml"
        node.client.deploy(yaml.safe_load(spec.read_text()))
        node.client.invoke("replay-workload", b'{"duration_ms": 0}', "application/json")
    except BaseException:
        node.stop()
        raise
    return node
