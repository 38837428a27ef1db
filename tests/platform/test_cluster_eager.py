"""The link's serving shortcuts: a forwarded call's first step runs in the reader callback
(``start_eager``), and a frame goes out without the write lock when nobody else writes
(``send_frame``) — neither may change what a call does, how it is cancelled, or interleave frames."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hearth.cluster.eager import start_eager
from hearth.cluster.wire import WriteLock, send_frame


async def test_the_first_step_runs_at_once_and_a_task_runs_the_rest():
    loop = asyncio.get_running_loop()
    gate = loop.create_future()
    steps: list[str] = []

    async def call() -> str:
        steps.append("first")
        got = await gate
        steps.append("rest")
        return f"done:{got}"

    t = start_eager(loop, call())
    assert steps == ["first"]  # before any pass of the loop
    assert t is not None and not t.done()
    await asyncio.sleep(0)
    assert steps == ["first"]  # still waiting on the gate
    gate.set_result(7)
    assert await t == "done:7"
    assert steps == ["first", "rest"]


async def test_a_call_finished_in_its_first_step_needs_no_task():
    done: list[int] = []

    async def call() -> None:
        done.append(1)

    assert start_eager(asyncio.get_running_loop(), call()) is None
    assert done == [1]


async def test_errors_reach_whoever_waits_for_them():
    loop = asyncio.get_running_loop()

    async def fails_at_once() -> None:
        raise ValueError("first step")

    with pytest.raises(ValueError, match="first step"):
        start_eager(loop, fails_at_once())

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    t = start_eager(loop, fails_later())
    assert t is not None
    with pytest.raises(KeyError):
        await t


async def test_a_task_cancelled_before_it_ever_ran_still_unwinds_the_call():
    """The server cancels its calls on close: the call's own cleanup (its slot, its in-flight
    count) must run even when the task had not taken a step yet."""
    loop = asyncio.get_running_loop()
    cleaned: list[str] = []

    async def call() -> None:
        try:
            await loop.create_future()  # never resolves
        finally:
            cleaned.append("slot released")

    t = start_eager(loop, call())
    assert t is not None
    t.cancel()  # before the task's first step
    with pytest.raises(asyncio.CancelledError):
        await t
    assert cleaned == ["slot released"]
    assert t.cancelled()


async def test_a_lock_just_released_to_a_waiter_is_not_idle():
    """Between a release and the waiter's turn the lock reads unlocked; a frame started then
    must wait its turn, or its leftover bytes would queue behind the waiter's frame."""
    lock = WriteLock()
    assert lock.idle()
    await lock.acquire()
    waiter = asyncio.ensure_future(lock.acquire())
    await asyncio.sleep(0)  # the waiter is queued
    lock.release()
    assert not lock.locked()
    assert not lock.idle()
    await waiter
    lock.release()
    assert lock.idle()


async def test_frames_written_at_once_and_in_turn_never_interleave():
    """Many writers, frames larger than the socket buffer (so most wait their turn), a slow
    reader: every frame arrives whole and contiguous."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    lock = WriteLock()
    size = 48 << 10
    frames = [bytes([i]) * size for i in range(1, 25)]
    loop = asyncio.get_running_loop()

    async def read_all() -> bytes:
        got = bytearray()
        while len(got) < size * len(frames):
            got += await loop.sock_recv(b, 8 << 10)
            await asyncio.sleep(0)  # slow: the writers keep finding the buffer full
        return bytes(got)

    reader = asyncio.ensure_future(read_all())
    await asyncio.gather(*(send_frame(a, lock, [f[:100], memoryview(f)[100:]]) for f in frames))
    got = await asyncio.wait_for(reader, 30)
    a.close()
    b.close()
    chunks = [got[i : i + size] for i in range(0, len(got), size)]
    assert all(len(set(c)) == 1 for c in chunks), "a frame was cut into by another"
    assert sorted(c[0] for c in chunks) == list(range(1, 25))


async def test_a_frame_begun_outside_any_task_keeps_the_connection_until_its_rest_is_out():
    """``send_now`` (a reply sent from the reader callback): when the socket takes only part of
    the frame, the lock is held at once — no other frame may start before the rest, which is a
    copy (the caller's buffer, a reply slot, is reused at once) — and freed after it."""
    from hearth.cluster.wire import send_now, send_rest

    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    lock = WriteLock()
    slot = bytearray(b"\x01" * (200 << 10))
    rest = send_now(a, lock, [b"\x01" * 100, memoryview(slot)], keep=True)
    assert rest, "the socket took it all: no rest to test"
    assert lock.locked() and not lock.idle()
    assert send_now(a, lock, [b"\x02" * 100]) is None  # must wait its turn
    slot[:] = b"\x09" * len(slot)  # the slot is reused at once
    loop = asyncio.get_running_loop()
    second = asyncio.ensure_future(send_frame(a, lock, [b"\x02" * 100]))
    finish = asyncio.ensure_future(send_rest(a, lock, rest))
    got = bytearray()
    while len(got) < 100 + len(slot) + 100:
        got += await asyncio.wait_for(loop.sock_recv(b, 64 << 10), 10)
    await asyncio.gather(finish, second)
    a.close()
    b.close()
    assert got == b"\x01" * (100 + len(slot)) + b"\x02" * 100
    assert lock.idle()


@pytest.mark.parametrize("size", [200 << 10, 3 << 20], ids=["in-loop", "bulk-thread"])
async def test_a_frame_cut_short_by_cancellation_never_has_another_frame_after_its_part(size):
    """A writer cancelled with part of its frame on the wire (a forwarded call given up while
    its payload streams: ``wait_for`` around it, a shutdown): the frame can never be finished,
    so the connection is cut — the next frame must not follow the half frame (the peer would
    read its bytes as the rest of the first: crossed or corrupt calls), and a bulk send's thread
    must stop reading the caller's buffer (a slot freed and reused once the call ends)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    lock = WriteLock()
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(send_frame(a, lock, [b"\x01" * 100, b"\x01" * size]))
    got = bytearray()
    while len(got) < 64 << 10:  # part of it is through: the writer waits for room
        got += await asyncio.wait_for(loop.sock_recv(b, 64 << 10), 10)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    try:
        await asyncio.wait_for(send_frame(a, lock, [b"\x02" * 100]), 10)
    except OSError:
        pass  # the connection is cut: nothing more goes out on it
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(b, 64 << 10), 10)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    a.close()
    b.close()
    assert len(got) < 100 + size, "the cancelled frame was finished after all"
    assert b"\x02" not in got, "another frame followed part of a cancelled one"
