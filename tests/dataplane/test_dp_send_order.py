"""The agent's data-plane endpoint (`AsyncEndpoint`) writes each message whole and in the order
the sends began, on a real loopback TCP pair (the eBPF mode's data socket) with small buffers
and a reader that lags: a message the socket took only part of is never cut into by the next
one, even when the socket has room again before the task that writes its rest has run."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import select
import socket
import sys
import termios

from hearth.dataplane.async_endpoint import AsyncEndpoint
from hearth.dataplane.descriptor import MAX_FRAMES, SIZE, Descriptor
from hearth.dataplane.endpoint import _tcp_pair


def _stream(got: bytes) -> list[int]:
    """The `aux` of every descriptor in the byte stream, in order (a cut message shows as
    numbers out of order, or as descriptors made of two messages' bytes)."""
    assert len(got) % SIZE == 0, f"{len(got)} bytes: a descriptor was cut"
    return [Descriptor.unpack(got[i : i + SIZE]).aux for i in range(0, len(got), SIZE)]


async def test_a_partial_send_now_is_never_cut_into_by_the_next_message():
    a, b = _tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    b.setblocking(False)
    ctrl, ctrl_peer = socket.socketpair()
    ep = AsyncEndpoint("unused", 1, ctrl, a, "ebpf", reconnect=False, reconnect_timeout=1.0)
    got = bytearray()
    sent = 0  # descriptors handed to the endpoint (numbered by `aux`)

    def message() -> list[Descriptor]:
        return [Descriptor(dst=9, aux=sent + i) for i in range(MAX_FRAMES)]

    def drain() -> None:  # the slow reader takes what is there
        while True:
            try:
                chunk = b.recv(1 << 16)
            except BlockingIOError:
                return
            assert chunk
            got.extend(chunk)

    try:
        for _ in range(10_000):  # fill the socket until one message goes only in part
            if ep.send_now(message()) is None:  # full: nothing went, the reader takes some
                drain()
                continue
            sent += MAX_FRAMES
            if ep._tails:  # its rest waits for a task (not run yet: no await since)
                break
        else:
            raise AssertionError("no send was partial")
        # the reader catches up: the socket has room again before the task that writes the
        # rest has run (no await in between)
        for _ in range(200):
            drain()
            if select.select([], [a], [], 0.05)[1]:
                break
        else:
            raise AssertionError("the socket never had room again")
        nxt = message()
        if ep.send_now(nxt) is None:  # must wait its turn, as the agent's outbox then does
            await ep.send_many(nxt)
        sent += MAX_FRAMES
        loop = asyncio.get_running_loop()
        while len(got) < sent * SIZE:
            got.extend(await asyncio.wait_for(loop.sock_recv(b, 1 << 16), 10))
        assert _stream(bytes(got)) == list(range(sent)), "a message was cut into by the next"
        assert ep._send_lock.idle()
    finally:
        await ep.close()
        for s in (b, ctrl_peer):
            s.close()


async def test_a_send_waiting_its_turn_is_not_overtaken_by_a_send_now():
    """Between the send lock's release and the turn of the send that waits for it, the lock
    reads unlocked: a ``send_now`` then (e.g. from a reader callback of the same loop step)
    went out at once, ahead of the waiting send."""
    a, b = _tcp_pair()
    ctrl, ctrl_peer = socket.socketpair()
    ep = AsyncEndpoint("unused", 1, ctrl, a, "ebpf", reconnect=False, reconnect_timeout=1.0)
    try:
        lock = ep._send_lock
        await lock.acquire()  # another message going out (the rest of a partial send)
        waiting = asyncio.ensure_future(ep.send_many([Descriptor(dst=9, aux=1)]))
        await asyncio.sleep(0)  # it waits its turn
        lock.release()  # its turn has come; it has not run yet
        later = [Descriptor(dst=9, aux=2)]
        if ep.send_now(later) is None:
            await ep.send_many(later)
        await waiting
        got = b""
        loop = asyncio.get_running_loop()
        b.setblocking(False)
        while len(got) < 2 * SIZE:
            got += await asyncio.wait_for(loop.sock_recv(b, 1 << 16), 10)
        assert _stream(got) == [1, 2]
    finally:
        await ep.close()
        for s in (b, ctrl_peer):
            s.close()


def _written(b: socket.socket, got: bytes) -> int:
    """The bytes written to `b`'s AF_UNIX stream so far: read (`got`) or waiting in `b`."""
    inq = fcntl.ioctl(b, termios.FIONREAD, b"\0\0\0\0")
    return len(got) + int.from_bytes(inq, sys.byteorder)


async def test_a_send_cancelled_mid_message_still_writes_it_whole():
    """A caller cancelled while its message is going out (the socket took part of it and the
    reader lags) must not leave half a message on the stream: with the write in the caller's
    task, the cancel freed the send lock with the rest unwritten and the next message's bytes
    followed the half (every later descriptor misread). The message is finished in a task of
    its own; the next send goes out after it.

    On the unix mode's data socket (an AF_UNIX stream pair) with the smallest send buffer the
    kernel allows, where a 4 KiB message goes out in parts of 2,240 bytes. (Loopback TCP, the
    eBPF mode's, takes a 4 KiB message whole whenever it has any room -- it overcommits its
    send buffer by a segment -- so a test cannot make one go out in parts at will there.)"""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    a.setblocking(False)
    b.setblocking(False)
    ctrl, ctrl_peer = socket.socketpair()
    ep = AsyncEndpoint("unused", 1, ctrl, a, "unix", reconnect=False, reconnect_timeout=1.0)
    loop = asyncio.get_running_loop()
    try:
        lock = ep._send_lock
        await lock.acquire()  # another message is going out: this send waits its turn
        prefix = 0  # filler written straight to the socket until it is full
        while True:
            try:
                prefix += a.send(b"x" * 4096)
            except BlockingIOError:
                break
        first = [Descriptor(dst=9, aux=i) for i in range(MAX_FRAMES)]
        sending = asyncio.ensure_future(ep.send_many(first))
        await asyncio.sleep(0)
        got = bytearray()
        while len(got) < 3072:  # the reader frees the filler's first part, not all of it
            got.extend(b.recv(3072 - len(got)))
        lock.release()  # its turn: the socket has room for part of the message
        for _ in range(1000):
            await asyncio.sleep(0.001)
            if _written(b, got) > prefix:
                break
        assert prefix < _written(b, got) < prefix + MAX_FRAMES * SIZE, "not sent in part"
        assert not sending.done()  # its rest waits for room
        sending.cancel()  # its caller goes away mid-message
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        later = [Descriptor(dst=9, aux=MAX_FRAMES + i) for i in range(MAX_FRAMES)]
        sent_later = asyncio.ensure_future(ep.send_many(later))
        want = prefix + 2 * MAX_FRAMES * SIZE
        while len(got) < want:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(b, 1 << 16), 3)
            except TimeoutError:
                break
            got.extend(chunk)
        await asyncio.wait_for(sent_later, 10)  # a later send goes through
        assert _stream(bytes(got[prefix:])) == list(range(2 * MAX_FRAMES)), "a message was cut"
        assert ep._send_lock.idle()
    finally:
        await ep.close()
        for s in (b, ctrl_peer):
            s.close()


async def test_the_send_lock_is_freed_when_a_partial_sends_rest_is_cancelled_before_it_ran():
    """The rest of a partial ``send_now`` is written by a task; cancelled before its first step
    (the loop shutting down, a close), a ``finally`` in it never ran and the lock stayed
    taken: every later send waited for ever."""
    a, b = _tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ctrl, ctrl_peer = socket.socketpair()
    ep = AsyncEndpoint("unused", 1, ctrl, a, "ebpf", reconnect=False, reconnect_timeout=1.0)
    try:
        for i in range(10_000):  # fill the socket until one message goes only in part
            ep.send_now([Descriptor(dst=9, aux=i)] * MAX_FRAMES)
            if ep._tails:
                break
        else:
            raise AssertionError("no send was partial")
        assert not ep._send_lock.idle()
        for t in list(ep._tails):
            t.cancel()  # before its first step: no await since it was made
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert ep._send_lock.idle()
    finally:
        await ep.close()
        for s in (b, ctrl_peer):
            s.close()
