"""The calling side of the agent-to-agent link: one persistent connection per peer carrying
many calls at once (multiplexed by request id, bounded in flight, each with its own deadline).

A refusal the peer answers (:mod:`hearth.cluster.serve`) reaches the caller with its own
status. A peer that goes away — connection lost, or no pong for ``dead_after_s`` — fails every
call in flight with 503 naming the node, at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hearth.agent.deadlines import Deadlines
from hearth.cluster import wire
from hearth.cluster.frameloop import FrameLoop
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
    body: Any  # the handle the sink returned, filled with the body (default: bytes, or a
    # bytearray for a body larger than the read buffer)


@dataclass
class LinkStats:
    calls: int = 0
    errors: int = 0
    sent_bytes: int = 0  # payload bytes this side sent (requests and replies)
    early_replies: int = 0  # replies sent from the reader callback (serve.ReplyNow)
    started: int = 0  # calls sent without a task (LinkClient.start), answered in a callback
    served_now: int = 0  # peers' calls served without a task (LinkServer's starter)
    received_bytes: int = 0
    # request payloads this node sent to other nodes, and how many calls, per function
    sent_by_function: collections.Counter = field(default_factory=collections.Counter)
    calls_by_function: collections.Counter = field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "sent_bytes": self.sent_bytes,
            "early_replies": self.early_replies,
            "started": self.started,
            "served_now": self.served_now,
            "received_bytes": self.received_bytes,
            "sent_by_function": dict(self.sent_by_function),
            "calls_by_function": dict(self.calls_by_function),
        }


def _bytearray_sink(n: int, meta: dict) -> tuple[memoryview, bytearray]:
    b = bytearray(n)
    return memoryview(b), b


class _Call:
    """A call awaiting its reply (``LinkClient.call``): settled through its future, which only
    wakes the caller; the answer (the Reply, or the error to raise) is ``value``. Why: the
    future stays on the link's deadline heap until the call's deadline (its timeout, often 30 s
    or more) or a compaction, and an answer kept in it kept the reply and its body, or, through
    an error's traceback, the caller's frames (its payload, its sink and books) that long."""

    __slots__ = ("fut", "sink", "function", "value")

    def __init__(self, fut: asyncio.Future, sink: wire.Sink | None, function: str) -> None:
        self.fut, self.function = fut, function
        self.sink = sink  # None: the body as bytes
        self.value: Reply | BaseException | None = None

    def done(self) -> bool:
        return self.fut.done()

    def set_result(self, reply: Reply) -> None:
        self.value = reply
        self.fut.set_result(None)

    def set_exception(self, e: BaseException) -> None:
        self.value = e
        self.fut.set_result(None)


#: what a call started with ``LinkClient.start`` is answered with, in the callback that settles it
Done = Callable[["Reply | InvokeError"], None]


class _Callback(_Call):
    """A call started without a task (``LinkClient.start``): whatever settles it (its reply
    frame in the reader callback, the deadline timer, the link failing) calls ``done`` at once,
    so the answer is built and sent in that same callback rather than one loop pass later in a
    resumed task. On the deadline heap it stands in for a future (``done``/``set_exception``)."""

    __slots__ = ("link", "rid", "timeout", "cb", "over")

    def __init__(self, link: LinkClient, rid: int, function: str, timeout: float, cb: Done) -> None:
        self.link, self.rid, self.function, self.timeout, self.cb = link, rid, function, timeout, cb
        self.sink, self.over = None, False

    def done(self) -> bool:
        return self.over

    def set_result(self, reply: Reply) -> None:
        self._end(reply)

    def set_exception(self, e: BaseException) -> None:
        self._end(e)

    def _end(self, value: Reply | BaseException) -> None:
        if self.over:
            return
        self.over = True
        # the link's deadline heap keeps this until the call's deadline (its timeout) or a
        # compaction: from here it holds nothing of the caller's (`cb`, and through it the
        # caller's books and whatever the answer is kept in)
        cb, self.cb = self.cb, None  # type: ignore[assignment]
        link = self.link
        link.sem.release()
        link.calls.pop(self.rid, None)  # a late reply (after a timeout) is then read and dropped
        if isinstance(value, BaseException):
            link.stats.errors += 1
            if isinstance(value, TimeoutError):
                value = link._timed_out(self.function, self.timeout)
            elif not isinstance(value, InvokeError):
                value = InvokeError(502, "link_error", f"{type(value).__name__}: {value}")
        try:
            cb(value)
        except Exception:  # the caller's bug must not break the link (we may be its reader)
            log.exception("answering a call to %r failed", self.function)


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
        self.calls: dict[int, _Call] = {}  # in flight, by request id
        self._ids = itertools.count(1)
        self._send_lock = wire.WriteLock()
        self._tasks: list[asyncio.Task] = []
        self.progress = wire.Progress()  # when bytes last left; self.reader.at: last arrived
        self.reader: wire.Reader | None = None
        self.closed: str | None = None
        # every call's deadline on one loop timer (no timer handle per call); set by connect()
        self._deadlines: Deadlines | None = None

    async def connect(self, timeout: float = 5.0) -> LinkClient:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            fam, _, _, _, addr = infos[0]
            sock = socket.socket(fam, socket.SOCK_STREAM)
            wire.tune(sock)
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise NodeUnavailable(self.node, f"cannot connect to {self.address}: {e}") from None
        reader = wire.Reader(sock)
        try:
            peer = await wire.handshake_client(sock, reader, self.token, self.me, timeout)
        except (wire.LinkError, TimeoutError, OSError) as e:
            sock.close()
            raise NodeUnavailable(
                self.node, f"link handshake with {self.address} failed: {e}"
            ) from None
        if peer != self.node:
            sock.close()
            raise NodeUnavailable(self.node, f"{self.address} is node {peer!r}, not {self.node!r}")
        self.sock = sock
        self.reader = reader
        self._deadlines = Deadlines(loop)
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
        sink: wire.Sink | None = None,
        sent: Callable[[], None] | None = None,
    ) -> Reply:
        """Invoke ``function`` on the peer. ``payload`` (bytes or a slot's memoryview) is sent as
        is; the reply body is written into ``sink(n)`` (default: bytes). ``sent()`` is called
        once the payload is on the wire (its slot may go back while the reply is awaited)."""
        deadline = time.monotonic() + timeout
        if not self.alive:
            raise NodeUnavailable(self.node, f"link is down ({self.closed})")
        mb = msgpack.packb({**meta, "function": function, "timeout": timeout}, use_bin_type=True)
        if len(mb) > wire.MAX_META:  # the peer could not read it: refused here, the link carries on
            raise InvokeError(
                413,
                "meta_too_large",
                f"call to {function!r}: headers and metadata are {len(mb)} bytes; "
                f"the limit is {wire.MAX_META} bytes",
            )
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
        assert self._deadlines is not None
        fut = self._deadlines.loop.create_future()
        c = self.calls[rid] = _Call(fut, sink, function)
        body = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload
        n = body.nbytes
        self._deadlines.add(
            self._deadlines.loop.time() + max(0.001, deadline - time.monotonic()), fut
        )
        try:
            if not self.alive:
                raise NodeUnavailable(self.node, f"link is down ({self.closed})")
            assert self.sock is not None
            await wire.send_frame(
                self.sock,
                self._send_lock,
                [wire.frame(wire.REQ, rid, mb, body.nbytes), body],
                self.progress,
            )
            del body
            if sent is not None:
                sent()
            self.stats.calls += 1
            self.stats.sent_bytes += n
            self.stats.sent_by_function[function] += n
            self.stats.calls_by_function[function] += 1
            await fut  # None: the answer is the call's (the heap keeps `fut` for a while)
            got = c.value
            if got.__class__ is Reply:  # (no call: `isinstance` was one more per call)
                return got  # type: ignore[return-value]
            raise got  # type: ignore[misc]  # the error it was failed with
        except TimeoutError:
            self.stats.errors += 1
            raise self._timed_out(function, timeout) from None
        except wire.LinkError as e:
            self.stats.errors += 1
            self._fail(f"send failed: {e}")
            raise NodeUnavailable(self.node, f"link broke while sending ({e})") from None
        except InvokeError:
            self.stats.errors += 1
            raise
        finally:
            self.sem.release()
            self.calls.pop(rid, None)  # a late reply (after a timeout) is then read and dropped

    def _timed_out(self, function: str, timeout: float) -> InvokeError:
        """A call's deadline passed: 504, or 503 naming the node when it has been silent."""
        quiet = time.monotonic() - self.reader.at if self.reader is not None else 0.0
        if quiet > min(self.dead_after_s, self.ping_s * 1.5):
            return NodeUnavailable(
                self.node, f"did not answer for {quiet:.1f}s (call to {function!r} timed out)"
            )
        return InvokeError(
            504,
            "timeout",
            f"function {function!r} on node {self.node!r} did not answer within {timeout:g}s",
        )

    def start(
        self,
        function: str,
        meta: dict[str, Any],
        payload: bytes | memoryview,
        *,
        timeout: float,
        done: Done,
        sent: Callable[[], None] | None = None,
    ) -> bool:
        """``call`` without a task, for a small payload: the request leaves now and ``done``
        gets the Reply (body as bytes) or the InvokeError (refusal 4xx/5xx, 504, 503 naming the
        node) from whatever settles it, never twice. False, having sent nothing, when it would
        have to wait (link down, calls in flight at the bound, another frame going out, a large
        payload or meta): the caller then uses ``call``, which waits or raises."""
        if not self.alive or self.sem.locked() or not self._send_lock.idle():
            return False
        body = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload
        n = body.nbytes
        if n >= wire.BULK:
            return False
        mb = msgpack.packb({**meta, "function": function, "timeout": timeout}, use_bin_type=True)
        if len(mb) > wire.MAX_META:
            return False
        take = self.sem.acquire()  # not locked: it takes a place without waiting
        try:
            take.send(None)
        except StopIteration:
            pass
        else:  # cannot happen (locked() said it would not wait); never leave it half-taken
            take.close()
            return False
        rid = next(self._ids)
        c = _Callback(self, rid, function, timeout, done)
        self.calls[rid] = c
        assert self.sock is not None and self._deadlines is not None
        try:
            rest = wire.send_now(
                self.sock,
                self._send_lock,
                [wire.frame(wire.REQ, rid, mb, n), body],
                self.progress,
                keep=True,  # a part the socket did not take is copied: the payload goes back now
            )
        except wire.LinkError as e:  # nothing went: the link is down, the caller's call says so
            c.over = True
            self.calls.pop(rid, None)
            self.sem.release()
            self._fail(f"send failed: {e}")
            return False
        if rest:
            t = asyncio.create_task(self._send_rest(rest))
            self._tasks.append(t)
            t.add_done_callback(self._tasks.remove)
        self._deadlines.add(self._deadlines.loop.time() + max(0.001, timeout), c)  # type: ignore[arg-type]
        if sent is not None:
            sent()
        self.stats.calls += 1
        self.stats.started += 1
        self.stats.sent_bytes += n
        self.stats.sent_by_function[function] += n
        self.stats.calls_by_function[function] += 1
        return True

    async def _send_rest(self, rest: list[memoryview]) -> None:
        try:
            await wire.send_rest(self.sock, self._send_lock, rest, self.progress)  # type: ignore[arg-type]
        except wire.LinkError as e:
            self._fail(f"send failed: {e}")

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
                if self.sock is not None and self.closed is None:
                    await wire.send_frame(
                        self.sock, self._send_lock, [wire.frame(wire.PING, 0, b"")], self.progress
                    )
            except wire.LinkError as e:
                self._fail(f"ping failed: {e}")
                return

    async def _read(self, reader: wire.Reader) -> None:
        try:
            await FrameLoop(reader, self._frame, lambda: self._stream(reader)).run()
        except (wire.LinkError, ValueError, msgpack.UnpackException) as e:
            self._fail(str(e))
        except asyncio.CancelledError:
            self._fail("closed")
            raise
        finally:
            if self.sock is not None:
                self.sock.close()  # no reader is registered on it any more

    def _frame(self, kind: int, status: int, rid: int, meta: memoryview, data: memoryview) -> None:
        """A whole reply, error or pong, in the reader callback: the caller's future is set here
        (its task runs in the next loop iteration)."""
        m = msgpack.unpackb(meta) if meta.nbytes else {}
        if kind == wire.PONG:
            return
        c = self.calls.pop(rid, None)
        if c is None or c.done():
            return  # given up (timeout): a reply slot is only taken once someone waits
        if kind == wire.ERR:
            c.set_exception(_refusal(status, m))
        elif kind == wire.REP:
            if c.sink is None:  # the default: the body as bytes, one copy out of the buffer
                self._deliver(c, m, bytes(data), data.nbytes)
                return
            dest = self._open(c, data.nbytes, m)
            if dest is not None:
                self._deliver(c, m, wire.copy_in(dest, data), data.nbytes)

    async def _stream(self, reader: wire.Reader) -> None:
        """One frame larger than the read buffer: its data goes straight into the sink."""
        kind, _flags, status, meta_len, rid, data_len = await reader.header()
        meta = msgpack.unpackb(await reader.exact(meta_len)) if meta_len else {}
        c = self.calls.pop(rid, None)
        dest = self._open(c, data_len, meta) if kind == wire.REP and c is not None else None
        if dest is None:
            await reader.skip(data_len)
            if kind == wire.ERR and c is not None and not c.done():
                c.set_exception(_refusal(status, meta))
            return
        self._deliver(c, meta, await wire.read_in(reader, dest, data_len), data_len)

    @staticmethod
    def _open(c: _Call, n: int, meta: dict) -> wire.Dest | None:
        """Where call ``c``'s reply body of n bytes goes, or None after failing the call with
        the sink's refusal (no room for the reply)."""
        try:
            view, handle = (c.sink or _bytearray_sink)(n, meta)
        except InvokeError as e:
            if not c.done():
                c.set_exception(e)
            return None
        return view, handle, lambda: release_handle(handle)

    def _deliver(self, c: _Call, meta: dict, handle: Any, n: int) -> None:
        self.stats.received_bytes += n
        if not c.done():
            c.set_result(Reply(meta, handle))
        else:  # the caller gave up while the body streamed in
            release_handle(handle)

    def _fail(self, why: str) -> None:
        if self.closed is not None:
            return
        self.closed = why
        log.warning("link to node %s closed: %s", self.node, why)
        calls, self.calls = list(self.calls.values()), {}
        for c in calls:
            if not c.done():
                c.set_exception(NodeUnavailable(self.node, f"went away during the call ({why})"))
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
        if self._deadlines is not None:
            self._deadlines.close()
        if self.sock is not None:
            self.sock.close()


def _refusal(status: int, meta: dict) -> InvokeError:
    """An ERR frame as the error it carries (same status)."""
    return InvokeError(status or 502, meta.get("error", "remote_error"), meta.get("detail", ""))


def release_handle(dst: Any) -> None:
    """Give back what a sink handed out (a reply slot) when nobody will read it."""
    release = getattr(dst, "release_slot", None)
    if release is not None:
        release()
