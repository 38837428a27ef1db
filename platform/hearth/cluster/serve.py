"""The serving side of the agent-to-agent link (the calls come from :mod:`hearth.cluster.link`;
frames, handshake and slot-to-socket I/O are :mod:`hearth.cluster.wire`'s): each request runs
here as a local invocation, its result or refusal goes back.

Bounded: calls in flight per connection, refusals and pongs waiting to go out per connection
(reading stops at the bound: a peer that keeps sending and never reads meets back-pressure,
not a growing pile of tasks), meta size, and how long a reply may wait for a peer that stopped
reading."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgpack

from hearth.cluster import wire
from hearth.cluster.eager import start_eager
from hearth.cluster.frameloop import FrameLoop
from hearth.cluster.link import LinkStats, release_handle
from hearth.invoke import InvokeError

log = logging.getLogger("hearth.cluster.link")

SEND_GRACE_S = 30.0
#: refusals and pongs that may wait to go out on one connection; at this many, its reading pauses
MAX_PENDING_ANSWERS = 4
#: request metas remembered decoded, per connection (cleared when full), and the largest one
META_MEMO = 64
META_MEMO_BYTES = 2048


class MetaMemo:
    """A request's meta (function, content type, timeouts, the client's headers) decoded once per
    distinct bytes: a caller sends the same meta call after call, and decoding it (a dict and a
    string per header) was the largest single step between a frame's read and its landing.
    Each call gets its own copy (top level and headers), so no call sees another's changes.
    Bounded: at most META_MEMO entries of at most META_MEMO_BYTES each; larger metas are decoded
    every time."""

    __slots__ = ("known",)

    def __init__(self) -> None:
        self.known: dict[bytes, dict[str, Any]] = {}

    def __call__(self, raw: memoryview) -> dict[str, Any]:
        if not raw.nbytes:
            return {}
        if raw.nbytes > META_MEMO_BYTES:
            return msgpack.unpackb(raw)
        key = bytes(raw)
        m = self.known.get(key)
        if m is None:
            m = msgpack.unpackb(key)
            if not isinstance(m, dict):
                return m  # not a meta: the caller's checks refuse it
            if len(self.known) >= META_MEMO:
                self.known.clear()
            self.known[key] = m
        out = dict(m)
        h = out.get("headers")
        if isinstance(h, dict):
            out["headers"] = dict(h)
        return out


def _remote_error(e: Exception) -> InvokeError:
    """A handler's bug as the 500 the caller gets (never a silent hang)."""
    return InvokeError(500, "remote_error", f"{type(e).__name__}: {e}")


def call_fields(meta: Any) -> tuple[str, float]:
    """A request meta's function and timeout, checked: ValueError names what is wrong (a
    malformed frame is that call's 400, not the connection's end)."""
    if not isinstance(meta, dict):
        raise ValueError(f"request meta is a {type(meta).__name__}, not a map")
    fn = meta.get("function", "")
    if not isinstance(fn, str):
        raise ValueError("request meta's function is not a string")
    try:
        timeout = float(meta.get("timeout") or 30.0)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("request meta's timeout is not a number") from None
    if not 0 < timeout < float("inf"):
        raise ValueError(f"request meta's timeout {timeout} is not a positive number")
    return fn, timeout


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# What the serving side does with a request: (function, meta, payload slot handle, timeout,
# reply_now) → (reply meta, body). ``reply_now(meta, body)`` may send the reply before the handler
# returns (from a callback, the moment the body exists); what the handler returns is then dropped.
Handler = Callable[
    [str, dict[str, Any], Any, float, "ReplyNow"], Awaitable[tuple[dict[str, Any], Any]]
]
# A handler's outcome: (reply meta, body), or the InvokeError to answer
Outcome = tuple[dict[str, Any], Any] | InvokeError
# The handler without a task: (function, meta, payload, timeout, reply_now, done) → True when the
# call is under way and ``done(outcome)`` will run once, later, from a callback; False, nothing
# done (the payload still the caller's), when it would wait: the Handler's task serves it then.
Starter = Callable[[str, dict[str, Any], Any, float, "ReplyNow", Callable[[Outcome], None]], bool]
# Where a request's payload goes on the serving side: n → (memoryview to fill, handle for Handler,
# release callback if the request is dropped before it reaches the handler).
Landing = Callable[[int], wire.Dest]


class ReplyNow:
    """Sends one call's reply the moment its body exists (called from the agent's reader
    callback with the instance's reply slot): the frame leaves in one ``sendmsg`` straight from
    the slot, before the agent's bookkeeping and without waiting for the call's task to resume.
    It does nothing when another frame is going out or the reply is large or its meta too big:
    the call's task then sends what its handler returns, as before."""

    __slots__ = ("server", "c", "rid", "timeout", "sent")

    def __init__(self, server: LinkServer, c: _Conn, rid: int, timeout: float):
        self.server, self.c, self.rid, self.timeout, self.sent = server, c, rid, timeout, False

    def __call__(self, meta: dict[str, Any], body: memoryview) -> None:
        if self.sent:
            return
        mb = msgpack.packb(meta, use_bin_type=True)
        if len(mb) > wire.MAX_META:
            return  # the task answers reply_meta_too_large
        conn, lock = self.c.conn, self.c.lock
        try:
            rest = wire.send_now(
                conn, lock, [wire.frame(wire.REP, self.rid, mb, body.nbytes), body], keep=True
            )
        except wire.LinkError as e:
            log.info("reply on a closed link dropped: %s", e)
            _shutdown(conn)
            self.sent = True
            return
        if rest is None:
            return
        self.sent = True
        self.server.stats.sent_bytes += body.nbytes
        self.server.stats.early_replies += 1
        if not rest and self.server.inflight <= 1:
            # the caller's node was woken by this send; on a busy machine it would wait for
            # this CPU while the agent does its bookkeeping: let it run first (a no-op when
            # nothing else is runnable here). Measured: its wake-up 92 -> 24 µs at load 6.
            # Only when this is the one call being served: with others in flight, their
            # frames must not wait behind whatever else this CPU runs.
            os.sched_yield()
        if rest:  # the socket took part of it: the rest (copied) in a task, the lock held
            self.server._spawn(self._finish(rest))

    async def _finish(self, rest: list[memoryview]) -> None:
        try:
            await wire.send_rest(
                self.c.conn, self.c.lock, rest, timeout=self.timeout + SEND_GRACE_S
            )
        except (wire.LinkError, TimeoutError) as e:
            log.info("reply on a closed link dropped: %s", e)
            _shutdown(self.c.conn)


@dataclass
class _Conn:
    """One peer's connection: replies go out one at a time (the lock); ``pending`` refusals and
    pongs not sent yet (bounded: ``frames`` pauses at MAX_PENDING_ANSWERS)."""

    conn: socket.socket
    lock: wire.WriteLock
    peer: str = "?"
    inflight: int = 0
    pending: int = 0
    frames: FrameLoop | None = None
    meta: MetaMemo = field(default_factory=MetaMemo)


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
        starter: Starter | None = None,
    ):
        self.me, self.token = me, token
        self.handler, self.landing, self.starter = handler, landing, starter
        self.host, self.port = host, port
        self.max_inflight = max_inflight
        self.stats = stats or LinkStats()
        self.sock: socket.socket | None = None
        self._accept: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self._work: set[asyncio.Task] = set()
        self.inflight = 0  # forwarded calls being served, over every connection

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
            wire.tune(conn)
            t = asyncio.create_task(self._serve(conn))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        reader = wire.Reader(conn)
        c = _Conn(conn, wire.WriteLock())
        try:
            c.peer = await wire.handshake_server(conn, reader, self.token, self.me)
            c.frames = FrameLoop(reader, partial(self._frame, c), lambda: self._stream(c, reader))
            await c.frames.run()
        except (wire.LinkError, TimeoutError, ValueError, msgpack.UnpackException) as e:
            (log.info if isinstance(e, wire.LinkError) else log.warning)(
                "link from %s closed: %s", c.peer, e
            )
        finally:
            conn.close()

    def _frame(
        self, c: _Conn, kind: int, _status: int, rid: int, meta: memoryview, data: memoryview
    ) -> None:
        """A whole request (or ping), in the reader callback: its data is copied into a slot
        (at most one read buffer's worth) and its handler task started at once."""
        if kind == wire.PING:
            # a reply streaming back, or any answer still to go out, tells it we live already
            if not (c.lock.locked() or c.pending):
                self._answer(c, self._pong(c, rid))
            return
        if kind != wire.REQ:
            return
        m = self._meta(c, rid, meta)
        dest = None if m is None else self._land(c, rid, data.nbytes)
        if dest is not None:
            self._start(c, rid, m, wire.copy_in(dest, data), data.nbytes)

    async def _stream(self, c: _Conn, reader: wire.Reader) -> None:
        """One frame larger than the read buffer: its data goes straight into a slot."""
        kind, _f, _s, meta_len, rid, n = await reader.header()
        raw = await reader.exact(meta_len)
        meta = self._meta(c, rid, raw) if kind == wire.REQ else None
        dest = self._land(c, rid, n) if meta is not None else None
        if dest is None:
            await reader.skip(n)
            return
        self._start(c, rid, meta, await wire.read_in(reader, dest, n), n)

    def _meta(self, c: _Conn, rid: int, raw: memoryview) -> dict | None:
        """A request's meta, or None after answering 400 for that call alone. A frame's meta
        has its own length in the header, so one that cannot be decoded (or names no function
        and timeout) leaves the framing intact: the peer's other calls go on. Only a frame
        whose header is impossible (meta past `MAX_META`) ends the connection (`wire.Reader`):
        then nothing after it can be read as a frame."""
        try:
            meta = c.meta(raw)
            call_fields(meta)
        except Exception as e:  # the peer's bytes: any decoding error is its request's 400
            self.stats.errors += 1
            detail = f"malformed request frame: {type(e).__name__}: {e}"
            self._answer(c, self._send(c.conn, c.lock, wire.ERR, rid, (400, "bad_request", detail)))
            return None
        return meta

    def _land(self, c: _Conn, rid: int, n: int) -> wire.Dest | None:
        """A slot for a request's n bytes, or None after answering the refusal."""
        if c.inflight >= self.max_inflight:
            err = (429, "link_busy", f"node {self.me!r}: too many forwarded calls")
        else:
            try:
                return self.landing(n)
            except InvokeError as e:
                err = (e.status, e.error, e.detail)
        self._answer(c, self._send(c.conn, c.lock, wire.ERR, rid, err))
        return None

    def _answer(self, c: _Conn, coro) -> None:
        """Send a refusal or pong in a task; at MAX_PENDING_ANSWERS unsent, stop reading the
        connection until they are out (or the send grace ends and the link is shut)."""
        c.pending += 1
        t = self._spawn(coro)
        t.add_done_callback(lambda _t: self._answered(c))
        if c.pending >= MAX_PENDING_ANSWERS and c.frames is not None:
            c.frames.pause()

    @staticmethod
    def _answered(c: _Conn) -> None:
        c.pending -= 1
        if c.pending < MAX_PENDING_ANSWERS and c.frames is not None:
            c.frames.resume()

    def _start(self, c: _Conn, rid: int, meta: dict, handle: Any, n: int) -> None:
        fn, timeout = call_fields(meta)  # checked by `_meta`
        self.stats.received_bytes += n
        self.stats.calls += 1
        c.inflight += 1
        self.inflight += 1
        reply = ReplyNow(self, c, rid, timeout)
        if self.starter is not None:
            try:  # a warm call with nothing to wait for: no task at all (#14)
                if self.starter(
                    fn, meta, handle, timeout, reply, partial(self._ended, c, rid, reply, fn)
                ):
                    self.stats.served_now += 1
                    return
            except Exception as e:  # a bug: answered as the task's handler would answer it
                log.exception("forwarded call to %s failed", fn)
                self.stats.errors += 1
                self._spawn(self._reply(c, rid, fn, reply, _remote_error(e)))
                return
        # the call's first step (the payload handed to a local instance) runs here and now
        self._keep(
            start_eager(asyncio.get_running_loop(), self._run(c, rid, fn, reply, meta, handle))
        )

    def _ended(self, c: _Conn, rid: int, reply: ReplyNow, fn: str, outcome: Outcome) -> None:
        """A call started without a task has its outcome: when its reply already left (the
        early reply, the usual case) only the books are closed here; else it is sent in a task."""
        if reply.sent:
            if not isinstance(outcome, InvokeError):
                release_handle(outcome[1])
            self._close_call(c)
            return
        if isinstance(outcome, InvokeError):
            self.stats.errors += 1
        self._spawn(self._reply(c, rid, fn, reply, outcome))

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._keep(t)
        return t

    def _keep(self, t: asyncio.Task | None) -> None:
        if t is not None:
            self._work.add(t)
            t.add_done_callback(self._work.discard)

    async def _pong(self, c: _Conn, rid: int) -> None:
        try:
            await wire.send_frame(
                c.conn, c.lock, [wire.frame(wire.PONG, rid, b"")], timeout=SEND_GRACE_S
            )
        except (wire.LinkError, TimeoutError):
            _shutdown(c.conn)

    async def _run(
        self, c: _Conn, rid: int, fn: str, reply: ReplyNow, meta: dict, handle: Any
    ) -> None:
        try:
            outcome: Outcome = await self.handler(fn, meta, handle, reply.timeout, reply)
        except InvokeError as e:
            outcome = e
            if not reply.sent:  # else answered already; what failed after is the agent's
                self.stats.errors += 1
        except Exception as e:  # never a silent hang for the caller
            log.exception("forwarded call to %s failed", fn)
            self.stats.errors += 1
            outcome = _remote_error(e)
        except BaseException:  # cancelled (the server closes): the call is over all the same
            self._close_call(c)
            raise
        await self._reply(c, rid, fn, reply, outcome)

    async def _reply(self, c: _Conn, rid: int, fn: str, reply: ReplyNow, outcome: Outcome) -> None:
        """Send a call's outcome unless its early reply left already; then the call is over."""
        conn, lock = c.conn, c.lock
        try:
            if isinstance(outcome, InvokeError):
                if not reply.sent:
                    await self._send(
                        conn, lock, wire.ERR, rid, (outcome.status, outcome.error, outcome.detail)
                    )
                return
            rmeta, body = outcome
            if reply.sent:
                release_handle(body)
                return
            mb = msgpack.packb(rmeta, use_bin_type=True)
            if len(mb) > wire.MAX_META:  # the caller could not read it: an error, not a broken link
                release_handle(body)
                self.stats.errors += 1
                detail = f"{fn!r}: reply headers are {len(mb)} bytes; the limit is {wire.MAX_META}"
                await self._send(conn, lock, wire.ERR, rid, (502, "reply_meta_too_large", detail))
                return
            view = memoryview(body).cast("B") if body is not None else memoryview(b"")
            try:
                # a caller that stops reading cannot hold us forever
                await wire.send_frame(
                    conn,
                    lock,
                    [wire.frame(wire.REP, rid, mb, view.nbytes), view],
                    timeout=reply.timeout + SEND_GRACE_S,
                )
                self.stats.sent_bytes += view.nbytes
            finally:
                release_handle(body)
        except (wire.LinkError, TimeoutError) as e:
            log.info("reply on a closed link dropped: %s", e)
            _shutdown(conn)
        finally:
            self._close_call(c)

    def _close_call(self, c: _Conn) -> None:
        c.inflight -= 1
        self.inflight -= 1

    async def _send(self, conn, lock, kind: int, rid: int, err: tuple[int, str, str]) -> None:
        status, error, detail = err
        mb = msgpack.packb({"error": error, "detail": detail}, use_bin_type=True)
        try:
            await wire.send_frame(
                conn,
                lock,
                [wire.HEADER.pack(kind, 0, status, len(mb), rid, 0), mb],
                timeout=SEND_GRACE_S,
            )
        except (wire.LinkError, TimeoutError) as e:
            log.info("error reply on a closed link dropped: %s", e)
            _shutdown(conn)

    async def close(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
        for t in self._conns:
            t.cancel()
        await asyncio.gather(
            *(t for t in [self._accept, *self._conns] if t), return_exceptions=True
        )
        # no frame is read any more; calls started last get their first step, which hands the
        # payload slot to the handler (a task cancelled before that would leak the slot)
        await asyncio.sleep(0)
        for t in self._work:
            t.cancel()
        await asyncio.gather(*self._work, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
