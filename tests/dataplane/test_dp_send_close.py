"""A write of the agent's data-plane endpoint (`AsyncEndpoint`) still under way when the
endpoint closes, or when its connection breaks: its caller hears it (ConnectionError, or the
message's descriptors back as ERRORs), and nothing is left behind in the event loop. On the
unix mode's data socket (an AF_UNIX stream pair) with the smallest send buffer, where a 4 KiB
message goes out in parts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest
from dp_helpers import start_daemon_process
from hearth.dataplane.async_endpoint import AsyncEndpoint
from hearth.dataplane.descriptor import MAX_FRAMES, Descriptor, Kind, Status


def _full_pair() -> tuple[socket.socket, socket.socket]:
    """An AF_UNIX stream pair whose writing end `a` is full."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    a.setblocking(False)
    b.setblocking(False)
    while True:
        try:
            a.send(b"x" * 4096)
        except BlockingIOError:
            return a, b


def _message(base: int = 0) -> list[Descriptor]:
    return [Descriptor(dst=9, corr=base + i) for i in range(MAX_FRAMES)]


async def test_close_ends_a_pending_write_and_frees_its_fd_in_the_loop():
    """The write task waited on the full socket for ever after close (a cancel of its caller
    only reached the shield), leaving the closed fd in the loop's selector: the next socket
    given that fd number failed ``sock_recv`` (FileNotFoundError), and a send queued behind
    the write waited for ever instead of hearing the endpoint was closed."""
    a, b = _full_pair()
    ctrl, ctrl_peer = socket.socketpair()
    ep = AsyncEndpoint("unused", 1, ctrl, a, "unix", reconnect=False, reconnect_timeout=1.0)
    loop = asyncio.get_running_loop()
    fd = a.fileno()
    s1 = s2 = None
    try:
        first = asyncio.ensure_future(ep.send_many(_message()))
        queued = asyncio.ensure_future(ep.send_many(_message(MAX_FRAMES)))
        await asyncio.sleep(0.05)
        assert len(ep._tails) == 1 and not first.done() and not queued.done()
        first.cancel()  # as the link cancels its senders before it closes the endpoint
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(ep.close(), 2)
        assert not ep._tails
        assert fd not in loop._selector.get_map()  # type: ignore[attr-defined]
        with pytest.raises(ConnectionError, match="is closed"):
            await asyncio.wait_for(queued, 2)
        s1, s2 = socket.socketpair()  # takes the closed fd's number
        s1.setblocking(False)
        assert s1.fileno() == fd
        loop.call_later(0.05, s2.send, b"hi")
        assert await asyncio.wait_for(loop.sock_recv(s1, 10), 2) == b"hi"
    finally:
        await ep.close()
        for s in (b, ctrl_peer, s1, s2):
            if s is not None:
                s.close()


async def test_a_send_many_whose_rest_cannot_be_written_raises():
    """send_many's message went out in part, then the daemon went away: it answered ``[]`` at
    once (the rest left to a task that only logged its failure), so the outbox took every call
    in the box as sent. It must wait for the rest, and raise when it cannot be written even
    after re-registering (here there is none to wait for)."""
    a, b = _full_pair()
    got = 0
    while got < 3072:  # room for part of the message
        got += len(b.recv(3072 - got))
    ctrl, ctrl_peer = socket.socketpair()
    ep = AsyncEndpoint("unused", 1, ctrl, a, "unix", reconnect=False, reconnect_timeout=0.5)
    try:
        sending = asyncio.ensure_future(ep.send_many(_message()))
        await asyncio.sleep(0.05)
        assert not sending.done()  # its rest waits for room
        b.close()  # the daemon goes away before the rest is written
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(sending, 3)
        assert ep._send_lock.idle()
    finally:
        await ep.close()
        ctrl_peer.close()


async def test_a_partial_send_nows_lost_rest_comes_back_as_local_errors():
    """The rest of a partial ``send_now`` that cannot be written: its descriptors come back as
    the ERRORs ``send`` queues for an unroutable one, instead of a debug log line."""
    a, b = _full_pair()
    got = 0
    while got < 3072:
        got += len(b.recv(3072 - got))
    ctrl, ctrl_peer = socket.socketpair()
    ep = AsyncEndpoint("unused", 1, ctrl, a, "unix", reconnect=False, reconnect_timeout=0.5)
    errors: list[Descriptor] = []
    try:
        ep.read_into(errors.append)
        assert ep.send_now(_message()) == []
        assert ep._tails  # went out in part
        b.close()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if len(errors) == MAX_FRAMES:
                break
        assert [d.corr for d in errors] == list(range(MAX_FRAMES))  # each call hears it
        assert {(d.kind, d.status, d.aux) for d in errors} == {(Kind.ERROR, Status.UNKNOWN_DST, 9)}
    finally:
        await ep.close()
        ctrl_peer.close()


async def test_a_send_many_caught_by_a_daemon_restart_goes_out_whole_on_the_new_connection(
    sockdir,
):
    """A message waiting to be written (the daemon stopped reading, its socket full) when the
    daemon dies is written whole on the next registration's connection, and only then does
    ``send_many`` answer ``[]``. (The unix mode: there the daemon reads every message. The
    endpoint sends to itself: another endpoint might not have registered again yet.)"""
    path = os.path.join(sockdir, "proxy.sock")
    proc = start_daemon_process(path, "unix")
    a = None
    try:
        a = await AsyncEndpoint.register(path, 1)
        a._data.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        os.kill(proc.pid, signal.SIGSTOP)  # the daemon stops reading
        while a.send_now([Descriptor(dst=1, src=1, aux=0)] * MAX_FRAMES) is not None:
            pass  # (lost with the daemon: never forwarded)
        message = [Descriptor(dst=1, src=1, aux=100 + i) for i in range(MAX_FRAMES)]
        sending = asyncio.ensure_future(a.send_many(message))
        await asyncio.sleep(0.05)
        assert not sending.done()  # waits for room
        proc.kill()
        proc.wait(10)
        proc = await asyncio.to_thread(start_daemon_process, path, "unix")
        assert await asyncio.wait_for(sending, 30) == []
        got: list[int] = []  # (a filler message that went out in part is resent whole too)
        while len(got) < MAX_FRAMES:
            d = await a.recv(10)
            assert d.kind == Kind.INVOKE
            if d.aux:
                got.append(d.aux)
        assert got == [100 + i for i in range(MAX_FRAMES)]
        assert a.registrations == 2
    finally:
        if a is not None:
            await a.close()
        proc.kill()
        proc.wait(10)
