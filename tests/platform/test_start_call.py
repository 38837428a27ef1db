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
import signal
import socket
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio
from hearth.config import Settings
from hearth.invoke import InvokeError, InvokeResult
from hearth.redis_server import free_port
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
    async with Platform(s, warm_pool_size=0) as p:
        yield p


class Outcomes:
    """A `done` callback that records what it was given, and when."""

    def __init__(self) -> None:
        self.got: list[InvokeResult | InvokeError] = []
        self.came = asyncio.Event()

    def __call__(self, out: InvokeResult | InvokeError) -> None:
        self.got.append(out)
        self.came.set()

    async def one(self, timeout: float = 30) -> InvokeResult | InvokeError:
        await asyncio.wait_for(self.came.wait(), timeout)
        await asyncio.sleep(0.05)  # a second call, if any, would come meanwhile
        assert len(self.got) == 1, self.got
        return self.got[0]


def _count(agent, function: str, status: int) -> float:
    return agent.metrics.invocations.labels(function, str(status))._value.get()


async def _deploy(agent, **spec) -> str:
    await agent.deploy(parse_spec(spec))
    res = await agent.invoke(spec["name"], b'{"seconds": 0}', content_type=J)
    assert res.status == 200  # an instance, warm and free
    return spec["name"]


async def _until(cond, what: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


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
    await _until(lambda: not agent.table.has_free(agent.functions[fn]), "the instance busy")
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
    await _until(lambda: not inst.running, "the stuck instance killed")
    await _until(lambda: agent.pool.stats()["used"] == used, "its request slot freed")


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
    await _until(lambda: inst.inflight == 0, "the late reply")
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
    await _until(lambda: inst.inflight == 0, "the late reply")
    assert inst.running and agent.pool.stats()["used"] == used


async def test_an_instance_that_dies_mid_call_answers_502_and_frees_the_slot(platform):
    agent = platform.agent
    fn = await _deploy(agent, name="sc-victim", handler=f"{H}:sleep", max_instances=1)
    inst = next(iter(agent.functions[fn].instances.values()))
    used = agent.pool.stats()["used"]
    out = Outcomes()
    assert agent.invoker.start_call(fn, b'{"seconds": 10}', done=out, content_type=J)
    await _until(lambda: inst.state == "busy", "the call under way")
    await asyncio.sleep(0.2)  # in the handler
    os.kill(inst.pid, signal.SIGKILL)
    err = await out.one()
    assert isinstance(err, InvokeError) and (err.status, err.error) == (502, "instance_died")
    await _until(lambda: agent.pool.stats()["used"] <= used, "the slot back in the pool")


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
        direct = p.agent.metrics.fast_path_direct._value.get()
        writer.write(raw)
        await _until(lambda: p.agent.metrics.fast_path_direct._value.get() == direct + 1, "started")
        stopping = asyncio.create_task(p.stop())
        answer = await asyncio.wait_for(reader.read(65536), 20)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["slept"] == 0.5
        await stopping
        writer.close()
    finally:
        await p.stop()
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
    await _until(lambda: answers, "the answer")
    assert [a.status for a in answers] == [200]
    assert answers[0].headers["X-Hearth-Invocation"] and answers[0].headers["X-Hearth-Cold"] == "0"
