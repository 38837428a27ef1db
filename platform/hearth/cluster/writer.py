"""Writing frames on a link connection: whole frames, never interleaved, with no copy in Python.

The sender passes the slot's memoryview to ``sendmsg`` together with the header and meta (one
gather write); a frame of ``BULK`` bytes or more is written from a worker thread. A peer that
stops reading is found out (``Progress``), and a frame that can never be finished ends the
connection (``_cut``)."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from typing import Any

from hearth.cluster.framing import BULK, LinkError
from hearth.writelock import WriteLock

IOV_MAX = 512


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
