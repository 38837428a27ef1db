"""The agent link's sends (`DataplaneLink._post`): the first descriptor of a loop step leaves
at once; later ones of the same step share one send; a lone call schedules no flush pass; no
descriptor overtakes one sent before it to the same instance. The link's endpoint is the real
`AsyncEndpoint` (its send lock included) on a real socket pair whose other end stands for the
instances: SOCK_SEQPACKET, so each ``sendmsg`` arrives as one record and the tests see how the
descriptors were batched; the event loop is real."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from hearth.agent.instance import AGENT_ID
from hearth.agent.link import DataplaneLink
from hearth.dataplane.async_endpoint import AsyncEndpoint
from hearth.dataplane.descriptor import SIZE, Descriptor

FILLER = 99  # the destination of what fills the socket (`Peer.fill`)


class Peer:
    """The instances' end of the link's data socket: every record it reads is one send."""

    def __init__(self, sock: socket.socket, ep_sock: socket.socket) -> None:
        self.sock, self.ep_sock = sock, ep_sock
        self.got: list[list[Descriptor]] = []

    def read(self) -> None:
        """Take every record there now (the filler dropped)."""
        while True:
            try:
                rec = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            ds = [Descriptor.unpack(rec[i : i + SIZE]) for i in range(0, len(rec), SIZE)]
            if ds[0].dst != FILLER:
                self.got.append(ds)

    @property
    def sends(self) -> list[list[int]]:
        """The destinations of each send so far."""
        self.read()
        return [[d.dst for d in ds] for ds in self.got]

    @property
    def corrs(self) -> list[list[bytes]]:
        """The first byte of each descriptor's corr, by send."""
        self.read()
        return [[bytes(d.corr)[:1] for d in ds] for ds in self.got]

    def fill(self) -> None:
        """The instances stop reading: the socket fills up (a send now sends nothing)."""
        filler = Descriptor(dst=FILLER).pack()
        while True:
            try:
                self.ep_sock.send(filler)
            except BlockingIOError:
                return


@pytest.fixture
async def wired() -> AsyncIterator[tuple[DataplaneLink, Peer]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    b.setblocking(False)
    ctrl, ctrl_peer = socket.socketpair()
    lk = DataplaneLink(pool=None, proxy_socket="")  # type: ignore[arg-type]
    lk._loop = asyncio.get_running_loop()
    lk.ep = AsyncEndpoint("", AGENT_ID, ctrl, a, "unix", reconnect=False, reconnect_timeout=1.0)
    try:
        yield lk, Peer(b, a)
    finally:
        await lk.close()
        for s in (b, ctrl_peer):
            s.close()


async def test_posts_of_one_loop_step_after_the_first_share_one_send(wired) -> None:
    lk, rec = wired

    async def post(dst: int) -> None:
        lk._post(Descriptor(dst=dst))

    # three requests handled in the same loop step (their tasks were all ready at once)
    await asyncio.gather(post(7), post(7), post(7))
    await asyncio.sleep(0)  # the flush's pass
    assert rec.sends == [[7], [7, 7]]


async def test_a_lone_post_is_sent_at_once_without_a_flush_pass(wired) -> None:
    lk, rec = wired
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    ready_before = len(loop._ready)  # type: ignore[attr-defined]
    lk._post(Descriptor(dst=3))
    assert rec.sends == [[3]]
    assert not lk._flush_scheduled
    assert len(loop._ready) == ready_before  # type: ignore[attr-defined]  # no extra loop pass


async def test_a_held_descriptor_leaves_with_the_next_one_to_its_destination(wired) -> None:
    """A pool instance's spec (`hold`) waits for the request handed to it and both leave in one
    send, at once, in order; a descriptor to another destination goes its own way."""
    lk, rec = wired
    await asyncio.sleep(0)
    lk.hold(Descriptor(dst=5, corr=b"s" * 16))
    assert rec.sends == []  # not sent yet
    lk._post(Descriptor(dst=6))
    lk._post(Descriptor(dst=5, corr=b"r" * 16))
    assert rec.sends == [[5, 5]]  # the spec and the request: one send, before the flush
    await asyncio.sleep(0)  # the flush's pass
    assert rec.sends == [[5, 5], [6]]


async def test_a_send_never_overtakes_a_held_spec(wired) -> None:
    """`send` (a chained call's `forward`, an error reply, a shutdown) to an instance whose spec
    is held: the spec leaves first, with it. The pool instance takes its first message for its
    spec; a request read first killed it, and the chained call with it (502)."""
    lk, rec = wired
    await asyncio.sleep(0)
    lk.hold(Descriptor(dst=5, corr=b"s" * 16))
    await lk.send(Descriptor(dst=5, corr=b"r" * 16))
    await asyncio.sleep(0)  # the flush's pass
    assert rec.corrs == [[b"s", b"r"]]  # one message, the spec first
    await lk.send(Descriptor(dst=5, corr=b"t" * 16))  # nothing waits now: sent at once, alone
    assert rec.corrs == [[b"s", b"r"], [b"t"]]


async def test_nothing_overtakes_a_box_a_task_still_sends(wired) -> None:
    """The socket was full at the flush: the held spec goes from a task. A send and a post to
    the same instance before that task has run (the socket drained meanwhile) queue behind it
    instead of leaving at once, ahead of the spec."""
    lk, rec = wired
    await asyncio.sleep(0)
    rec.fill()
    lk.hold(Descriptor(dst=5, corr=b"s" * 16))
    await asyncio.sleep(0)  # the flush: nothing sent now, a task will send the spec
    assert lk._senders
    rec.read()  # the instances read again: the socket has room before that task has run
    assert rec.corrs == []
    await lk.send(Descriptor(dst=5, corr=b"r" * 16))
    lk.post(Descriptor(dst=5, corr=b"t" * 16))
    lk.post(Descriptor(dst=6, corr=b"o" * 16))  # another instance: its own way, at once
    for _ in range(6):
        await asyncio.sleep(0)
    to5 = [c for box, dsts in zip(rec.corrs, rec.sends, strict=True) if dsts[0] == 5 for c in box]
    assert to5 == [b"s", b"r", b"t"] and [b"o"] in rec.corrs
    assert not lk._senders and not lk._boxing
    lk.post(Descriptor(dst=5, corr=b"u" * 16))  # the task is done: at once again
    assert rec.corrs[-1] == [b"u"]


async def test_a_held_descriptor_nothing_follows_leaves_with_the_flush(wired) -> None:
    lk, rec = wired
    lk.hold(Descriptor(dst=5))
    assert rec.sends == []
    await asyncio.sleep(0)
    assert rec.sends == [[5]] and not lk._held
    lk._post(Descriptor(dst=5))  # nothing is held any more: a lone post leaves alone
    assert rec.sends == [[5], [5]]


async def test_a_reply_hook_sees_the_reply_before_the_agent_counts_the_instance_done(wired) -> None:
    """A forwarded call's reply leaves from its hook (``on_reply``): the hook runs first, before
    the agent's bookkeeping for the instance, and the caller still gets the reply; a bounce
    (the instance unknown to the proxy) reaches no hook."""
    import os
    from types import SimpleNamespace

    from hearth.agent.deadlines import Deadlines
    from hearth.agent.instance import InstanceDied
    from hearth.dataplane.descriptor import PROXY_ID, Kind, Status

    lk, rec = wired
    lk._deadlines = Deadlines(asyncio.get_running_loop())
    order: list[str] = []
    lk.on_done = lambda inst: order.append("done")
    inst = SimpleNamespace(id="f/1", eid=9, function="f", pending=set())

    async def call() -> tuple[asyncio.Task, Descriptor]:
        d = Descriptor(dst=9, kind=Kind.INVOKE, corr=os.urandom(16))
        t = asyncio.ensure_future(lk.call(inst, d, 5.0, None, lambda r: order.append("hook")))
        await asyncio.sleep(0)  # posted, waiting for its reply
        return t, d

    t, d = await call()
    lk.dispatch(Descriptor(dst=0, src=9, kind=Kind.REPLY, corr=d.corr))
    assert order == ["hook", "done"]
    assert (await t).kind == Kind.REPLY
    order.clear()
    t, d = await call()
    lk.dispatch(
        Descriptor(dst=0, src=PROXY_ID, kind=Kind.ERROR, status=Status.UNKNOWN_DST, corr=d.corr)
    )
    assert order == ["done"]
    try:
        await t
        raise AssertionError("a bounced call must fail")
    except InstanceDied:
        pass
    lk._deadlines.close()


async def test_a_post_never_overtakes_a_send_waiting_its_turn(wired) -> None:
    """`send` (a shutdown, a chained call, an error reply) finds the endpoint busy (the rest of
    a partial send still going out) and waits for its send lock. Between the lock's release
    and that send's turn the lock reads unlocked: a `post` to the same instance then (a call
    started from a reply read in that loop step) left at once, ahead of the send, and the
    instance read them the other way round (a request before the shutdown it came after)."""
    lk, rec = wired
    await asyncio.sleep(0)
    lock = lk.ep._send_lock  # type: ignore[union-attr]
    await lock.acquire()  # another message is going out
    first = asyncio.ensure_future(lk.send(Descriptor(dst=5, corr=b"c" * 16)))
    await asyncio.sleep(0)  # it waits its turn
    lock.release()  # its turn has come; it has not run yet
    lk.post(Descriptor(dst=5, corr=b"r" * 16))
    await asyncio.wait_for(first, 10)
    for _ in range(4):
        await asyncio.sleep(0)
    assert [c for box in rec.corrs for c in box] == [b"c", b"r"]
    assert not lk._senders and lk.ep._send_lock.idle()  # type: ignore[union-attr]
