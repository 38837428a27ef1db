"""Reading frames from a link connection.

Headers and meta are read into a buffer; the receiver ``recv_into``\\s the destination slot's
memoryview for the data. Only bytes that arrived in the same read as a header (at most ``BUF``
bytes) are copied once out of the read buffer."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from typing import Any

from hearth.cluster.framing import BUF, BULK, HEADER, MAX_META, STREAM, Dest, Frame, LinkError
from hearth.cluster.writer import _poll_wait


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
