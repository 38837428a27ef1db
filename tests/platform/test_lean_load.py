"""The lean open-loop load generator of benchmarks/gateway_overhead.py (benchmarks/lean_load.py),
against real loopback servers: every request answered and timed, non-200 and dropped responses
counted as errors, responses read by their Content-Length across reads, connections bounded."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hearth.redis_server import free_port

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "lean_load.py"


def _lean():
    spec = importlib.util.spec_from_file_location("lean_load_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _serve(code: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the test server did not come up")


# answers each request after `delay`: 200 with a 5-byte body written in two pieces (the client
# must join reads), every 4th request a 500, and it closes the connection on the 10th without
# answering (a request that gets no response)
ODD = """
import asyncio, sys
DELAY = 0.01
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf, self.n = t, b"", 0
    def data_received(self, data):
        self.buf += data
        while (end := self.buf.find(b"\\r\\n\\r\\n")) >= 0:
            self.buf = self.buf[end + 4:]
            self.n += 1
            asyncio.get_running_loop().call_later(DELAY, self.answer, self.n)
    def answer(self, n):
        if n == 10:
            self.t.close()
            return
        status = b"500 Oops" if n % 4 == 0 else b"200 OK"
        self.t.write(b"HTTP/1.1 " + status + b"\\r\\ncontent-length: 5\\r\\n\\r\\nab")
        asyncio.get_running_loop().call_later(0.001, self.t.write, b"cde")
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
"""


def test_every_request_to_the_static_responder_is_answered_and_timed():
    lean = _lean()
    port = free_port()
    proc = _serve(lean.RESPONDER, port)
    try:
        got = asyncio.run(lean.open_loop(f"http://127.0.0.1:{port}/noop", 0.5, 400))
    finally:
        proc.kill()
        proc.wait()
    assert got["n"] == 200 and got["errors"] == 0
    assert len(got["lat"]) == 200 and all(0 < x < 1.0 for x in got["lat"])
    assert 1 <= got["connections"] <= 200


def test_errors_split_reads_and_a_dropped_connection_are_counted():
    lean = _lean()
    port = free_port()
    proc = _serve(ODD, port)
    try:
        # 50 requests, 5 ms apart, each answered 10 ms later: two or three in flight at once
        got = asyncio.run(lean.open_loop(f"http://127.0.0.1:{port}/x", 0.25, 200))
    finally:
        proc.kill()
        proc.wait()
    assert got["n"] < 50  # the requests in flight on a closed connection got no response
    assert got["errors"] > 50 - got["n"]  # ...and the 500s are errors too
    assert all(x >= 0.009 for x in got["lat"])  # timed to the body's last byte (after 10 ms)


def test_the_pool_of_connections_is_bounded(monkeypatch):
    lean = _lean()
    monkeypatch.setattr(lean, "POOL", 2)
    port = free_port()
    slow = ODD.replace("DELAY = 0.01", "DELAY = 0.05").replace("n == 10", "n < 0")
    proc = _serve(slow.replace("n % 4 == 0", "False"), port)  # every request: 200 after 50 ms
    try:
        got = asyncio.run(lean.open_loop(f"http://127.0.0.1:{port}/x", 0.1, 200))
    finally:
        proc.kill()
        proc.wait()
    assert got["connections"] == 2
    assert got["n"] == 20
    # requests waited for one of the two connections: the last ones' latency counts the wait
    assert max(got["lat"]) > 0.2
    assert got["errors"] == 0


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
