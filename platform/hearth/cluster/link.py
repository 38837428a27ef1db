"""The agent-to-agent link: one persistent, authenticated TCP connection per peer carrying many
calls at once (multiplexed by request id, bounded in flight, each with its own deadline).

A call's payload streams from the caller's slot into a slot on the remote node (see
:mod:`hearth.cluster.wire`); the remote runs it as a local invocation and answers with the
result, or with the refusal it met (404 unknown function, 429 full, 413 too large, …), which
reaches the caller with the same status. A peer that goes away — connection lost, or no pong
for ``dead_after_s`` — fails every call in flight with 503 naming the node, at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hearth.cluster.wire import (
    ERR,
    HEADER,
    MAX_META,
    PING,
    PONG,
    REP,
    REQ,
    LinkError,
    Progress,
    Reader,
    Sink,
    frame,
    handshake_client,
    handshake_server,
    send_all,
    tune,
)
from hearth.invoke import InvokeError

log = logging.getLogger("hearth.cluster.link")


class NodeUnavailable(InvokeError):
    def __init__(self, node: str, detail: str):
        super().__init__(503, "node_unavailable", f"node {node!r}: {detail}")
        self.node = node


@dataclass
class Reply:
    """A remote invocation's answer: its meta (status, content type, headers, …) and body."""

    meta: dict[str, Any]
    body: Any  # the handle the sink returned (a bytearray by default), filled with the body


@dataclass
class LinkStats:
    calls: int = 0
    errors: int = 0
    sent_bytes: int = 0  # payload bytes this side sent (requests and replies)
    received_bytes: int = 0
    # request payloads this node sent to other nodes, and how many calls, per function
    sent_by_function: collections.Counter = field(default_factory=collections.Counter)
    calls_by_function: collections.Counter = field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "sent_by_function": dict(self.sent_by_function),
            "calls_by_function": dict(self.calls_by_function),
        }


def _bytearray_sink(n: int, meta: dict) -> tuple[memoryview, bytearray]:
    b = bytearray(n)
    return memoryview(b), b


@dataclass
class _Call:
    fut: asyncio.Future
    sink: Callable[[int], Any]
    function: str


class LinkClient:
    """Our connection to one peer (we dial, we send requests, it answers)."""

    def __init__(
        self,
        me: str,
        node: str,
        address: str,
        token: bytes,
        *,
        max_inflight: int = 256,
        ping_s: float = 1.0,
        dead_after_s: float = 3.0,
        stats: LinkStats | None = None,
    ):
        self.me, self.node, self.address, self.token = me, node, address, token
        self.sem = asyncio.Semaphore(max_inflight)
        self.ping_s, self.dead_after_s = ping_s, dead_after_s
        self.stats = stats or LinkStats()
        self.sock: socket.socket | None = None
        self.calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.progress = Progress()  # when bytes last left; self.reader.at: last arrived
        self.reader: Reader | None = None
        self.closed: str | None = None

    async def connect(self, timeout: float = 5.0) -> LinkClient:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            fam, _, _, _, addr = infos[0]
            sock = socket.socket(fam, socket.SOCK_STREAM)
            tune(sock)
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise NodeUnavailable(self.node, f"cannot connect to {self.address}: {e}") from None
        reader = Reader(sock)
        try:
            peer = await handshake_client(sock, reader, self.token, self.me, timeout)
        except (LinkError, TimeoutError, OSError) as e:
            sock.close()
            raise NodeUnavailable(
                self.node, f"link handshake with {self.address} failed: {e}"
            ) from None
        if peer != self.node:
            sock.close()
            raise NodeUnavailable(self.node, f"{self.address} is node {peer!r}, not {self.node!r}")
        self.sock = sock
        self.reader = reader
        self._tasks = [
            asyncio.create_task(self._read(reader), name=f"link-read-{self.node}"),
            asyncio.create_task(self._ping(), name=f"link-ping-{self.node}"),
        ]
        return self

    @property
    def alive(self) -> bool:
        return self.closed is None and self.sock is not None

    async def call(
        self,
        function: str,
        meta: dict[str, Any],
        payload: Any = b"",
        *,
        timeout: float,
        sink: Sink | None = None,
    ) -> Reply:
        """Invoke ``function`` on the peer. ``payload`` (bytes or a slot's memoryview) is sent as
        is; the reply body is written into ``sink(n)`` (default: a new bytearray)."""
        deadline = time.monotonic() + timeout
        if not self.alive:
            raise NodeUnavailable(self.node, f"link is down ({self.closed})")
        try:
            if self.sem.locked():  # full: wait for a place, within the call's deadline
                await asyncio.wait_for(self.sem.acquire(), max(0.001, deadline - time.monotonic()))
            else:
                await self.sem.acquire()
        except TimeoutError:
            raise InvokeError(
                429, "link_busy", f"link to node {self.node!r}: too many calls in flight"
            ) from None
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self.calls[rid] = _Call(fut, sink or _bytearray_sink, function)
        body = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload
        mb = msgpack.packb({**meta, "function": function, "timeout": timeout}, use_bin_type=True)
        timer = asyncio.get_running_loop().call_later(
            max(0.001, deadline - time.monotonic()), _expire, fut
        )
        try:
            async with self._send_lock:
                if not self.alive:
                    raise NodeUnavailable(self.node, f"link is down ({self.closed})")
                assert self.sock is not None
                await send_all(self.sock, [frame(REQ, rid, mb, body.nbytes), body], self.progress)
            self.stats.calls += 1
            self.stats.sent_bytes += body.nbytes
            self.stats.sent_by_function[function] += body.nbytes
            self.stats.calls_by_function[function] += 1
            return await fut
        except TimeoutError:
            self.stats.errors += 1
            quiet = time.monotonic() - self.reader.at
            if quiet > min(self.dead_after_s, self.ping_s * 1.5):
                raise NodeUnavailable(
                    self.node, f"did not answer for {quiet:.1f}s (call to {function!r} timed out)"
                ) from None
            raise InvokeError(
                504,
                "timeout",
                f"function {function!r} on node {self.node!r} did not answer within {timeout:g}s",
            ) from None
        except LinkError as e:
            self.stats.errors += 1
            self._fail(f"send failed: {e}")
            raise NodeUnavailable(self.node, f"link broke while sending ({e})") from None
        except InvokeError:
            self.stats.errors += 1
            raise
        finally:
            timer.cancel()
            self.sem.release()
            self.calls.pop(rid, None)  # a late reply (after a timeout) is then read and dropped

    async def _ping(self) -> None:
        """A PING whenever the link is otherwise idle; a peer that neither answers nor takes our
        bytes for ``dead_after_s`` is dead (a frozen node, or its network gone: no RST comes)."""
        while self.alive:
            await asyncio.sleep(self.ping_s)
            streaming = self._send_lock.locked()  # a payload going out: the peer taking it
            heard = max(self.reader.at, self.progress.at) if streaming else self.reader.at
            quiet = time.monotonic() - heard  # counts as a sign of life; queued pings do not
            if quiet > self.dead_after_s:
                self._fail(f"no answer for {quiet:.1f}s")
                return
            if streaming:
                continue
            try:
                async with self._send_lock:
                    if self.sock is not None and self.closed is None:
                        await send_all(self.sock, [frame(PING, 0, b"")], self.progress)
            except LinkError as e:
                self._fail(f"ping failed: {e}")
                return

    async def _read(self, reader: Reader) -> None:
        try:
            while True:
                kind, _flags, status, meta_len, rid, data_len = await reader.header()
                if meta_len > MAX_META:
                    raise LinkError(f"peer sent {meta_len} bytes of meta")
                meta = msgpack.unpackb(await reader.exact(meta_len)) if meta_len else {}
                if kind == PONG:
                    continue
                c = self.calls.pop(rid, None)
                if kind == REP:
                    await self._reply(reader, c, meta, data_len)
                elif kind == ERR:
                    await reader.skip(data_len)
                    if c is not None and not c.fut.done():
                        c.fut.set_exception(
                            InvokeError(
                                status or 502,
                                meta.get("error", "remote_error"),
                                meta.get("detail", ""),
                            )
                        )
                else:
                    await reader.skip(data_len)
        except (LinkError, ValueError, msgpack.UnpackException) as e:
            self._fail(str(e))
        except asyncio.CancelledError:
            self._fail("closed")
            raise
        finally:
            if self.sock is not None:
                self.sock.close()  # no reader is registered on it any more

    async def _reply(self, reader: Reader, c: _Call | None, meta: dict, n: int) -> None:
        if c is None:
            await reader.skip(n)
            return
        try:
            view, handle = c.sink(n, meta)
        except InvokeError as e:
            await reader.skip(n)
            if not c.fut.done():
                c.fut.set_exception(e)
            return
        try:
            if n:
                await reader.into(view[:n])
        except BaseException:
            _discard(handle)
            raise
        del view
        self.stats.received_bytes += n
        if not c.fut.done():
            c.fut.set_result(Reply(meta, handle))
        else:  # the caller gave up while the body streamed in
            _discard(handle)

    def _fail(self, why: str) -> None:
        if self.closed is not None:
            return
        self.closed = why
        log.warning("link to node %s closed: %s", self.node, why)
        for c in self.calls.values():
            if not c.fut.done():
                c.fut.set_exception(
                    NodeUnavailable(self.node, f"went away during the call ({why})")
                )
        self.calls.clear()
        self.progress.fail(why)  # senders blocked on a full socket buffer
        if self.sock is not None:
            try:  # wakes the reader (EOF); the reader task closes the socket when it exits
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    async def close(self) -> None:
        self._fail("closed by us")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()


SEND_GRACE_S = 30.0


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _discard(dst: Any) -> None:
    release = getattr(dst, "release_slot", None)
    if release is not None:
        release()


# What the serving side does with a request: (function, meta, payload slot handle, timeout) → reply.
Handler = Callable[[str, dict[str, Any], Any, float], Awaitable[tuple[dict[str, Any], Any]]]
# Where a request's payload goes on the serving side: n → (memoryview to fill, handle for Handler,
# release callback if the request is dropped before it reaches the handler).
Landing = Callable[[int], tuple[memoryview, Any, Callable[[], None]]]


class LinkServer:
    """Accepts peers' connections (token-authenticated) and serves their calls."""

    def __init__(
        self,
        me: str,
        token: bytes,
        handler: Handler,
        landing: Landing,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_inflight: int = 256,
        stats: LinkStats | None = None,
    ):
        self.me, self.token = me, token
        self.handler, self.landing = handler, landing
        self.host, self.port = host, port
        self.max_inflight = max_inflight
        self.stats = stats or LinkStats()
        self.sock: socket.socket | None = None
        self._accept: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self._work: set[asyncio.Task] = set()

    async def start(self) -> LinkServer:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        s.setblocking(False)
        self.sock = s
        self.port = s.getsockname()[1]
        self._accept = asyncio.create_task(self._accept_loop(), name="link-accept")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:
                log.warning("link accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            tune(conn)
            t = asyncio.create_task(self._serve(conn))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        reader = Reader(conn)
        lock = asyncio.Lock()
        inflight = [0]
        peer = "?"
        try:
            peer = await handshake_server(conn, reader, self.token, self.me)
            while True:
                kind, _f, _s, meta_len, rid, data_len = await reader.header()
                if meta_len > MAX_META:
                    raise LinkError(f"peer {peer} sent {meta_len} bytes of meta")
                meta = msgpack.unpackb(await reader.exact(meta_len)) if meta_len else {}
                if kind == PING:
                    if not lock.locked():  # a reply streaming back is an answer already
                        async with lock:
                            await send_all(conn, [frame(PONG, rid, b"")])
                    continue
                if kind != REQ:
                    await reader.skip(data_len)
                    continue
                refusal = None
                if inflight[0] >= self.max_inflight:
                    refusal = (429, "link_busy", f"node {self.me!r}: too many forwarded calls")
                    handle = None
                else:
                    try:
                        view, handle, drop = self.landing(data_len)
                    except InvokeError as e:
                        refusal, handle = (e.status, e.error, e.detail), None
                if refusal is not None:
                    await reader.skip(data_len)
                    await self._send(conn, lock, ERR, rid, refusal)
                    continue
                try:
                    if data_len:
                        await reader.into(view[:data_len])
                except BaseException:
                    drop()
                    raise
                del view
                self.stats.received_bytes += data_len
                self.stats.calls += 1
                inflight[0] += 1
                t = asyncio.create_task(self._run(conn, lock, rid, meta, handle, inflight))
                self._work.add(t)
                t.add_done_callback(self._work.discard)
        except (LinkError, TimeoutError, ValueError, msgpack.UnpackException) as e:
            (log.info if isinstance(e, LinkError) else log.warning)(
                "link from %s closed: %s", peer, e
            )
        finally:
            conn.close()

    async def _run(self, conn, lock, rid: int, meta: dict, handle: Any, inflight: list) -> None:
        try:
            fn = str(meta.get("function", ""))
            timeout = float(meta.get("timeout") or 30.0)
            try:
                rmeta, body = await self.handler(fn, meta, handle, timeout)
            except InvokeError as e:
                self.stats.errors += 1
                await self._send(conn, lock, ERR, rid, (e.status, e.error, e.detail))
                return
            except Exception as e:  # never a silent hang for the caller
                log.exception("forwarded call to %s failed", fn)
                self.stats.errors += 1
                await self._send(
                    conn, lock, ERR, rid, (500, "remote_error", f"{type(e).__name__}: {e}")
                )
                return
            mb = msgpack.packb(rmeta, use_bin_type=True)
            view = memoryview(body).cast("B") if body is not None else memoryview(b"")
            try:
                async with lock:  # a caller that stops reading cannot hold us forever
                    await asyncio.wait_for(
                        send_all(conn, [frame(REP, rid, mb, view.nbytes), view]),
                        timeout + SEND_GRACE_S,
                    )
                self.stats.sent_bytes += view.nbytes
            finally:
                _discard(body)
        except (LinkError, TimeoutError) as e:
            log.info("reply on a closed link dropped: %s", e)
            _shutdown(conn)
        finally:
            inflight[0] -= 1

    async def _send(self, conn, lock, kind: int, rid: int, err: tuple[int, str, str]) -> None:
        status, error, detail = err
        mb = msgpack.packb({"error": error, "detail": detail}, use_bin_type=True)
        try:
            async with lock:
                await asyncio.wait_for(
                    send_all(conn, [HEADER.pack(kind, 0, status, len(mb), rid, 0), mb]),
                    SEND_GRACE_S,
                )
        except (LinkError, TimeoutError) as e:
            log.info("error reply on a closed link dropped: %s", e)
            _shutdown(conn)

    async def close(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
        for t in [*self._conns, *self._work]:
            t.cancel()
        await asyncio.gather(
            *(t for t in [self._accept, *self._conns, *self._work] if t), return_exceptions=True
        )
        if self.sock is not None:
            self.sock.close()


class LinkCollector:
    """The link's counters on /metrics: bytes this node moved to and from other nodes, and the
    request payload bytes and calls it sent per function (what crossed the network, and why)."""

    def __init__(self, stats: LinkStats):
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        s = self.stats
        b = CounterMetricFamily(
            "hearth_cluster_link_bytes",
            "Payload bytes over agent-to-agent links",
            labels=["direction"],
        )
        b.add_metric(["sent"], float(s.sent_bytes))
        b.add_metric(["received"], float(s.received_bytes))
        yield b
        f = CounterMetricFamily(
            "hearth_cluster_forwarded_bytes",
            "Request payload bytes this node forwarded to other nodes, per function",
            labels=["function"],
        )
        c = CounterMetricFamily(
            "hearth_cluster_forwarded_calls",
            "Invocations this node forwarded to other nodes, per function",
            labels=["function"],
        )
        for fn, n in s.sent_by_function.items():
            f.add_metric([fn], float(n))
            c.add_metric([fn], float(s.calls_by_function.get(fn, 0)))
        yield f
        yield c
