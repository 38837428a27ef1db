"""A minimal keep-alive HTTP/1.1 client on asyncio protocols, for the replay driver's hot path.

Why: aiohttp's client costs ~150-300 us of CPU per request (request/response objects, payload
wrappers, timers), which caps a single sender process well below the replay rates we need.
This client writes prebuilt request bytes on pooled keep-alive connections and parses just the
status line and headers (Content-Length or chunked bodies). Plain ``http://`` only; the driver
falls back to aiohttp for anything else.
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit


class HTTPError(ConnectionError):
    pass


class _Conn(asyncio.Protocol):
    __slots__ = ("transport", "buf", "waiter", "closed", "used")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.used = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._parse()

    def connection_lost(self, exc) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            if self.buf and b"\r\n\r\n" in self.buf:
                self._parse(eof=True)
            if not w.done():
                w.set_exception(HTTPError(f"connection closed by peer{f': {exc}' if exc else ''}"))

    def _parse(self, eof: bool = False) -> None:
        buf = self.buf
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return
        head = bytes(buf[:i]).decode("latin-1").split("\r\n")
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self.waiter.set_exception(HTTPError(f"bad status line {head[0][:80]!r}"))
            return
        headers: dict[str, str] = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        start = i + 4
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(buf) < start + n:
                return
            body = bytes(buf[start : start + n])
            del buf[: start + n]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            pos, parts = start, []
            while True:
                j = buf.find(b"\r\n", pos)
                if j < 0:
                    return
                size = int(bytes(buf[pos:j]).split(b";")[0], 16)
                if size == 0:
                    end = buf.find(b"\r\n\r\n", j)
                    if end < 0:
                        if len(buf) >= j + 4 and buf[j : j + 4] == b"\r\n\r\n":
                            end = j
                        else:
                            return
                    body = b"".join(parts)
                    del buf[: end + 4]
                    break
                if len(buf) < j + 2 + size + 2:
                    return
                parts.append(bytes(buf[j + 2 : j + 2 + size]))
                pos = j + 2 + size + 2
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
            del buf[:start]
        else:  # body until close
            if not eof:
                return
            body = bytes(buf[start:])
            del buf[:]
            headers["connection"] = "close"
        self.waiter.set_result((status, headers, body))


class RawClient:
    """Pooled keep-alive connections to one ``http://host:port``."""

    def __init__(self, base_url: str, extra_headers: dict[str, str] | None = None):
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"raw client needs an http:// URL, got {base_url!r}")
        self.host = u.hostname
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")
        hostport = f"{self.host}:{self.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (extra_headers or {}).items())
        self._head_tail = (f" HTTP/1.1\r\nHost: {hostport}\r\n{extra}Content-Length: ").encode(
            "latin-1"
        )
        self.idle: list[_Conn] = []
        self.opened = 0

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Conn, self.host, self.port)
        self.opened += 1
        return proto

    def request_bytes(self, path: str, body: bytes) -> bytes:
        return (
            b"POST "
            + path.encode("latin-1")
            + self._head_tail
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    async def post(
        self, path: str, body: bytes, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        """POST ``body``; returns (status, lower-cased headers, body). ``timeout`` covers connect
        and response. Retries once when a reused keep-alive connection turns out to be closed."""
        async with asyncio.timeout(timeout):
            return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        data = self.request_bytes(path, body)
        for attempt in (0, 1):
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                return await self._response(conn, self._send(conn, data))
            except HTTPError:
                if reused and attempt == 0 and not conn.buf:
                    continue
                raise
        raise HTTPError("unreachable")

    def send_now(self, path: str, body: bytes):
        """Write the request right now on an idle keep-alive connection (no await, so the send
        time is exact); returns a handle for :meth:`finish`, or None when no connection is idle."""
        conn = self._take_idle()
        if conn is None:
            return None
        return conn, self._send(conn, self.request_bytes(path, body))

    async def finish(self, handle, path: str, body: bytes, timeout: float):
        """Wait for the response of a :meth:`send_now` request (retrying on a fresh connection
        if the idle one had been closed by the server before it answered)."""
        conn, fut = handle
        try:
            async with asyncio.timeout(timeout):
                return await self._response(conn, fut)
        except HTTPError:
            if not conn.buf:
                return await self.post(path, body, timeout)
            raise

    def _take_idle(self) -> _Conn | None:
        """The most recently used idle connection still open (closed ones are dropped)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    @staticmethod
    def _send(conn: _Conn, data: bytes) -> asyncio.Future:
        """Write one request on `conn`; the future resolves to its parsed response."""
        fut = asyncio.get_running_loop().create_future()
        conn.waiter = fut
        conn.transport.write(data)
        return fut

    async def _response(
        self, conn: _Conn, fut: asyncio.Future
    ) -> tuple[int, dict[str, str], bytes]:
        """Await the response on `conn`. A failed or cancelled exchange leaves the stream in an
        unknown state, so the connection is closed; otherwise it goes back to the idle pool
        unless the server is closing it."""
        try:
            status, headers, rbody = await fut
        except BaseException:
            conn.transport.close()
            raise
        conn.waiter = None
        if headers.get("connection", "").lower() == "close" or conn.closed:
            conn.transport.close()
        else:
            self.idle.append(conn)
        return status, headers, rbody

    def close(self) -> None:
        for c in self.idle:
            if c.transport is not None:
                c.transport.close()
        self.idle.clear()
