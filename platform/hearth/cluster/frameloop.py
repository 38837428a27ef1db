"""A link connection's incoming frames, read in the event loop's reader callback.

Why: awaiting ``loop.sock_recv_into`` per message costs a future, an epoll registration and
removal, and one more loop iteration before the message is even looked at (a task wake-up) on
each side of every call. Here the socket stays registered and each whole frame that fits the
read buffer goes to ``on_frame`` at once, in the callback (which must not block: it copies the
data where it belongs, sets a future or starts a task)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from hearth.cluster.wire import STREAM, Reader


class FrameLoop:
    """Feeds a connection's frames to ``on_frame`` (whole ones, in the callback) and
    ``on_stream()`` (one larger than the read buffer: reading pauses and it reads the frame with
    the async Reader calls, its data straight into its destination; reading resumes after it).

    ``pause()``/``resume()`` let the consumer stop reading while its answers are backed up: the
    peer's bytes then wait in the socket buffers and its sends block (back-pressure)."""

    def __init__(
        self,
        reader: Reader,
        on_frame: Callable[[int, int, int, memoryview, memoryview], None],
        on_stream: Callable[[], Any],
    ):
        self.reader, self.on_frame, self.on_stream = reader, on_frame, on_stream
        self.loop = asyncio.get_running_loop()
        self.fd = reader.sock.fileno()
        self.done: asyncio.Future = self.loop.create_future()
        self.paused = False
        self._streaming: asyncio.Task | None = None

    async def run(self) -> None:
        """Until the connection fails (raises why) or this task is cancelled."""
        self._resume()
        try:
            await self.done
        finally:
            self.loop.remove_reader(self.fd)
            if self._streaming is not None:
                self._streaming.cancel()

    def pause(self) -> None:
        """Read no more frames (the one being handled finishes) until ``resume()``."""
        if not self.paused:
            self.paused = True
            self.loop.remove_reader(self.fd)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self._streaming is None and not self.done.done():
                self._resume()

    def _resume(self) -> None:
        try:
            self.loop.add_reader(self.fd, self._readable)
            self._drain()  # frames that came in behind a streamed one, or while paused
        except BaseException as e:
            self._fail(e)

    def _readable(self) -> None:
        try:
            if self.reader.recv_some():
                self._drain()
        except BaseException as e:
            self._fail(e)

    def _drain(self) -> None:
        while not (self.paused or self.done.done()):
            f = self.reader.frame()
            if f is None:
                return
            if f is STREAM:
                self.loop.remove_reader(self.fd)
                self._streaming = self.loop.create_task(self._stream())
                return
            self.on_frame(*f)  # type: ignore[misc]

    async def _stream(self) -> None:
        try:
            await self.on_stream()
        except BaseException as e:
            self._fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        self._streaming = None
        if not (self.paused or self.done.done()):
            self._resume()

    def _fail(self, e: BaseException) -> None:
        if self.done.done():
            return
        if isinstance(e, asyncio.CancelledError):
            self.done.cancel()
        else:
            self.done.set_exception(e)
