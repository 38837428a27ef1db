"""A lean open-loop HTTP/1.1 load generator, and the minimal static responder that gives its floor.

Why: aiohttp's client costs about 0.4 ms of its own per request (a request object, a
connector, a response object, its reader task), so an open-loop latency measured with it
mostly measured the client (issue #19: the bare aiohttp server measured 0.51-0.74 ms open loop
with it on a quiet machine). This generator sends each request as fixed bytes over an asyncio
Protocol on a bounded pool of keep-alive connections (one request in flight per connection, a
new connection only when none is idle, at most `POOL`; past that, requests wait for one) and
reads each response by its Content-Length. It is the same for every target, runs in its own
process, and its own floor is measured against `RESPONDER` (a raw protocol that answers every
request with a fixed empty 200), so a figure can be read against what the client and loopback
alone cost.

Each request's latency runs from when the schedule issued it (after the sleep to its send
time: as aiohttp's client, so queueing for a connection counts) to its response's last byte.
The sends' lateness against the schedule is reported too (`late_p99_ms`): a generator falling
behind would show there.
"""

from __future__ import annotations

import asyncio
import collections
import time
from urllib.parse import urlsplit

POOL = 256  # connections at most (aiohttp's client in the same benchmark: limit=256)

RESPONDER = """
import asyncio, sys
OK = b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n"
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf = t, b""
    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\\r\\n\\r\\n")
            if end < 0:
                return
            n = 0
            for line in self.buf[:end].split(b"\\r\\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    n = int(v)
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n:]
            self.t.write(OK)
async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(P, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
"""


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time, the response read by Content-Length."""

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.t: asyncio.Transport | None = None
        self.buf = b""
        self.t0 = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def send(self, t0: float) -> None:
        self.t0, self.busy = t0, True
        self.t.write(self.gen.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end]
        length = None
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        status = int(head[9:12])
        if length is None:  # (no chunked or close-delimited bodies here: an error, dropped)
            self.gen.done(self, time.perf_counter() - self.t0, False)
            self.t.close()  # type: ignore[union-attr]
            return
        if len(self.buf) < end + 4 + length:
            return
        self.buf = self.buf[end + 4 + length :]
        self.gen.done(self, time.perf_counter() - self.t0, status == 200)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _Gen:
    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.request = (
            f"POST {u.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        self.idle: collections.deque[_Conn] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()  # issued, no connection
        self.conns = 0
        self.lat: list[float] = []
        self.errors = 0
        self.outstanding = 0
        self.all_done: asyncio.Future | None = None

    def issue(self, t0: float) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(t0)  # the most recently used: warm in every cache
        elif self.conns < POOL:
            self.conns += 1
            asyncio.get_running_loop().create_task(self._open(t0))
        else:
            self.waiting.append(t0)

    async def _open(self, t0: float) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Conn(self), self.host, self.port
            )
        except OSError:
            self.conns -= 1
            self._settle(False)
            return
        conn.send(t0)

    def done(self, conn: _Conn, seconds: float, ok: bool) -> None:
        conn.busy = False
        self.lat.append(seconds)
        self._settle(ok)
        if conn.t is not None and not conn.t.is_closing():
            if self.waiting:
                conn.send(self.waiting.popleft())
            else:
                self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        self.conns -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:  # its request got no response
            conn.busy = False
            self._settle(False)

    def _settle(self, ok: bool) -> None:
        self.errors += not ok
        self.outstanding -= 1
        if not self.outstanding and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)


async def open_loop(url: str, seconds: float, rate: float) -> dict:
    """`seconds` × `rate` POSTs of an empty body at a fixed rate; latencies in seconds."""
    gen = _Gen(url)
    n = int(seconds * rate)
    late: list[float] = []
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    start = clock()
    for i in range(n):
        due = start + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        now = clock()
        late.append(max(0.0, now - due))
        gen.issue(now)
    if gen.outstanding:  # (waited for only now: the count is 0 between requests too)
        gen.all_done = loop.create_future()
        await gen.all_done
    el = clock() - start
    for c in list(gen.idle):
        c.t.close()  # type: ignore[union-attr]
    late.sort()
    return {
        "n": len(gen.lat),
        "rps": len(gen.lat) / el,
        "lat": gen.lat,
        "errors": gen.errors,
        "late_p99_ms": late[int(0.99 * (len(late) - 1))] * 1000 if late else 0.0,
        "connections": gen.conns,
    }
