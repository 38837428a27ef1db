"""`Invoker.start_call`: a warm call started without a task or a coroutine, its outcome handed
to a callback from the data plane's reply (issue #19). Through a real node agent in this process
(real instances, proxy and slot pool; `hearth.up.Platform`): it falls back, having done nothing,
whenever the call would wait, and otherwise keeps every guarantee of `invoke`: one outcome, never
before it returns; the slot freed on every path; the function's timeout kills the instance and a
shorter one only abandons the call; an instance that dies answers 502; the counters count it;
`on_reply` sees the reply first. The gateway's use of it is tested in test_gateway_fastpath.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import msgpack
import pytest
import pytest_asyncio
from call_outcomes import Outcomes, until
from hearth.config import Settings
from hearth.dataplane.descriptor import Descriptor, Flags, Kind
from hearth.dataplane.segment import ROW_U32, ROW_U64
from hearth.invoke import InvokeError, InvokeResult
from hearth.redis_server import free_port
from hearth.runtime.codec import META_RESERVE, pack_meta
from hearth.spec import parse_spec
from hearth.up import Platform

pytestmark = pytest.mark.asyncio(loop_scope="module")

H = "hearth.functions.examples.handlers"
J = "application/json"  # the sleep handler reads {"seconds": s}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server):
    s = Settings.from_env(port=free_port(), redis_url=redis_server.url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix="hearth-sc-"))
    s.admin_token = "test-token-123456"
    s.spin_us = 150.0  # the busy-poll opted in (off by default): its tests below need it
    try:
        async with Platform(s, warm_pool_size=0) as p:
            yield p
    finally:
        shutil.rmtree(s.state, ignore_errors=True)


def _count(agent, function: str, status: int) -> float:
    return agent.metrics.calls.invocations(function, status)


async def _deploy(agent, **spec) -> str:
    await agent.deploy(parse_spec(spec))
    res = await agent.invoke(spec["name"], b'{"seconds": 0}', content_type=J)
    assert res.status == 200  # an instance, warm and free
    # and its start's last step done: it wakes the function's waiters, which a test that
    # watches wake-ups would otherwise see late on a loaded machine
    await until(lambda: not agent.functions[spec["name"]].starting, "the start's end")
    return spec["name"]


async def test_a_warm_call_ends_once_later_with_the_reply_and_its_books_kept(platform):
    agent = platform.agent
    fn = await _deploy(agent, name="sc-warm", handler=f"{H}:sleep")
    used, ok = agent.pool.stats()["used"], _count(agent, fn, 200)
    seen: list[tuple[str, bool, str, bool]] = []
    out = Outcomes()

    def hook(d, instance_id: str, cold: bool, invocation_id: str) -> None:
        seen.append((instance_id, cold, invocation_id, bool(out.got)))

    started = agent.invoker.start_call(
        fn,
        b'{"seconds": 0}',
        done=out,
        content_type=J,
        invocation_id="inv-1",
        on_reply=hook,
    )
    assert started and out.got == []  # never from inside start_call
    res = await out.one()
    assert isinstance(res, InvokeResult) and res.status == 200
    assert json.loads(res.body)["slept"] == 0
    inst = next(iter(agent.functions[fn].instances.values()))
    assert (res.instance_id, res.cold, res.invocation_id) == (inst.id, False, "inv-1")
    assert seen == [(inst.id, False, "inv-1", False)]  # the hook first, before `done`
    assert _count(agent, fn, 200) == ok + 1
    assert agent.pool.stats()["used"] == used  # the request (and reply) slot is free again
    assert inst.inflight == 0 and inst.state == "idle"  # its capacity is back


async def test_it_does_nothing_and_says_so_when_the_call_would_wait(platform):
    """Unknown function, no instance yet, every instance busy: False, with no slot taken, no
    arrival observed, nothing counted; `invoke` then does the waiting."""
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "sc-cold", "handler": f"{H}:sleep"}))
    fn = await _deploy(agent, name="sc-one", handler=f"{H}:sleep", concurrency=1, max_instances=1)
    used = agent.pool.stats()["used"]
    never = Outcomes()
    assert not agent.invoker.start_call("sc-nosuch", b"", done=never)
    cold_arrivals = len(agent.functions["sc-cold"].arrivals)
    assert not agent.invoker.start_call("sc-cold", b"", done=never)  # nothing started for it
    assert len(agent.functions["sc-cold"].arrivals) == cold_arrivals
    assert not agent.functions["sc-cold"].instances and not agent.functions["sc-cold"].starting
    busy = asyncio.create_task(agent.invoke(fn, b'{"seconds": 0.5}', content_type=J))
    await until(lambda: not agent.table.has_free(agent.functions[fn]), "the instance busy")
    arrivals = len(agent.functions[fn].arrivals)
    assert not agent.invoker.start_call(fn, b'{"seconds": 0}', done=never, content_type=J)
    assert len(agent.functions[fn].arrivals) == arrivals
    assert agent.pool.stats()["used"] == used + 1  # only the busy call's slot
    assert (await busy).status == 200
    await asyncio.sleep(0.1)
    assert never.got == []
    out = Outcomes()  # free again: started
    assert agent.invoker.start_call(fn, b'{"seconds": 0}', done=out, content_type=J)
    assert (await out.one()).status == 200


async def test_the_functions_timeout_is_504_and_kills_the_instance(platform):
    agent = platform.agent
    fn = await _deploy(agent, name="sc-hang", handler=f"{H}:sleep", timeout_s=0.5)
    inst = next(iter(agent.functions[fn].instances.values()))
    used, n504 = agent.pool.stats()["used"], _count(agent, fn, 504)
    out = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 30}', done=out, content_type=J)
    err = await out.one()
    assert isinstance(err, InvokeError) and (err.status, err.error) == (504, "timeout")
    assert _count(agent, fn, 504) == n504 + 1
    await until(lambda: not inst.running, "the stuck instance killed")
    await until(lambda: agent.pool.stats()["used"] == used, "its request slot freed")


async def test_a_timed_out_calls_slot_is_freed_only_once_its_instance_cannot_write_it(
    platform, monkeypatch
):
    """The request slot stays the agent's while an instance handles it (the instance takes no
    pool lock on a warm call), so after a timeout the agent frees it only when the instance
    has replied or ended, never while it may still write its reply there: here the kill is
    held back, the slot stays in use until the late reply, which frees it."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-slowkill", handler=f"{H}:sleep", timeout_s=0.3)
    inst = next(iter(agent.functions[fn].instances.values()))
    killed: list[str] = []
    monkeypatch.setattr(agent.invoker, "kill", lambda i, why: killed.append(why))
    used = agent.pool.stats()["used"]
    out = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 1}', done=out, content_type=J)
    err = await out.one()
    assert isinstance(err, InvokeError) and err.status == 504 and killed == ["timeout"]
    assert inst.running and agent.pool.stats()["used"] == used + 1  # still the instance's to use
    await until(lambda: inst.inflight == 0, "the late reply")
    assert agent.pool.stats()["used"] == used


async def test_a_shorter_timeout_only_abandons_the_call(platform):
    """The caller's own shorter timeout: 504 for it, but the instance keeps working and its
    late reply frees the slot and the instance's capacity."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-late", handler=f"{H}:sleep", timeout_s=30)
    inst = next(iter(agent.functions[fn].instances.values()))
    used = agent.pool.stats()["used"]
    out = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 0.6}', done=out, content_type=J, timeout=0.2)
    err = await out.one()
    assert isinstance(err, InvokeError) and err.status == 504
    assert inst.running and inst.inflight == 1  # still at work
    await until(lambda: inst.inflight == 0, "the late reply")
    assert inst.running and agent.pool.stats()["used"] == used


async def test_an_instance_that_dies_mid_call_answers_502_and_frees_the_slot(platform):
    agent = platform.agent
    fn = await _deploy(agent, name="sc-victim", handler=f"{H}:sleep", max_instances=1)
    inst = next(iter(agent.functions[fn].instances.values()))
    used = agent.pool.stats()["used"]
    out = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 10}', done=out, content_type=J)
    await until(lambda: inst.state == "busy", "the call under way")
    await asyncio.sleep(0.2)  # in the handler
    os.kill(inst.pid, signal.SIGKILL)
    err = await out.one()
    assert isinstance(err, InvokeError) and (err.status, err.error) == (502, "instance_died")
    await until(lambda: agent.pool.stats()["used"] <= used, "the slot back in the pool")


async def test_no_slot_for_the_payload_is_429_later_and_nothing_is_held(platform):
    agent = platform.agent
    fn = await _deploy(agent, name="sc-full", handler=f"{H}:sleep")
    held = []
    try:
        while True:  # every slot of the smallest class, then of the others
            held.append(agent.pool.alloc(1))
    except Exception:
        pass
    inst = next(iter(agent.functions[fn].instances.values()))
    try:
        out = Outcomes()
        assert agent.invoker.start_call(fn, b'{"seconds": 0}', done=out, content_type=J)
        assert out.got == []
        err = await out.one()
        assert isinstance(err, InvokeError) and (err.status, err.error) == (429, "no_space")
        assert inst.inflight == 0  # no instance taken for it
    finally:
        for s in held:
            s.release()


async def test_calls_started_from_the_read_are_answered_before_shutdown(redis_server):
    """The gateway's direct calls are in flight in no task: stopping the node still lets them
    answer (the fast path's drain waits for them) before connections close."""
    s = Settings.from_env(port=free_port(), redis_url=redis_server.url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix="hearth-sc-"))
    s.admin_token = "test-token-123456"
    p = await Platform(s, warm_pool_size=0).start()
    try:
        await _deploy(p.agent, name="sc-drain", handler=f"{H}:sleep", concurrency=4)
        body = b'{"seconds": 0.5}'
        raw = (
            b"POST /v1/functions/sc-drain:invoke HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        direct = p.agent.metrics.fast_path_direct.n
        writer.write(raw)
        await until(lambda: p.agent.metrics.fast_path_direct.n == direct + 1, "started")
        stopping = asyncio.create_task(p.stop())
        answer = await asyncio.wait_for(reader.read(65536), 20)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["slept"] == 0.5
        await stopping
        writer.close()
    finally:
        await p.stop()
        shutil.rmtree(s.state, ignore_errors=True)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=1).close()


async def test_the_gateway_starts_no_call_that_already_waited_past_the_bound(platform):
    """The wait bound counts from the read (`gateway.sojourn`): a request that waited past it
    is not started from the read (the task's way answers it 503), one read just now is."""
    import time

    from hearth.gateway.route import InvokeRoute

    agent = platform.agent
    fn = await _deploy(agent, name="sc-bound", handler=f"{H}:sleep")
    route = InvokeRoute(agent, "admin", 1 << 20)
    answers: list = []
    headers = {"Content-Type": J}
    agent.admitter.max_queue_wait_s = 0.05
    try:
        late = time.monotonic() - 1.0
        assert not route.start(fn, headers, b'{"seconds": 0}', late, answers.append)
        assert route.start(fn, headers, b'{"seconds": 0}', time.monotonic(), answers.append)
    finally:
        agent.admitter.max_queue_wait_s = None
    await until(lambda: answers, "the answer")
    assert [a.status for a in answers] == [200]
    assert answers[0].headers["X-Hearth-Invocation"] and answers[0].headers["X-Hearth-Cold"] == "0"


async def test_a_call_woken_from_the_queue_is_not_overtaken_by_a_started_one(platform, monkeypatch):
    """When an instance frees up, the queued call woken for it takes it: a call read in the
    same loop pass does not start on it first (it falls back and queues behind), else a queued
    call could be passed over again and again under steady load (the open-loop p99 grew)."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-queue", handler=f"{H}:sleep", concurrency=1, max_instances=1)
    wake = agent.admitter.wake
    overtook: list[bool] = []
    out = Outcomes()

    def wake_then_read(fs, n=1):  # a request read right as the instance frees up
        # only the wake of the queued call counts: the deploy's own start also wakes (no one
        # waits then, the instance is free), and on a loaded machine it can come after _deploy
        queued_woken = fs is not None and fs.spec.name == fn and bool(fs.waiters)
        wake(fs, n)
        if queued_woken and not overtook:
            overtook.append(agent.invoker.start_call(fn, b'{"seconds": 0}', done=out))

    monkeypatch.setattr(agent.admitter, "wake", wake_then_read)
    first = asyncio.create_task(agent.invoke(fn, b'{"seconds": 0.3}', content_type=J))
    await until(lambda: not agent.table.has_free(agent.functions[fn]), "the instance busy")
    queued = asyncio.create_task(agent.invoke(fn, b'{"seconds": 0}', content_type=J))
    await until(lambda: agent.functions[fn].waiters, "the second call queued")
    assert (await first).status == 200 and (await queued).status == 200
    assert overtook == [False] and out.got == []
    assert not agent.functions[fn].woken  # nothing left behind


async def _call_in_flight(
    agent, fn: str, before: set[tuple[int, int]]
) -> tuple[asyncio.Task, tuple[int, int]]:
    """A one-second call of `fn` under way, and its request slot (slot, gen): the one slot in
    use that was not in `before`."""
    task = asyncio.create_task(agent.invoke(fn, b'{"seconds": 1}', content_type=J))
    await until(lambda: len(_slots_now(agent) - before) == 1, "its request slot")
    return task, _request_slot(agent, before)


def _request_slot(agent, before: set[tuple[int, int]]) -> tuple[int, int]:
    """The one (slot, gen) in use now that was not in `before`."""
    (got,) = _slots_now(agent) - before
    return got


def _slots_now(agent) -> set[tuple[int, int]]:
    pool = agent.pool
    w = ROW_U32
    return {(i, int(pool._u32[i * w + 2])) for i in range(pool.nslots) if pool._u32[i * w]}


async def test_a_reply_naming_another_calls_request_slot_frees_and_reads_nothing(platform):
    """The request slot stays the agent's while an instance works in it, so the agent's owner
    check cannot tell it from a reply to drop: a REPLY any instance sends naming it (with a
    correlation id nobody waits for, or its own call's) must neither free it (the next
    allocation would hand it to another function while the victim still reads it) nor be read
    as the other call's answer. The sender's own call gets 502 bad_reply; the victim is fine."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-held", handler=f"{H}:sleep")
    other = await _deploy(agent, name="sc-stray", handler=f"{H}:sleep")
    stray = next(iter(agent.functions[other].instances.values()))
    before = _slots_now(agent)
    victim, (slot, gen) = await _call_in_flight(agent, fn, before)
    out = Outcomes()  # the sender's own call, under way
    assert agent.invoker.start_call(other, b'{"seconds": 1}', done=out, content_type=J)
    (own,) = stray.pending
    for corr in (os.urandom(16), own):  # src as the proxy stamps it
        agent.link.dispatch(
            Descriptor(dst=0, src=stray.eid, kind=Kind.REPLY, slot=slot, gen=gen, corr=corr)
        )
        assert agent.pool.owner(slot, gen) == _agents(agent.pool), "the victim's slot was freed"
    err = await out.one()
    assert isinstance(err, InvokeError) and (err.status, err.error) == (502, "bad_reply")
    res = await victim
    assert res.status == 200 and json.loads(res.body)["slept"] == 1  # its own payload
    await until(lambda: stray.inflight == 0, "the stray instance's late reply")
    await until(lambda: _slots_now(agent) <= before, "every slot back")


async def test_a_cancelled_invoke_whose_instance_dies_gives_its_slot_back(platform):
    """The caller of `invoke` is cancelled (a consumer stopping), then the instance dies
    before replying: the request slot, still the agent's, is freed at its exit."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-cancel", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    before = _slots_now(agent)
    task = asyncio.create_task(agent.invoke(fn, b'{"seconds": 10}', content_type=J))
    await until(lambda: inst.state == "busy", "the call under way")
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    os.kill(inst.pid, signal.SIGKILL)
    await until(lambda: not inst.running, "the instance gone")
    await until(lambda: _slots_now(agent) <= before, "the request slot back")


async def test_an_answer_elsewhere_gives_the_request_slot_back(platform):
    """An instance answers its call with an ERROR and never releases the request slot (the
    agent's: nothing reclaims it at the instance's exit): the agent frees it on the answer."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-keeper", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    before = _slots_now(agent)
    task = asyncio.create_task(agent.invoke(fn, b'{"seconds": 1}', content_type=J))
    await until(lambda: inst.state == "busy", "the call under way")
    await asyncio.sleep(0.3)
    (key,) = inst.pending
    agent.link.dispatch(
        Descriptor(dst=0, src=inst.eid, kind=Kind.ERROR, status=5, aux=500, corr=key)
    )
    with pytest.raises(InvokeError):
        await task
    assert _slots_now(agent) <= before  # freed at once, not left to an exit that frees nothing
    await asyncio.sleep(1.2)  # the handler's own reply comes late and is dropped
    assert _slots_now(agent) <= before


async def test_a_done_callback_that_raises_leaves_no_slot_and_no_call_uncounted(platform):
    agent = platform.agent
    fn = await _deploy(agent, name="sc-raiser", handler=f"{H}:sleep")
    before, ok = _slots_now(agent), _count(agent, fn, 200)
    calls = []

    def done(out):
        calls.append(out)
        raise ConnectionResetError("the transport closed")

    assert agent.invoker.start_call(fn, b'{"seconds": 0}', done=done, content_type=J)
    await until(lambda: calls, "the outcome")
    assert isinstance(calls[0], InvokeResult) and _count(agent, fn, 200) == ok + 1
    assert _slots_now(agent) <= before


def _in_flight(agent, key: bytes) -> bool:
    """Whether the link still holds call `key` anywhere (its table of calls or of request slots)."""
    link = agent.link
    return key in link.pending or key in set(link.requests.values())


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_a_call_given_up_in_the_loop_pass_its_reply_comes_is_not_put_back(
    platform, monkeypatch, how
):
    """The caller of `invoke` is cancelled, or its deadline passes, in the very loop pass its
    reply is read (before it resumes): the reply frees the slot and returns the instance's
    capacity, and nothing of the call is left in flight (it was put back as abandoned, held
    until the instance's exit, and a second reply with its key would have counted the instance
    free twice)."""
    agent = platform.agent
    fn = await _deploy(agent, name=f"sc-window-{how}", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    before = _slots_now(agent)
    task = asyncio.create_task(agent.invoke(fn, b'{"seconds": 0.3}', content_type=J, timeout=5))
    await until(lambda: inst.state == "busy", "the call under way")
    (key,) = inst.pending
    dispatch = agent.link.dispatch

    def give_up_first(d):
        if bytes(d.corr) == key and d.kind == Kind.REPLY:
            if how == "cancel":
                task.cancel()  # its future is cancelled now; the task resumes later
            else:
                agent.link.pending[key].future.set_exception(TimeoutError())  # the deadline
        dispatch(d)

    monkeypatch.setattr(agent.link, "dispatch", give_up_first)
    if how == "cancel":
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(InvokeError) as e:
            await task
        assert e.value.status == 504
    await asyncio.sleep(0.05)
    assert not _in_flight(agent, key) and key not in inst.pending
    assert inst.inflight == 0 and inst.running
    assert _slots_now(agent) <= before


async def test_a_shorter_timeout_still_stops_a_hung_handler_at_the_functions_timeout(platform):
    """A caller's shorter `?timeout=` only abandons the call; if the handler then hangs, the
    function's own timeout (from dispatch) stops the instance as a timeout would, and its slot
    is freed: the instance was held for good (a handler sleeping 30 s stands for it)."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-hang-short", handler=f"{H}:sleep", timeout_s=1.0)
    inst = next(iter(agent.functions[fn].instances.values()))
    before = _slots_now(agent)
    out = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 30}', done=out, content_type=J, timeout=0.2)
    err = await out.one()
    assert isinstance(err, InvokeError) and err.status == 504
    assert inst.running  # the caller's own timeout kills nothing
    await until(lambda: not inst.running, "the hung instance stopped", timeout=15)
    await until(lambda: _slots_now(agent) <= before, "its request slot freed")
    # and a handler that finishes within the function's timeout is left alone
    fn2 = await _deploy(agent, name="sc-late-ok", handler=f"{H}:sleep", timeout_s=1.0)
    inst2 = next(iter(agent.functions[fn2].instances.values()))
    out = Outcomes()
    assert agent.invoker.start_call(fn2, b'{"seconds": 0.4}', done=out, content_type=J, timeout=0.1)
    assert (await out.one()).status == 504
    await asyncio.sleep(1.5)  # past the function's timeout
    assert inst2.running and inst2.inflight == 0


async def test_reports_and_chained_calls_naming_another_calls_slot_read_and_free_nothing(
    platform, monkeypatch
):
    """Any instance can name any slot. A report (PONG) or a chained call (INVOKE, lent or not)
    naming another call's request slot in flight, or a slot the agent holds for something else
    (a reply handed over, a body being streamed in), is neither read nor freed nor sent on: the
    victim's call returns its own payload, no function is called with it, and the sender's
    chained call is refused (400). A stray reply naming such a slot frees nothing either."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    fn = await _deploy(agent, name="sc-victim2", handler=f"{H}:sleep")
    other = await _deploy(agent, name="sc-forger", handler=f"{H}:sleep")
    forger = next(iter(agent.functions[other].instances.values()))
    before = _slots_now(agent)
    victim, (slot, gen) = await _call_in_flight(agent, fn, before)
    sent = agent.link.pending[agent.link.requests[(slot, gen)]].sent
    # the agent's, in no call (a reply handed over, a body being streamed in), readable
    held, held_mlen, _ = write_slot(agent.pool, {"type": "ready", "phases": {}}, b"")
    reports, forwarded = [], []
    monkeypatch.setattr(agent.link, "on_report", lambda eid, meta: reports.append(meta))
    forward = agent.link.forward

    async def record_forward(inst, d, *a, **kw):
        forwarded.append(d)
        return await forward(inst, d, *a, **kw)

    monkeypatch.setattr(agent.link, "forward", record_forward)
    for s, g, mlen in ((slot, gen, sent.meta_len), (held.index, held.gen, held_mlen)):
        for kind, flags in (
            (Kind.PONG, Flags.NONE),
            (Kind.INVOKE, Flags.NONE),
            (Kind.INVOKE, Flags.BORROWED),
            (Kind.REPLY, Flags.NONE),
        ):
            agent.link.dispatch(
                Descriptor(
                    dst=0,
                    src=forger.eid,  # as the proxy stamps it
                    kind=kind,
                    flags=flags,
                    slot=s,
                    gen=g,
                    meta_len=mlen,
                    corr=os.urandom(16),
                )
            )
            await asyncio.sleep(0.05)  # a chained call is routed in a task
            assert agent.pool.owner(s, g) == _agents(agent.pool), (kind, flags, "freed")
    assert reports == [] and forwarded == []
    res = await victim
    assert res.status == 200 and json.loads(res.body)["slept"] == 1  # its own payload
    held.release()
    await until(lambda: _slots_now(agent) <= before, "every slot back")


async def test_a_reply_read_after_its_instances_exit_was_handled_still_frees_its_slot(platform):
    """What a stray reply may not free, a late reply of a call the link settled without it
    still does: the reply an instance sent just before it ended, read after its exit was
    handled (its call answered 502), has its slot freed, and so does a reply the proxy
    bounces back (it can only be what the agent sent)."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    fn = await _deploy(agent, name="sc-exit-first", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    before = _slots_now(agent)
    task = asyncio.create_task(agent.invoke(fn, b'{"seconds": 0.5}', content_type=J))
    await until(lambda: inst.state == "busy", "the call under way")
    (key,) = inst.pending
    reply, mlen, blen = write_slot(agent.pool, {"status": 200}, b"late")
    _handed_over(agent.pool, reply, inst.ident)
    await agent.link.fail_pending(inst, -9)  # its exit, handled before its reply is read
    with pytest.raises(InvokeError) as e:
        await task
    assert e.value.status == 502
    agent.link.dispatch(
        reply.descriptor(0, inst.eid, Kind.REPLY, length=blen, meta_len=mlen, corr=key)
    )
    assert agent.pool.owner(reply.index, reply.gen) is None  # freed
    bounced, _, _ = write_slot(agent.pool, {"status": 500}, b"")
    agent.link.dispatch(bounced.descriptor(0, inst.eid, Kind.REPLY, corr=os.urandom(16)).bounce(1))
    assert agent.pool.owner(bounced.index, bounced.gen) is None
    await until(lambda: _slots_now(agent) <= before, "every slot back")  # its real reply too
    agent.invoker.kill(inst, "test done")


async def test_a_reply_whose_handler_time_is_not_a_number_is_502_and_its_slot_freed(platform):
    """The reply's `t` (the handler's own time) is the function's to write: a value that is not a
    number is a 502 `bad_reply` like the other fields, and the reply slot is freed (it was left
    held for good on the task-free path)."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    fn = await _deploy(agent, name="sc-badtime", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    before = _slots_now(agent)
    out = Outcomes()
    assert agent.start_call(fn, b'{"seconds": 1}', done=out, content_type=J)
    await until(lambda: inst.state == "busy", "the call under way")
    (key,) = inst.pending
    slot, mlen, blen = write_slot(agent.pool, {"status": 200, "t": "soon"}, b"x")
    _handed_over(agent.pool, slot, inst.ident)
    agent.link.dispatch(
        slot.descriptor(0, inst.eid, Kind.REPLY, length=blen, meta_len=mlen, corr=key)
    )
    res = await out.one()
    assert isinstance(res, InvokeError) and (res.status, res.error) == (502, "bad_reply"), res
    await asyncio.sleep(1.2)  # the handler's own reply comes late and is dropped
    assert _slots_now(agent) <= before


def _spins(agent) -> tuple[float, float]:
    m = agent.metrics
    return m.spins.labels("hit")._value.get(), m.spins.labels("miss")._value.get()


def _serial_posts(port: int, fn: str, n: int) -> list[tuple[int, bytes, bytes]]:
    """`n` invokes one after another on one keep-alive connection (a client's thread)."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    got = []
    try:
        for i in range(n):
            body = b"call %d" % i
            c.request("POST", f"/v1/functions/{fn}:invoke", body=body)
            r = c.getresponse()
            got.append((r.status, body, r.read()))
    finally:
        c.close()
    return got


async def test_serial_warm_calls_over_http_spin_for_their_replies_and_answer_right(platform):
    """The agent busy-polls for a lone warm call's reply (`hearth.agent.spin`): a client's
    serial calls over HTTP (the gateway's fast path, `start_call`) each get their own answer,
    and the spins see replies (hits). The cap is raised for this test so that a loaded
    machine's uneven round trips still hit (the default, 150 us, is what a quiet node needs):
    a function never seen spins for its first lone calls."""
    from hearth.agent.spin_policy import SpinConfig

    agent = platform.agent
    spin = agent.link.spin
    assert spin is not None  # opted in (HEARTH_SPIN_US)
    cfg, spin.cfg = spin.cfg, SpinConfig(cap_s=0.05)
    try:
        fn = await _deploy(agent, name="sc-spin", handler=f"{H}:echo", concurrency=8)
        hits, misses = _spins(agent)
        got = await asyncio.to_thread(_serial_posts, platform.settings.port, fn, 30)
    finally:
        spin.cfg = cfg
    assert [(s, b) for s, b, _ in got] == [(200, b) for _, b, _ in got]
    assert all(answer == body for _, body, answer in got)  # each call its own reply
    hits2, misses2 = _spins(agent)
    assert hits2 > hits, (hits2 - hits, misses2 - misses)
    books = spin.books[fn]
    assert len(books.spun) == spin.cfg.window and len(books.slept) == spin.cfg.window


async def test_concurrent_calls_never_spin(platform):
    """Calls in flight together never spin (the CPU a spin would take is theirs and their
    instances'), and all of them are answered."""
    from hearth.agent.spin_policy import FunctionSpin, SpinConfig

    agent = platform.agent
    spin = agent.link.spin
    assert spin is not None
    cfg, spin.cfg = spin.cfg, SpinConfig(cap_s=0.05)
    try:
        fn = await _deploy(agent, name="sc-nospin", handler=f"{H}:echo", concurrency=64)
        assert (await agent.invoke(fn, b"alone")).status == 200  # (its first: cold)
        spin.books[fn] = on = FunctionSpin((1e-4,) * 5, (1e-3,) * 5)  # a lone call would spin
        before = _spins(agent)
        for _ in range(3):
            res = await asyncio.gather(*(agent.invoke(fn, b"%d" % i) for i in range(16)))
            assert [r.body for r in res] == [b"%d" % i for i in range(16)]
        assert _spins(agent) == before
        assert spin.books[fn] == on  # nothing learnt from them
    finally:
        spin.cfg = cfg


def _handed_over(pool, slot, ident: tuple[int, int]) -> None:
    """The row as after `give_to_creator` in process `ident` (pid, start time; the test writes
    the slot itself)."""
    pool._u32[slot.index * ROW_U32 + 5], pool._u64[slot.index * ROW_U64 + 4] = ident


def _agents(pool) -> tuple[int, int]:
    """The agent as a slot's owner: its pid and start time."""
    return pool.creator_pid, pool.creator_start


def _own(pool, slot, ident: tuple[int, int]) -> None:
    """The row as after an `alloc` or `adopt` in process `ident`."""
    pool._u32[slot.index * ROW_U32 + 3], pool._u64[slot.index * ROW_U64 + 3] = ident


async def test_an_abandoned_calls_late_reply_frees_only_its_own_slots(platform):
    """A late reply to a call its client gave up on (a short ?timeout=) frees its request
    slot or a slot its instance handed over, never another slot the agent holds (another
    call's reply not read yet, a body being streamed in)."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    fn = await _deploy(agent, name="sc-aband-stray", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    out = Outcomes()  # the client gives up after 0.1 s: the call is abandoned, still pending
    assert agent.invoker.start_call(fn, b'{"seconds": 1}', done=out, content_type=J, timeout=0.1)
    assert (await out.one()).status == 504
    (key,) = inst.pending
    held, _, _ = write_slot(agent.pool, {"status": 200}, b"someone else's reply, unread")
    agent.link.dispatch(
        Descriptor(dst=0, src=inst.eid, kind=Kind.REPLY, slot=held.index, gen=held.gen, corr=key)
    )
    assert agent.pool.owner(held.index, held.gen) == _agents(agent.pool), (
        "an agent-held slot was freed"
    )
    agent.link.free(held.index, held.gen)
    agent.invoker.kill(inst, "test done")


async def test_a_second_reply_frees_only_a_slot_its_instance_handed_over(platform):
    """A call answered in a slot of the instance's own is remembered (a faulty second answer
    is freed): a second reply with its key frees a slot that instance handed over, never the
    first reply (its caller may still read it) nor another slot the agent holds."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    fn = await _deploy(agent, name="sc-second-stray", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    task = asyncio.create_task(agent.invoke(fn, b'{"seconds": 0.5}', content_type=J))
    await until(lambda: inst.state == "busy", "the call under way")
    (key,) = inst.pending
    own, mlen, blen = write_slot(agent.pool, {"status": 200}, b"my answer")
    _handed_over(agent.pool, own, inst.ident)
    first = own.descriptor(0, inst.eid, Kind.REPLY, length=blen, meta_len=mlen, corr=key)
    agent.link.dispatch(first)
    agent.link.dispatch(first)  # the same again, before its caller has read it
    assert agent.pool.owner(own.index, own.gen) == _agents(agent.pool), "the answer was freed"
    assert (await task).status == 200
    held, _, _ = write_slot(agent.pool, {"status": 200}, b"someone else's reply, unread")
    agent.link.dispatch(
        Descriptor(dst=0, src=inst.eid, kind=Kind.REPLY, slot=held.index, gen=held.gen, corr=key)
    )
    assert agent.pool.owner(held.index, held.gen) == _agents(agent.pool), (
        "an agent-held slot was freed"
    )
    _handed_over(agent.pool, held, inst.ident)  # now as if that instance had handed it over
    agent.link.dispatch(
        Descriptor(dst=0, src=inst.eid, kind=Kind.REPLY, slot=held.index, gen=held.gen, corr=key)
    )
    assert agent.pool.owner(held.index, held.gen) is None  # a faulty second answer: freed


async def test_a_reply_taken_as_an_answer_cannot_be_claimed_by_its_instance_again(platform):
    """Once the agent took a handed-over slot as one call's answer, the slot names no hander:
    the same instance's reply to another of its calls naming it is 502 and neither read nor
    freed (before: read as that call's answer too, then freed while the first caller still
    read it; found in review)."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    fn = await _deploy(agent, name="sc-taken", handler=f"{H}:sleep", concurrency=2)
    inst = next(iter(agent.functions[fn].instances.values()))
    t1 = asyncio.create_task(agent.invoke(fn, b'{"seconds": 0.5}', content_type=J))
    await until(lambda: len(inst.pending) == 1, "the first call under way")
    (k1,) = inst.pending
    o2 = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 0.5}', done=o2, content_type=J)
    (k2,) = inst.pending - {k1}
    own, mlen, blen = write_slot(agent.pool, {"status": 200}, b"the first call's answer")
    _handed_over(agent.pool, own, inst.ident)
    for k in (k1, k2):  # the second: a faulty instance naming the slot already taken
        agent.link.dispatch(
            own.descriptor(0, inst.eid, Kind.REPLY, length=blen, meta_len=mlen, corr=k)
        )
    assert agent.pool.owner(own.index, own.gen) == _agents(agent.pool), "the first answer was freed"
    err = await o2.one()
    assert isinstance(err, InvokeError) and (err.status, err.error) == (502, "bad_reply"), err
    assert (await t1).status == 200  # its caller holds the answer's slot while it reads it
    await until(lambda: inst.inflight == 0 and not inst.pending, "its own late replies")


async def test_a_chained_call_naming_another_instances_slot_reads_and_frees_nothing(platform):
    """A chained call may send on a slot its own process owns, not one another instance owns
    (its ctx.alloc buffer, a reply it is writing): that is refused, neither read nor freed."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    victim_fn = await _deploy(agent, name="sc-victim-slot", handler=f"{H}:sleep")
    forger_fn = await _deploy(agent, name="sc-forger-slot", handler=f"{H}:sleep")
    victim = next(iter(agent.functions[victim_fn].instances.values()))
    forger = next(iter(agent.functions[forger_fn].instances.values()))
    s, _, _ = write_slot(agent.pool, {"not": "a chained call"}, b"victim's private bytes")
    _own(agent.pool, s, victim.ident)  # owned by the victim, as after its alloc
    d = Descriptor(
        dst=0, src=forger.eid, kind=Kind.INVOKE, slot=s.index, gen=s.gen, corr=os.urandom(16)
    )
    assert not agent.link.lendable(d, forger.ident)
    assert agent.link.lendable(d, victim.ident)  # its own slot is the victim's to send on
    await agent.invoker.route(d)  # unreadable metadata: freed if it were taken as the caller's
    assert agent.pool.owner(s.index, s.gen) == victim.ident, "another instance's slot was freed"
    _own(agent.pool, s, _agents(agent.pool))
    agent.link.free(s.index, s.gen)


async def test_a_shorter_timeouts_overrun_timer_ends_with_its_late_reply(platform):
    """A call its client gave up on early keeps a timer for the function's own timeout (to
    stop a hung handler); the late reply settles the call and cancels it: no handle is held
    for the rest of timeout_s (up to a day) per such call."""
    agent = platform.agent
    fn = await _deploy(
        agent, name="sc-overrun-timers", handler=f"{H}:sleep", timeout_s=3600, concurrency=4
    )
    inst = next(iter(agent.functions[fn].instances.values()))
    loop = asyncio.get_running_loop()

    def overran() -> int:
        return sum(
            1
            for h in loop._scheduled
            if not h.cancelled() and getattr(h._callback, "__name__", "") == "_overran"
        )

    before = overran()
    outs = [Outcomes() for _ in range(4)]  # one per unit of its concurrency, all at once
    for out in outs:
        assert agent.invoker.start_call(
            fn, b'{"seconds": 0.5}', done=out, content_type=J, timeout=0.05
        )
    for out in outs:
        assert (await out.one()).status == 504
    assert overran() - before >= 1  # late replies still to come: their timers are on
    await until(lambda: inst.inflight == 0 and not inst.pending, "every late reply read")
    assert overran() - before == 0, f"{overran() - before} timers left for settled calls"


async def test_a_reply_naming_a_slot_the_agent_holds_for_another_is_502_and_untouched(platform):
    """An instance's answer to its own call in flight may name its request slot or a slot it
    handed over; one naming a slot the agent holds for something else (another instance's
    reply not read yet, a body being streamed in) is neither read as its answer (that would
    hand another function's bytes to its client) nor freed: its call answers 502 bad_reply."""
    from hearth.runtime.instance import write_slot

    agent = platform.agent
    fn = await _deploy(agent, name="sc-held-other", handler=f"{H}:sleep")
    inst = next(iter(agent.functions[fn].instances.values()))
    out = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 0.5}', done=out, content_type=J)
    (key,) = inst.pending
    held, mlen, blen = write_slot(agent.pool, {"status": 200}, b"another function's reply")
    agent.link.dispatch(
        held.descriptor(0, inst.eid, Kind.REPLY, length=blen, meta_len=mlen, corr=key)
    )
    err = await out.one()
    assert isinstance(err, InvokeError) and (err.status, err.error) == (502, "bad_reply")
    assert agent.pool.owner(held.index, held.gen) == _agents(agent.pool), (
        "an agent-held slot was freed"
    )
    agent.link.free(held.index, held.gen)
    await until(lambda: inst.inflight == 0 and not inst.pending, "its own late reply")


async def test_a_second_reply_after_an_answer_in_the_request_slot_frees_its_slot_once(
    platform, tmp_path
):
    agent = platform.agent
    spec = {
        "name": "sr-faulty",
        "handler": "faulty_handlers:second_reply",
        "code_path": str(Path(__file__).parent),
    }
    await agent.deploy(parse_spec(spec))
    out = tmp_path / "second-slot"
    res = await agent.invoke("sr-faulty", str(out).encode(), content_type="text/plain")
    assert res.status == 200 and bytes(res.body) == b"first"  # the first answer, untouched
    await until(out.exists, "the instance's second reply")
    i, g = (int(v) for v in out.read_text().split())
    pool = agent.pool
    # leaked before: the agent's, handed over by the instance, never read nor freed
    await until(lambda: pool.owner(i, g) is None, "the second reply's slot to be freed", 10)
    assert pool._u32[i * ROW_U32 + 2] == (g + 1) & 0xFFFFFFFF  # freed once: one generation on
    # the same stray naming a slot another process handed over frees nothing
    (inst,) = agent.functions["sr-faulty"].instances.values()
    other = pool.alloc(10)
    pool.give_to_creator(other.index, other.gen)  # handed over by this process, not the instance
    stray = Descriptor(
        dst=0, src=inst.eid, kind=Kind.REPLY, slot=other.index, gen=other.gen, corr=os.urandom(16)
    )
    agent.link.dispatch(stray)
    assert pool.owner(other.index, other.gen) == (pool.creator_pid, pool.creator_start)
    # ... and naming one the instance handed over, once: freed; a repeat is stale, nothing more
    pool._u32[other.index * ROW_U32 + 5] = inst.ident[0]
    pool._u64[other.index * ROW_U64 + 4] = inst.ident[1]
    agent.link.dispatch(stray)
    assert pool.owner(other.index, other.gen) is None
    agent.link.dispatch(stray)
    assert pool._u32[other.index * ROW_U32 + 2] == (other.gen + 1) & 0xFFFFFFFF


async def test_a_stray_reply_read_after_its_instances_exit_still_frees_what_it_handed_over(
    platform,
):
    """The instance's exit may be handled before its last descriptors are read: its endpoint
    still names its process for a while, so a slot it handed over is freed then too."""
    agent = platform.agent
    await agent.deploy(
        parse_spec({"name": "sr-exits", "handler": "hearth.functions.examples.handlers:echo"})
    )
    assert (await agent.invoke("sr-exits", b"x", content_type="text/plain")).status == 200
    (inst,) = agent.functions["sr-exits"].instances.values()
    ident, pool = inst.ident, agent.pool
    inst.kill()
    await until(lambda: inst.eid not in agent.table.by_eid, "its exit to be handled")
    s = pool.alloc(10)
    pool.give_to_creator(s.index, s.gen)
    pool._u32[s.index * ROW_U32 + 5], pool._u64[s.index * ROW_U64 + 4] = ident  # (as its own)
    agent.link.dispatch(
        Descriptor(dst=0, src=inst.eid, kind=Kind.REPLY, slot=s.index, gen=s.gen, corr=b"k" * 16)
    )
    assert pool.owner(s.index, s.gen) is None


async def test_a_started_calls_metadata_is_not_padded_and_reaches_the_handler(platform):
    """`start_call` never rewrites the metadata after a wait (`invoke` does, in its 512-byte
    reserve): it writes the msgpack map alone, so the instance reads it without the padding's
    `ExtraData` (#19), and the handler still gets every field of it."""
    agent = platform.agent
    fn = await _deploy(agent, name="sc-meta", handler=f"{H}:triage")
    out = Outcomes()
    (inst,) = agent.functions[fn].instances.values()
    # stopped while the slot is read: its reply may be written into the request slot
    os.kill(inst.pid, signal.SIGSTOP)
    try:
        started = agent.invoker.start_call(
            fn,
            b"hi",
            done=out,
            content_type="text/plain",
            headers={"x-tag": "t1"},
            idempotency_key="k-1",
            invocation_id="inv-meta",
        )
        assert started
        (sent,) = [p.sent for p in agent.link.pending.values() if p.inst.function == fn]
        meta = msgpack.unpackb(agent.pool.view(sent.slot, sent.gen, sent.meta_len))  # no ExtraData
    finally:
        os.kill(inst.pid, signal.SIGCONT)
    assert sent.meta_len == len(pack_meta(meta)) < META_RESERVE
    assert meta["invocation_id"] == "inv-meta" and meta["function"] == fn
    res = await out.one()
    assert isinstance(res, InvokeResult) and res.status == 200
    got = json.loads(res.body)
    assert (got["payload"], got["key"], got["invocation"]) == ("hi", "k-1", "inv-meta")
    assert got["headers"] == {"x-tag": "t1"} and got["content_type"] == "text/plain"
