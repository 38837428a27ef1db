"""The agent link's sends (`DataplaneLink._post`): the first descriptor of a loop step leaves
at once; later ones of the same step share one send; a lone call schedules no flush pass.
The endpoint here records what would go to its socket (the real socket path is covered by the
end-to-end tests); the event loop is real."""

from __future__ import annotations

import asyncio

from hearth.agent.link import DataplaneLink
from hearth.dataplane.descriptor import Descriptor


class Recorder:
    """Stands for the endpoint's non-blocking send: every send_now is one sendmsg."""

    def __init__(self) -> None:
        self.sends: list[list[int]] = []
        self.corrs: list[list[bytes]] = []  # the first byte of each descriptor's corr
        self.full = False  # the socket is full: send_now sends nothing

    def send_now(self, ds: list[Descriptor]) -> list[Descriptor] | None:
        if self.full:
            return None  # nothing sent: the link sends it from a task (`send_many`)
        self.sends.append([d.dst for d in ds])
        self.corrs.append([bytes(d.corr)[:1] for d in ds])
        return []

    async def send(self, d: Descriptor) -> None:  # the endpoint's own send: at once, alone
        self.send_now([d])

    async def send_many(self, ds: list[Descriptor]) -> list[Descriptor]:
        await asyncio.sleep(0)  # (the socket drains)
        self.sends.append([d.dst for d in ds])
        self.corrs.append([bytes(d.corr)[:1] for d in ds])
        return []


def link() -> tuple[DataplaneLink, Recorder]:
    lk = DataplaneLink(pool=None, proxy_socket="")  # type: ignore[arg-type]
    lk._loop = asyncio.get_running_loop()
    lk.ep = rec = Recorder()  # type: ignore[assignment]
    return lk, rec


async def test_posts_of_one_loop_step_after_the_first_share_one_send() -> None:
    lk, rec = link()

    async def post(dst: int) -> None:
        lk._post(Descriptor(dst=dst))

    # three requests handled in the same loop step (their tasks were all ready at once)
    await asyncio.gather(post(7), post(7), post(7))
    await asyncio.sleep(0)  # the flush's pass
    assert rec.sends == [[7], [7, 7]]


async def test_a_lone_post_is_sent_at_once_without_a_flush_pass() -> None:
    lk, rec = link()
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    ready_before = len(loop._ready)  # type: ignore[attr-defined]
    lk._post(Descriptor(dst=3))
    assert rec.sends == [[3]]
    assert not lk._flush_scheduled
    assert len(loop._ready) == ready_before  # type: ignore[attr-defined]  # no extra loop pass


async def test_a_held_descriptor_leaves_with_the_next_one_to_its_destination() -> None:
    """A pool instance's spec (`hold`) waits for the request handed to it and both leave in one
    send, at once, in order; a descriptor to another destination goes its own way."""
    lk, rec = link()
    await asyncio.sleep(0)
    lk.hold(Descriptor(dst=5, corr=b"s" * 16))
    assert rec.sends == []  # not sent yet
    lk._post(Descriptor(dst=6))
    lk._post(Descriptor(dst=5, corr=b"r" * 16))
    assert rec.sends == [[5, 5]]  # the spec and the request: one send, before the flush
    await asyncio.sleep(0)  # the flush's pass
    assert rec.sends == [[5, 5], [6]]


async def test_a_send_never_overtakes_a_held_spec() -> None:
    """`send` (a chained call's `forward`, an error reply, a shutdown) to an instance whose spec
    is held: the spec leaves first, with it. The pool instance takes its first message for its
    spec; a request read first killed it, and the chained call with it (502)."""
    lk, rec = link()
    await asyncio.sleep(0)
    lk.hold(Descriptor(dst=5, corr=b"s" * 16))
    await lk.send(Descriptor(dst=5, corr=b"r" * 16))
    await asyncio.sleep(0)  # the flush's pass
    assert rec.corrs == [[b"s", b"r"]]  # one message, the spec first
    await lk.send(Descriptor(dst=5, corr=b"t" * 16))  # nothing waits now: sent at once, alone
    assert rec.corrs == [[b"s", b"r"], [b"t"]]


async def test_nothing_overtakes_a_box_a_task_still_sends() -> None:
    """The socket was full at the flush: the held spec goes from a task. A send and a post to
    the same instance before that task has run (the socket drained meanwhile) queue behind it
    instead of leaving at once, ahead of the spec."""
    lk, rec = link()
    await asyncio.sleep(0)
    rec.full = True
    lk.hold(Descriptor(dst=5, corr=b"s" * 16))
    await asyncio.sleep(0)  # the flush: nothing sent now, a task will send the spec
    assert rec.corrs == [] and lk._senders
    rec.full = False
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


async def test_a_held_descriptor_nothing_follows_leaves_with_the_flush() -> None:
    lk, rec = link()
    lk.hold(Descriptor(dst=5))
    assert rec.sends == []
    await asyncio.sleep(0)
    assert rec.sends == [[5]] and not lk._held
    lk._post(Descriptor(dst=5))  # nothing is held any more: a lone post leaves alone
    assert rec.sends == [[5], [5]]


async def test_a_reply_hook_sees_the_reply_before_the_agent_counts_the_instance_done() -> None:
    """A forwarded call's reply leaves from its hook (``on_reply``): the hook runs first, before
    the agent's bookkeeping for the instance, and the caller still gets the reply; a bounce
    (the instance unknown to the proxy) reaches no hook."""
    import os
    from types import SimpleNamespace

    from hearth.agent.deadlines import Deadlines
    from hearth.agent.instance import InstanceDied
    from hearth.dataplane.descriptor import PROXY_ID, Kind, Status

    lk, rec = link()
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
