"""The agent-to-agent link's wire format and the socket I/O under it.

After a mutual HMAC handshake (the cluster token never crosses the network), a connection
carries messages ``[header 24 B][meta: msgpack, meta_len B][data: data_len B]``; the header is
``<BBHIQQ``: type, flags, status, meta_len, request id, data_len. Requests go from the dialling
agent to the listening one; replies, errors and pongs come back on the same connection.

Data moves without copies in Python: the sender passes the slot's memoryview to ``sendmsg``
together with the header and meta (one gather write); the receiver ``recv_into``\\s the
destination slot's memoryview. Only bytes that arrived in the same read as a header (at most
``BUF`` bytes) are copied once out of the read buffer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

REQ, REP, ERR, PING, PONG = 1, 2, 3, 4, 5
HEADER = struct.Struct("<BBHIQQ")
MAGIC = b"HRTHLNK1"
NONCE = 16
MAC = 32
BUF = 64 << 10
#: a frame's meta is read whole into the read buffer, after its header
MAX_META = BUF - HEADER.size
IOV_MAX = 512


class LinkError(ConnectionError):
    """The link broke or the peer is not who it must be."""


class AuthError(LinkError):
    pass


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"|".join(parts), hashlib.sha256).digest()


#: transfers at least this big run their system calls in a worker thread (blocking on poll, so
#: the event loop takes no wake-up per socket-buffer's worth and keeps serving small calls)
BULK = 1 << 20


class Progress:
    """When bytes last left on a connection, and the sends waiting to write: a peer that stops
    reading is found out, and closing the link wakes its blocked senders."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.blocked: set[asyncio.Future] = set()
        self.failed: str | None = None

    def fail(self, why: str) -> None:
        self.failed = why
        for f in self.blocked:
            if not f.done():
                f.set_exception(LinkError(why))


#: a bulk transfer that moves no byte for this long has a dead or frozen peer
STALL_S = 30.0


def _poll_wait(sock: socket.socket, event: int, progress: Progress | None) -> None:
    """Block this (worker) thread until `sock` is ready, the link failed, or it stalled."""
    p = select.poll()
    p.register(sock.fileno(), event | select.POLLERR | select.POLLHUP)
    t0 = time.monotonic()
    while not p.poll(100):
        if progress is not None and progress.failed:
            raise LinkError(progress.failed)
        if time.monotonic() - t0 > STALL_S:
            raise LinkError(f"the peer moved no byte for {STALL_S:g}s")


def _write(sock: socket.socket, views: list[memoryview], progress: Progress | None) -> bool:
    """One gather ``sendmsg`` of what the socket takes now; ``views`` advance past what went.
    False when it took nothing (its buffer is full)."""
    try:
        n = sock.sendmsg(views[:IOV_MAX])
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as e:
        raise LinkError(f"send failed: {e}") from None
    if progress is not None:
        progress.at = time.monotonic()
    _advance(views, n)
    return True


def _send_blocking(sock: socket.socket, views: list[memoryview], progress: Progress | None) -> None:
    while views:
        if not _write(sock, views, progress):
            _poll_wait(sock, select.POLLOUT, progress)


def _advance(views: list[memoryview], n: int) -> None:
    while n:
        v = views[0]
        if n >= v.nbytes:
            n -= v.nbytes
            views.pop(0)
        else:
            views[0] = v[n:]
            n = 0


async def _writable(sock: socket.socket, progress: Progress | None) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock.fileno()
    if fd < 0:
        raise LinkError("socket closed")
    loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
    if progress is not None:
        progress.blocked.add(fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)
        if progress is not None:
            progress.blocked.discard(fut)


def _cut(sock: socket.socket) -> None:
    """A frame that can never be finished: no other frame may follow its part (the peer would
    read it as the rest), so the connection ends here (both sides then see it closed)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


async def send_all(
    sock: socket.socket,
    bufs: list[Any],
    progress: Progress | None = None,
    timeout: float | None = None,
    begun: bool = False,
) -> int:
    """Write every buffer (gather ``sendmsg``; memoryviews are advanced, never copied).

    ``timeout`` bounds only the waits for a peer that stopped reading (TimeoutError): a send the
    socket takes at once costs no timer and no task. Interrupted (timeout, cancellation) once a
    part of the frame went (``begun``: a part went before), the connection is cut (``_cut``);
    a bulk send's thread is stopped the same way (it reads the caller's buffer, a slot that
    goes back once the caller is gone)."""
    views = [m for m in (memoryview(b).cast("B") for b in bufs) if m.nbytes]
    total = sum(v.nbytes for v in views)
    if total >= BULK:
        work = asyncio.to_thread(_send_blocking, sock, views, progress)
        try:
            await (work if timeout is None else asyncio.wait_for(work, timeout))
        except BaseException:
            _cut(sock)
            raise
        return total
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while views:
            if _write(sock, views, progress):
                continue
            if deadline is None:
                await _writable(sock, progress)
            else:
                left = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(_writable(sock, progress), left)
    except BaseException:
        if begun or sum(v.nbytes for v in views) < total:
            _cut(sock)
        raise
    return total


class WriteLock(asyncio.Lock):
    """Whose turn it is to write a frame on a connection."""

    def idle(self) -> bool:
        """Nobody is writing and nobody waits to: a frame written now cannot cut into another,
        and a part left over takes the lock at once (``acquire`` yields to waiters first)."""
        return not self.locked() and not self._waiters

    def take_now(self) -> None:
        """Take the idle lock without a wait (outside any task, e.g. in a reader callback): the
        frame whose first part just went out keeps the connection until ``release``."""
        assert self.idle()
        self._locked = True


def send_now(
    sock: socket.socket,
    lock: WriteLock,
    bufs: list[Any],
    progress: Progress | None = None,
    keep: bool = False,
) -> list[memoryview] | None:
    """Write a whole small frame now if no other frame is going out (one ``sendmsg``, no view,
    no list, no wait): ``[]`` when it all went. When the socket took only part of it, the lock
    is taken here and the rest returned, for the caller to write and then ``release`` the lock
    (copied if ``keep``: the caller's buffers may go away). None when nothing may be written
    now (another frame is going out, or it is bulk): wait for the lock.

    ``bufs`` are bytes or byte-format memoryviews (a header, meta, a slot's view)."""
    total = 0
    for b in bufs:
        total += b.nbytes if isinstance(b, memoryview) else len(b)
    if total >= BULK or not lock.idle():
        return None
    try:
        n = sock.sendmsg(bufs)
    except (BlockingIOError, InterruptedError):
        n = 0
    except OSError as e:
        raise LinkError(f"send failed: {e}") from None
    if n and progress is not None:
        progress.at = time.monotonic()
    if n == total:
        return []
    lock.take_now()  # nothing may cut into this frame until its rest is out
    views = [m for m in (memoryview(b).cast("B") for b in bufs) if m.nbytes]
    _advance(views, n)
    return [memoryview(bytes(v)) for v in views] if keep else views


async def send_rest(
    sock: socket.socket,
    lock: WriteLock,
    rest: list[memoryview],
    progress: Progress | None = None,
    timeout: float | None = None,
) -> None:
    """The rest of a frame ``send_now`` began (it holds the lock), then the lock is free."""
    try:
        await send_all(sock, rest, progress, timeout, begun=True)
    finally:
        lock.release()


async def send_frame(
    sock: socket.socket,
    lock: WriteLock,
    bufs: list[Any],
    progress: Progress | None = None,
    timeout: float | None = None,
) -> None:
    """One whole frame on a connection that several tasks write to, frames never interleaved:
    when no other frame is going out and the socket takes it all at once, it is written here
    (``send_now``); otherwise the rest goes out in turn under ``lock``."""
    rest = send_now(sock, lock, bufs, progress)
    if rest:
        await send_rest(sock, lock, rest, progress, timeout)
    elif rest is None:
        views = [m for m in (memoryview(b).cast("B") for b in bufs) if m.nbytes]
        async with lock:
            await send_all(sock, views, progress, timeout)


class Reader:
    """Buffered reads of headers and meta; large data goes straight into its destination."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray(BUF)
        self.mv = memoryview(self.buf)
        self.start = self.end = 0
        self._scratch: memoryview | None = None
        self.at = time.monotonic()  # when bytes last arrived

    def _compact(self) -> memoryview:
        """Room to read into: the unread tail (part of one frame: a few bytes, at most what a
        whole frame needs) moves to the front of the buffer."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.start:
            n = self.end - self.start
            self.mv[:n] = self.mv[self.start : self.end]
            self.start, self.end = 0, n
        return self.mv[self.end :]

    def _arrived(self, k: int) -> int:
        """``k`` bytes came in (0: the peer closed)."""
        if k == 0:
            raise LinkError("connection closed by the peer")
        self.at = time.monotonic()
        return k

    def _got(self, k: int) -> int:
        self.end += self._arrived(k)
        return k

    async def _fill(self) -> None:
        room = self._compact()
        try:
            k = await asyncio.get_running_loop().sock_recv_into(self.sock, room)
        except OSError as e:
            raise LinkError(f"receive failed: {e}") from None
        self._got(k)

    async def exact(self, n: int) -> memoryview:
        """The next ``n`` bytes (n <= BUF) as a view of the buffer, valid until the next read."""
        while self.end - self.start < n:
            await self._fill()
        v = self.mv[self.start : self.start + n]
        self.start += n
        return v

    async def into(self, dst: memoryview) -> None:
        """Fill ``dst``: first what is buffered (one copy of at most BUF bytes), then directly."""
        n = dst.nbytes
        have = min(n, self.end - self.start)
        if have:
            dst[:have] = self.mv[self.start : self.start + have]
            self.start += have
        if n - have >= BULK:
            await asyncio.to_thread(self._recv_blocking, dst[have:])
            return
        loop = asyncio.get_running_loop()
        while have < n:
            try:
                k = await loop.sock_recv_into(self.sock, dst[have:])
            except OSError as e:
                raise LinkError(f"receive failed: {e}") from None
            have += self._arrived(k)

    def _recv_blocking(self, dst: memoryview) -> None:
        have, n = 0, dst.nbytes
        while have < n:
            try:
                k = self.sock.recv_into(dst[have:])
            except (BlockingIOError, InterruptedError):
                _poll_wait(self.sock, select.POLLIN, None)
                continue
            except OSError as e:
                raise LinkError(f"receive failed: {e}") from None
            have += self._arrived(k)

    async def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes (a refused or abandoned message's data)."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(1 << 20))
        while n:
            k = min(n, self._scratch.nbytes)
            await self.into(self._scratch[:k])
            n -= k

    async def header(self) -> tuple[int, int, int, int, int, int]:
        return HEADER.unpack(await self.exact(HEADER.size))

    # -- from the event loop's reader callback (FrameLoop) -----------------------------------
    def recv_some(self) -> int:
        """One non-blocking read into the buffer; 0 when nothing was there."""
        try:
            k = self.sock.recv_into(self._compact())
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            raise LinkError(f"receive failed: {e}") from None
        return self._got(k)

    def frame(self) -> Frame | None | object:
        """The next frame if it is whole in the buffer (its views are valid until the next
        read), None if more bytes must come, or STREAM when it does not fit the buffer (its
        data then goes straight to its destination: the async reads above)."""
        if self.end - self.start < HEADER.size:
            return None
        kind, _flags, status, meta_len, rid, data_len = HEADER.unpack_from(self.buf, self.start)
        if meta_len > MAX_META:
            raise LinkError(f"peer sent {meta_len} bytes of meta")
        total = HEADER.size + meta_len + data_len
        if total > len(self.buf):
            return STREAM
        if self.end - self.start < total:
            return None
        m = self.start + HEADER.size
        d = m + meta_len
        self.start += total
        return kind, status, rid, self.mv[m:d], self.mv[d : d + data_len]


#: a whole small frame: (type, status, request id, meta bytes, data bytes), views of the buffer
Frame = tuple[int, int, int, memoryview, memoryview]
#: Reader.frame(): the next frame is larger than the buffer
STREAM = object()


def frame(kind: int, rid: int, meta: bytes, data_len: int = 0, status: int = 0) -> bytes:
    return HEADER.pack(kind, 0, status, len(meta), rid, data_len) + meta


async def _read_n(reader: Reader, n: int) -> bytes:
    return bytes(await reader.exact(n))


async def handshake_client(
    sock: socket.socket, reader: Reader, token: bytes, me: str, timeout: float = 5.0
) -> str:
    """Prove we hold the token and check that the peer does too; returns the peer's node name."""

    async def run() -> str:
        hello = await _read_n(reader, len(MAGIC) + NONCE)
        if hello[: len(MAGIC)] != MAGIC:
            raise AuthError("the peer does not speak the Hearth link protocol")
        ns = hello[len(MAGIC) :]
        nc = os.urandom(NONCE)
        name = me.encode()[:255]
        await send_all(sock, [bytes([len(name)]), name, nc, _mac(token, b"c", ns, nc, name)])
        ok = await _read_n(reader, 1)
        if ok != b"\x01":
            raise AuthError("the peer rejected our cluster token")
        ln = (await _read_n(reader, 1))[0]
        peer = await _read_n(reader, ln)
        mac = await _read_n(reader, MAC)
        if not hmac.compare_digest(mac, _mac(token, b"s", nc, ns, peer)):
            raise AuthError("the peer could not prove it holds the cluster token")
        return peer.decode()

    return await asyncio.wait_for(run(), timeout)


async def handshake_server(
    sock: socket.socket, reader: Reader, token: bytes, me: str, timeout: float = 5.0
) -> str:
    async def run() -> str:
        ns = os.urandom(NONCE)
        await send_all(sock, [MAGIC, ns])
        ln = (await _read_n(reader, 1))[0]
        peer = await _read_n(reader, ln)
        nc = await _read_n(reader, NONCE)
        mac = await _read_n(reader, MAC)
        if not hmac.compare_digest(mac, _mac(token, b"c", ns, nc, peer)):
            await send_all(sock, [b"\x00"])
            raise AuthError(
                f"a client calling itself {peer.decode(errors='replace')!r} sent a bad token"
            )
        name = me.encode()[:255]
        await send_all(sock, [b"\x01", bytes([len(name)]), name, _mac(token, b"s", nc, ns, name)])
        return peer.decode()

    return await asyncio.wait_for(run(), timeout)


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


#: where a reply body of n bytes (with its meta) goes: (view to fill, handle for the caller)
Sink = Callable[[int, dict], tuple[memoryview, Any]]
#: where a message's data lands: (view to fill, handle for whoever gets the data, give-back if
#: the data never reaches them)
Dest = tuple[memoryview, Any, Callable[[], None]]


def copy_in(dest: Dest, data: memoryview) -> Any:
    """A buffered frame's data into its destination (in the reader callback); its handle."""
    view, handle, give_back = dest
    try:
        if data.nbytes:
            view[: data.nbytes] = data
    except BaseException:
        give_back()
        raise
    return handle


async def read_in(reader: Reader, dest: Dest, n: int) -> Any:
    """A streamed frame's ``n`` data bytes straight from the socket into its destination."""
    view, handle, give_back = dest
    try:
        if n:
            await reader.into(view[:n])
    except BaseException:
        give_back()
        raise
    return handle
