"""The data-plane endpoint for asyncio code (the node agent and its gateway): the same
registration, descriptors and reconnect behaviour as :class:`hearth.dataplane.endpoint.Endpoint`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from hearth.dataplane import control
from hearth.dataplane.descriptor import MAX_FRAMES, SIZE, Descriptor
from hearth.dataplane.endpoint import (
    RECV_CHUNK,
    Registered,
    RegistrationError,
    log,
    open_registration,
    register_options,
    unknown_dst_error,
)
from hearth.writelock import WriteLock


class AsyncEndpoint(Registered):
    """The same endpoint for asyncio code (the aiohttp gateway).

    Registration and re-registration run in a worker thread; data moves through
    ``loop.sock_recv_into`` / ``loop.sock_sendall`` on the non-blocking data socket.
    """

    def __init__(
        self,
        proxy_socket: str,
        endpoint_id: int,
        ctrl: socket.socket,
        data: socket.socket,
        mode: str,
        reconnect: bool,
        reconnect_timeout: float,
    ):
        self._registered(proxy_socket, endpoint_id, ctrl, data, mode, reconnect_timeout)
        self._tails: set[asyncio.Task] = set()  # writes under way (`_write`)
        data.setblocking(False)
        ctrl.setblocking(False)
        self._changed = asyncio.Event()
        # sends go out whole and in the order they began: a send waiting its turn (or for a
        # re-registration) is never overtaken by a later `send_now`, nor cut into by one
        self._send_lock = WriteLock()
        self._recv_lock = asyncio.Lock()
        self._rbuf = bytearray(SIZE)
        self._rgot = 0
        self._local: collections.deque[Descriptor] = collections.deque()
        # read_into(): descriptors go to this callback straight from the loop's reader callback
        self._on_desc: Callable[[Descriptor], None] | None = None
        self._armed: socket.socket | None = None  # the socket the loop watches for it
        self._partial = b""  # the start of a descriptor split across reads
        self._rearm: asyncio.Task | None = None
        self._watch_task = (
            asyncio.get_running_loop().create_task(self._watch()) if reconnect else None
        )

    @classmethod
    async def register(cls, proxy_socket: str, endpoint_id: int, **options: Any) -> AsyncEndpoint:
        """As :meth:`Endpoint.register` (the same options), registering in a worker thread."""
        reconnect, timeout, reconnect_timeout = register_options(**options)
        ctrl, data, mode = await asyncio.to_thread(
            open_registration, proxy_socket, endpoint_id, timeout
        )
        return cls(proxy_socket, endpoint_id, ctrl, data, mode, reconnect, reconnect_timeout)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                while await loop.sock_recv(self._ctrl, 4096):
                    pass
            except OSError:
                pass
            if self._closed:
                return
            log.warning(
                "endpoint %d: proxy control connection closed; re-registering", self.endpoint_id
            )
            self._data = None
            delay = 0.02
            while not self._closed:
                try:
                    ctrl, data, mode = await asyncio.to_thread(
                        open_registration, self.proxy_socket, self.endpoint_id, 2.0
                    )
                except (OSError, control.ProtocolError, RegistrationError):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                if self._closed:
                    ctrl.close()
                    data.close()
                    return
                ctrl.setblocking(False)
                data.setblocking(False)
                self._ctrl.close()
                self._ctrl, self._data, self.mode = ctrl, data, mode
                self.registrations += 1
                self._changed.set()
                self._changed = asyncio.Event()
                break

    async def _current(
        self, old: socket.socket | None = None, timeout: float | None = None
    ) -> socket.socket:
        limit = self.reconnect_timeout if timeout is None else min(timeout, self.reconnect_timeout)
        deadline = time.monotonic() + limit
        while not self._closed and (self._data is None or self._data is old):
            left = deadline - time.monotonic()
            if left <= 0 or self._watch_task is None:
                raise ConnectionError(
                    f"endpoint {self.endpoint_id}: proxy daemon at {self.proxy_socket} unreachable"
                )
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        if self._closed:
            raise ConnectionError(f"endpoint {self.endpoint_id} is closed")
        return self._data

    async def send(self, d: Descriptor) -> None:
        """Send one descriptor; if the kernel cannot route it, the ERROR the daemon would send
        is queued for ``recv`` (or handed to the ``read_into`` callback)."""
        self._fail_locally(await self.send_many([d]))

    def _fail_locally(self, lost: list[Descriptor]) -> None:
        """The ERRORs the daemon would send for descriptors that never reached it."""
        for d in lost:
            err = unknown_dst_error(d)
            if self._on_desc is not None:
                asyncio.get_running_loop().call_soon(self._on_desc, err)
            else:
                self._local.append(err)

    async def send_many(self, ds: list[Descriptor]) -> list[Descriptor]:
        """Send descriptors for ONE destination in one ``sendmsg`` (the eBPF program routes a
        message by its first descriptor). Returns those the kernel could not route (their
        destination just went away) for the caller to fail, instead of queueing local errors;
        raises ConnectionError if the message could not be written whole, even after
        re-registering (then it is resent whole on the new connection)."""
        if len({d.dst for d in ds}) > 1 or not 0 < len(ds) <= MAX_FRAMES:
            raise ValueError(f"send_many: 1..{MAX_FRAMES} descriptors for one destination")
        frames = ds[0].pack() if len(ds) == 1 else b"".join([d.pack() for d in ds])
        if not self._send_lock.idle():
            # its turn, kept while it waits for a re-registration too; cancelled while it
            # waits, nothing was written and the turn passes on (asyncio.Lock)
            await self._send_lock.acquire()
        else:
            self._send_lock.take_now()  # nobody writing or waiting: no wait, no task
        sock, sent = self._data, 0
        if sock is not None and not self._closed:
            try:
                sent = sock.send(frames)
            except PermissionError:
                self._send_lock.release()
                return list(ds)
            except OSError:  # full (BlockingIOError), or broken: the task waits or re-registers
                pass
            if sent == len(frames):
                self._send_lock.release()
                return []
        # once the lock is held, the message is written whole even if this caller is
        # cancelled: half a message on a stream socket (eBPF's TCP, AF_UNIX) would shift every
        # later descriptor
        write = self._write(self._send_frames(frames, ds, sock, sent))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            if write.cancelled() and self._closed:  # close() cancelled it before it began
                raise ConnectionError(f"endpoint {self.endpoint_id} is closed") from None
            raise

    async def _send_frames(
        self, frames: bytes, ds: list[Descriptor], sock: socket.socket | None, sent: int
    ) -> list[Descriptor]:
        """Write ``frames`` from ``sent`` on ``sock`` (the current socket if None); on a broken
        connection, the whole message again on the next registration's."""
        loop = asyncio.get_running_loop()
        try:
            if sock is None or self._closed:
                sock, sent = await self._current(), 0
            for _attempt in range(3):
                try:
                    await loop.sock_sendall(sock, memoryview(frames)[sent:])
                    return []
                except PermissionError:
                    return list(ds)
                except OSError as e:
                    if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                        raise
                    sock, sent = await self._current(old=sock), 0
        except asyncio.CancelledError:
            if self._closed:  # close() cancels writes under way: their callers hear why
                raise ConnectionError(f"endpoint {self.endpoint_id} is closed") from None
            raise
        raise ConnectionError(f"endpoint {self.endpoint_id}: could not send after re-registering")

    def _write(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run a write that holds the send lock in a task of its own, which only ``close``
        cancels (callers await it shielded), and free the lock when it ends however it ends: a
        done callback runs even for a task cancelled before its first step, where a
        ``finally`` in the coroutine would not."""
        t = asyncio.get_running_loop().create_task(coro)
        self._tails.add(t)
        t.add_done_callback(self._written)
        return t

    def _written(self, t: asyncio.Task) -> None:
        self._tails.discard(t)
        self._send_lock.release()
        if not t.cancelled() and t.exception() is not None:  # (retrieved: its caller may be gone)
            log.debug("endpoint %d: a send failed: %s", self.endpoint_id, t.exception())

    def send_now(self, ds: list[Descriptor]) -> list[Descriptor] | None:
        """``send_many`` without a task when it cannot block: one non-blocking ``send`` of the
        whole message, now. Returns the unroutable descriptors as ``send_many`` does, or None
        if nothing was sent (another send in progress or waiting its turn, re-registering, the
        socket full, an error): then use ``send_many``, which queues behind them. A partial
        send takes the send lock here, before any other send can start (a ``send_now`` in the
        same loop step would cut into it once the socket drains), and a task writes the rest
        and frees it; if that rest cannot be written, the message's descriptors come back as
        local ERRORs, as ``send`` queues them."""
        sock = self._data
        if (
            sock is None
            or self._closed
            or not self._send_lock.idle()
            or not 0 < len(ds) <= MAX_FRAMES
        ):
            return None
        frames = ds[0].pack() if len(ds) == 1 else b"".join([d.pack() for d in ds])
        try:
            n = sock.send(frames)
        except PermissionError:
            return list(ds)
        except OSError:  # BlockingIOError included: send_many waits (or re-registers)
            return None
        if n < len(frames):
            self._send_lock.take_now()
            self._write(self._send_tail(frames, ds, sock, n))  # which frees the lock
        return []

    async def _send_tail(
        self, frames: bytes, ds: list[Descriptor], sock: socket.socket, sent: int
    ) -> None:
        """The rest of a partial ``send_now`` (which took the send lock for it), resent whole
        after a re-registration as ``send_many`` does; failing that, local ERRORs."""
        try:
            lost = await self._send_frames(frames, ds, sock, sent)
        except (OSError, asyncio.CancelledError) as e:  # ConnectionError included
            log.debug("endpoint %d: rest of a send lost: %r", self.endpoint_id, e)
            lost = list(ds)
        self._fail_locally(lost)

    async def recv(self, timeout: float | None = None) -> Descriptor:
        if timeout is not None:
            try:
                return await asyncio.wait_for(self._recv(), timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"endpoint {self.endpoint_id}: no descriptor within {timeout} s"
                ) from None
        return await self._recv()

    async def _recv(self) -> Descriptor:
        loop = asyncio.get_running_loop()
        async with self._recv_lock:
            while True:
                if self._local:
                    return self._local.popleft()
                if self._rsock is None:
                    self._rsock = await self._current(timeout=1e9)
                sock = self._rsock
                try:
                    n = await loop.sock_recv_into(sock, memoryview(self._rbuf)[self._rgot :])
                except OSError as e:
                    if e.errno not in (errno.EBADF, errno.ECONNRESET, errno.ENOTCONN, None):
                        raise
                    n = 0
                if n == 0:
                    self._rgot = 0
                    self._rsock = None
                    await self._current(old=sock, timeout=1e9)
                    sock.close()
                    continue
                self._rgot += n
                if self._rgot == SIZE:
                    self._rgot = 0
                    return Descriptor.unpack(bytes(self._rbuf))

    # -- reading with a callback (the agent's reader) ---------------------------------------
    def read_into(self, on_descriptor: Callable[[Descriptor], None]) -> None:
        """Hand every received descriptor to `on_descriptor`, called from the event loop's own
        reader callback: one registration for the socket's life instead of a future, a task
        step and two ``epoll_ctl`` per read (``recv`` is not to be used after this). Reads
        take up to 64 descriptors at once. On re-registration it carries on with the new
        socket once the old one is drained, as ``recv`` does."""
        self._on_desc = on_descriptor
        while self._local:
            asyncio.get_running_loop().call_soon(on_descriptor, self._local.popleft())
        if self._data is not None:
            self._arm(self._data)
        else:
            self._rearm = asyncio.get_running_loop().create_task(self._arm_next(None))

    def _arm(self, sock: socket.socket) -> None:
        self._armed = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock)

    def _disarm(self) -> None:
        sock, self._armed = self._armed, None
        if sock is not None and sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(sock.fileno())

    async def _arm_next(self, old: socket.socket | None) -> None:
        while True:
            try:
                sock = await self._current(old=old, timeout=1e9)
                break
            except ConnectionError as e:
                if self._closed:
                    return
                log.error("endpoint %d: %s", self.endpoint_id, e)
                await asyncio.sleep(0.1)
        if old is not None:
            old.close()
        self._arm(sock)

    def _readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.ECONNRESET, errno.ENOTCONN):
                log.error("endpoint %d: read failed: %s", self.endpoint_id, e)
            data = b""
        if not data:  # drained: the proxy went away; go on with the next registration
            self._disarm()
            self._partial = b""
            if not self._closed:
                self._rearm = asyncio.get_running_loop().create_task(self._arm_next(sock))
            return
        cb = self._on_desc
        assert cb is not None
        if len(data) == SIZE and not self._partial:  # the usual case: one descriptor
            cb(Descriptor.unpack(data))
            return
        if self._partial:
            data = self._partial + data
        end = len(data) - len(data) % SIZE
        self._partial = data[end:]
        for i in range(0, end, SIZE):
            cb(Descriptor.unpack(data[i : i + SIZE]))

    def fileno(self) -> int:
        s = self._data
        return s.fileno() if s is not None else -1

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # a write under way would never end once its socket is closed (and would leave the
        # closed fd in the loop's selector, for the next socket with that number to trip on):
        # cancel it first; its caller gets ConnectionError, and so does every send queued
        # behind it (``_current`` sees the endpoint closed)
        writes = list(self._tails)
        for t in writes:
            t.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        self._changed.set()
        self._disarm()
        if self._rearm is not None:
            self._rearm.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
        for s in (self._ctrl, self._data, self._rsock):
            if s is not None:
                s.close()

    async def __aenter__(self) -> AsyncEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
