"""A lean open-loop HTTP/1.1 load generator, and the minimal static responder that gives its floor.

Why: aiohttp's client costs about 0.4 ms of its own per request (a request object, a
connector, a response object, its reader task), so an open-loop latency measured with it
mostly measured the client (issue #19: the bare aiohttp server measured 0.51-0.74 ms open loop
p50 at 500/s with it, 0.11 ms with this one: docs/performance-journal.md, with the commands
and loads).
This generator sends each request as fixed bytes over an asyncio Protocol on a bounded pool of keep-alive connections (one request in flight per connection, a
new connection only when none is idle, at most `POOL`; past that, requests wait for one; a lost
connection is replaced) and reads each response to its end (by its Content-Length, its chunks,
or the connection's close). It is the same for every target, runs in its own
process, and its own floor is measured against `RESPONDER` (a raw protocol that answers every
request with a fixed empty 200), so a figure can be read against what the client and loopback
alone cost.

Only 200 responses are timed; anything else is an error (another status, a malformed or cut
response, a connection refused or lost under a request, no response within the deadline), so
fast errors cannot pull a percentile down. Each response is timed twice: from when the schedule
actually issued the request (after the sleep to its send time: as aiohttp's client, so queueing
for a connection counts; `lat`) and from the send time the schedule intended (`lat_intended`:
if the generator falls behind, the delay counts, so coordinated omission cannot hide it). How
late the sends were against the schedule is reported too (`late`, `late_p99_ms`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import selectors
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


def parse_response(buf: bytes, eof: bool) -> tuple[int, int, bool] | None:
    """(status, bytes, close) of the first whole response in `buf`, or None while more is
    needed; `close`: the connection cannot carry another request (``Connection: close``, or a
    body that ended with the connection).
    The body is read by its Content-Length, its chunks (``Transfer-Encoding: chunked``), or to
    the connection's end (`eof`: the server closed it) when it has neither; 1xx, 204 and 304
    have none. ValueError: not an HTTP/1.1 response (the client counts it as an error)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof:
            raise ValueError("the connection ended inside a response's head")
        return None
    head = buf[:end].split(b"\r\n")
    if not head[0].startswith(b"HTTP/1.") or len(head[0]) < 12:
        raise ValueError(f"not an HTTP/1.x status line: {head[0][:40]!r}")
    status = int(head[0][9:12])
    length, chunked, close = None, False, False
    for line in head[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding":
            chunked = v.strip().lower().endswith(b"chunked")
        elif k == b"connection":
            close = v.strip().lower() == b"close"
    body = end + 4
    if status < 200 or status in (204, 304):
        length, chunked = 0, False
    if chunked:
        pos = body
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl].split(b";")[0], 16)
            if size == 0:  # the last chunk, then trailers up to an empty line
                tail = buf.find(b"\r\n\r\n", nl) if buf[nl + 2 : nl + 4] != b"\r\n" else nl
                if tail < 0:
                    break
                return status, tail + 4, close
            if len(buf) < nl + 2 + size + 2:
                break
            pos = nl + 2 + size + 2
        if eof:
            raise ValueError("the connection ended inside a chunked body")
        return None
    if length is not None:
        if len(buf) >= body + length:
            return status, body + length, close
        if eof:
            raise ValueError("the connection ended inside a body")
        return None
    if not eof:
        return None  # close-delimited: the body ends with the connection
    return status, len(buf), True


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time, each response read to its end."""

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.t: asyncio.Transport | None = None
        self.buf = b""
        self.due = 0.0  # the request's send time by the schedule
        self.sent = 0.0  # ...and when the schedule actually issued it
        self.busy = False
        self.spent = False  # no further request may go on it (closed, or closing)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def send(self, due: float, sent: float) -> None:
        self.due, self.sent, self.busy = due, sent, True
        self.t.write(self.gen.request)  # type: ignore[union-attr]

    def _read(self, eof: bool) -> None:
        if not self.busy:  # bytes nobody asked for: the connection is out of step
            self.t.close()  # type: ignore[union-attr]
            return
        try:
            got = parse_response(self.buf, eof)
        except ValueError:
            got = (0, len(self.buf), True)  # (status 0: an error)
            self.t.close()  # type: ignore[union-attr]
        if got is None:
            return
        status, used, close = got
        self.buf = self.buf[used:]
        self.spent = self.spent or close or eof
        self.busy = False
        self.gen.done(self, time.perf_counter(), status == 200)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._read(False)

    def eof_received(self) -> bool:
        self.spent = True
        if self.busy:
            self._read(True)  # a close-delimited body ends here
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _Gen:
    def __init__(self, url: str, timeout: float) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.request = (
            f"POST {u.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        self.timeout = timeout
        self.idle: collections.deque[_Conn] = collections.deque()
        self.waiting: collections.deque[tuple[float, float]] = collections.deque()  # no connection
        self.conns = 0
        self.opened = 0
        self.open: set[_Conn] = set()
        self.lat: list[float] = []  # successful responses: from the actual send...
        self.lat_intended: list[float] = []  # ...and from the schedule's send time
        self.errors = 0
        self.outstanding = 0
        self.all_done: asyncio.Future | None = None
        self.stopped = False  # the run is over: no new connection

    def issue(self, due: float, now: float) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(due, now)  # the most recently used: warm in every cache
        else:
            self.waiting.append((due, now))
            self._refill()

    def _refill(self) -> None:
        """Open connections for waiting requests while the pool has room (a lost connection
        is replaced this way too)."""
        loop = asyncio.get_running_loop()
        while self.waiting and self.conns < POOL and not self.stopped:
            self.conns += 1
            loop.create_task(self._open(*self.waiting.popleft()))

    async def _open(self, due: float, sent: float) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Conn(self), self.host, self.port
            )
        except OSError:
            self.conns -= 1
            self._settle(False)
            self._refill()
            return
        self.opened += 1
        self.open.add(conn)
        conn.send(due, sent)

    def done(self, conn: _Conn, end: float, ok: bool) -> None:
        if ok and end - conn.due <= self.timeout:  # (past its deadline: counted as an error)
            self.lat.append(end - conn.sent)
            self.lat_intended.append(end - conn.due)
            self._settle(True)
        else:
            self._settle(False)
        if conn.spent and conn.t is not None:
            conn.t.close()  # (then `lost`: a waiting request gets a new connection)
        elif conn.t is not None and not conn.t.is_closing():
            if self.waiting:
                conn.send(*self.waiting.popleft())
            else:
                self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        self.conns -= 1
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:  # its request got no response
            conn.busy = False
            self._settle(False)
        self._refill()

    def _settle(self, ok: bool) -> None:
        self.errors += not ok
        self.outstanding -= 1
        if not self.outstanding and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)


async def open_loop(url: str, seconds: float, rate: float, timeout: float = 10.0) -> dict:
    """`seconds` × `rate` POSTs of an empty body at a fixed rate. Latencies (seconds) of the
    200s only, from the actual send (`lat`) and from the schedule's (`lat_intended`); every
    other outcome is an error: another status, a malformed or cut response, a connection
    refused or lost with the request on it, no whole response within `timeout` of the
    request's scheduled send (`timed_out`: still unanswered when the last one's time ran
    out)."""
    gen = _Gen(url, timeout)
    n = int(seconds * rate)
    late: list[float] = []
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    start = clock()
    due = start
    for i in range(n):
        due = start + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        now = clock()
        late.append(max(0.0, now - due))
        gen.issue(due, now)
    timed_out = 0
    if gen.outstanding:  # (waited for only now: the count is 0 between requests too)
        gen.all_done = loop.create_future()
        try:
            await asyncio.wait_for(gen.all_done, max(0.0, due + timeout - clock()))
        except TimeoutError:
            timed_out = gen.outstanding
            gen.errors += timed_out
    el = clock() - start
    gen.stopped = True
    for c in list(gen.open):
        if c.t is not None:
            c.t.close()
    late.sort()
    return {
        "n": len(gen.lat),
        "sent": n,
        "rps": len(gen.lat) / el,
        "lat": gen.lat,
        "lat_intended": gen.lat_intended,
        "errors": gen.errors,
        "timed_out": timed_out,
        "late": late,
        "late_p99_ms": late[int(0.99 * (len(late) - 1))] * 1000 if late else 0.0,
        "connections": gen.conns,
        "opened": gen.opened,
    }


def run_open_loop(url: str, seconds: float, rate: float, timeout: float = 10.0) -> dict:
    """`open_loop` on an event loop whose timers keep the schedule. Its selector is select(2),
    whose timeout is in microseconds, where epoll's (asyncio's default) is in milliseconds,
    rounded up: sends then came up to 1 ms late (0.6 ms at the median at 500/s, measured),
    which the latency from the intended send time counts. And the thread's timer slack is
    1 ns instead of Linux's 50 us while it runs (median lateness 0.12 -> 0.07 ms, measured).
    (Up to 256 connections: well below select's 1,024 descriptors.)"""
    slack = _timer_slack(1)
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        return loop.run_until_complete(open_loop(url, seconds, rate, timeout))
    finally:
        loop.close()
        if slack:
            _timer_slack(slack)


def _timer_slack(ns: int) -> int:
    """Set this thread's timer slack (PR_SET_TIMERSLACK); the previous value, 0 if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        old = libc.prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK
        libc.prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK
        return max(old, 0)
    except (OSError, AttributeError):  # not Linux: the default slack
        return 0
