"""The local backend passes the controller's backend contract with real processes; with three
simulated nodes, placement packs an affinity group and warm-pool cold starts skip phases."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))
import backend_contract  # noqa: E402
from backend_contract import BackendContract  # noqa: E402
from hearth.config import Settings
from hearth.invoke import BatchItem, InvokeError
from hearth.local_backend import LocalBackend
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform
from realnode import check_dataplane

H = "hearth.functions.examples.handlers"


@pytest.fixture
async def platform(redis_url):
    s = Settings.from_env(port=free_port(), redis_url=redis_url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix="hearth-lb-"))
    s.admin_token = "test-token-123456"
    s.nodes = "node-a:1000:1024,node-b:1000:1024,node-c:1000:1024"
    try:
        async with Platform(s, warm_pool_size=0) as p:
            check_dataplane("auto", p.agent.mode, s.state)
            yield p
    finally:
        shutil.rmtree(s.state, ignore_errors=True)


@pytest.fixture(autouse=True)
def real_handler(monkeypatch):
    """The contract's spec names a placeholder handler; real processes need a real one."""
    monkeypatch.setattr(
        backend_contract,
        "contract_spec",
        lambda name="contract-fn": parse_spec(
            {
                "name": name,
                "handler": f"{H}:noop",
                "resources": {"memory_mb": 128, "cpu_millicores": 100},
            }
        ),
    )


class TestLocalBackendContract(BackendContract):
    @pytest.fixture
    async def backend(self, platform):
        yield LocalBackend(platform.agent)


async def test_affinity_group_packs_onto_fewest_nodes(platform):
    agent = platform.agent
    group = [
        parse_spec(
            {
                "name": f"agg-{i}",
                "handler": f"{H}:noop",
                "affinity_group": "tree",
                "resources": {"cpu_millicores": 250, "memory_mb": 256},
            }
        )
        for i in range(6)
    ]
    for spec in group:
        await agent.deploy(spec)
        await agent.invoke(spec.name, b"")  # cold start: placement decides the node
    nodes = [i.node for spec in group for i in agent.functions[spec.name].instances.values()]
    assert len(nodes) == 6
    # 4 × 250m fill one 1000m node; the remaining 2 go together on a second: ⌈6/4⌉ = 2 nodes
    assert len(set(nodes)) == 2
    assert sorted(nodes.count(n) for n in set(nodes)) == [2, 4]


async def test_no_capacity_is_a_clear_429(platform):
    big = parse_spec(
        {
            "name": "too-big",
            "handler": f"{H}:noop",
            "resources": {"cpu_millicores": 5000, "memory_mb": 256},
        }
    )
    await platform.agent.deploy(big)
    from hearth.invoke import InvokeError

    with pytest.raises(InvokeError) as e:
        await platform.agent.invoke("too-big", b"")
    assert (
        e.value.status == 429
        and e.value.error == "no_capacity"
        and "no node has 5000m" in str(e.value)
    )


async def test_warm_pool_start_reuses_the_pooled_process(platform):
    """A pool start specialises a process that was already running (no fork): its process
    started before the request did, and it is the pool instance's own pid. A fresh start forks
    after the request. Causal order and identity, not which one was faster."""
    agent = platform.agent
    spec = parse_spec({"name": "pooled-fn", "handler": f"{H}:hello"})
    await agent.deploy(spec)
    pool_inst = await agent.start_pool_instance("node-a")
    pool_pid, pool_phases = pool_inst.pid, dict(pool_inst.phases)
    pooled = await agent.start_instance(spec, node="node-a")
    fresh = await agent.start_instance(spec, node="node-a", use_pool=False)
    assert pooled.pid == pool_pid and fresh.pid != pool_pid
    recs = {r["instance"]: r for r in agent.cold_starts}
    p, f = recs[pooled.id]["phases"], recs[fresh.id]["phases"]
    assert recs[pooled.id]["from_pool"] and not recs[fresh.id]["from_pool"]
    assert pool_phases["process_started"] <= p["requested"]  # already up when asked for
    assert p["spawned"] <= p["process_started"]  # the hand-over: code import after the ask
    assert f["requested"] <= f["spawned"] <= f["process_started"]  # forked for this request
    assert p["requested"] <= p["ready"] and f["process_started"] <= f["ready"]


async def test_invoke_batch_gives_each_event_its_own_outcome(platform):
    """Several events in one round trip: each gets its own handler call, key, headers and
    outcome (a 422, a 500 and a chained call among them), in order, and nothing leaks."""
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "triage", "handler": f"{H}:triage", "concurrency": 4}))
    await agent.deploy(parse_spec({"name": "echo", "handler": f"{H}:echo"}))
    for _ in range(3):  # measured as fast: from now on backlogs are batched
        assert (await agent.invoke("triage", b"warm")).status == 200
    assert agent.functions["triage"].service_s is not None
    used_before = agent.pool.stats()["used"]
    batched = agent.metrics.batched_events.labels("triage")
    before = batched._value.get()
    payloads = [b"a", b"reject", b"b", b"raise", b"chain", b"c"]
    items = [
        BatchItem(p, "text/plain", {"x-n": str(i)}, f"key-{i}") for i, p in enumerate(payloads)
    ]
    outs = await agent.invoke_batch("triage", items, max_batch=32)
    assert batched._value.get() - before == len(items)  # one instance ready: one batch of 6
    assert [o.status for o in outs] == [200, 422, 200, 500, 200, 200]
    assert len({o.instance_id for o in outs}) == 1
    ok = {i: json.loads(outs[i].body) for i in (0, 2, 4, 5)}
    for i, body in ok.items():
        assert body["payload"] == payloads[i].decode()
        assert body["key"] == f"key-{i}" and body["headers"]["x-n"] == str(i)
        assert body["content_type"] == "text/plain"
    assert len({b["invocation"] for b in ok.values()}) == 4  # one invocation id per event
    assert ok[4]["chained"] == "via-chain"
    assert json.loads(outs[1].body)["detail"] == "rejected on request"
    assert "asked to fail" in json.loads(outs[3].body)["detail"]
    # the instance survived its failing events, and no slot is left behind
    assert (await agent.invoke("triage", b"after")).status == 200
    assert agent.pool.stats()["used"] == used_before


async def test_invoke_batch_unknown_function_and_unmeasured_function(platform):
    agent = platform.agent
    outs = await agent.invoke_batch("nope", [BatchItem(b"x"), BatchItem(b"y")])
    assert [getattr(o, "status", None) for o in outs] == [404, 404]
    await agent.deploy(parse_spec({"name": "triage", "handler": f"{H}:triage"}))
    batched = agent.metrics.batched_events.labels("triage")
    outs = await agent.invoke_batch("triage", [BatchItem(b"1"), BatchItem(b"2")])
    # never measured: the events go one by one (a slow handler must not be batched blind)
    assert [o.status for o in outs] == [200, 200] and batched._value.get() == 0


async def test_autoscaler_drives_a_local_function_up_and_down(platform):
    """The controller's decision core on the local backend, fed the node's own load (in flight +
    queued): a burst of HTTP calls scales the function out, and once the load stops the
    autoscaler scales it back to zero. The node agent itself may run one instance
    (max_instances 1 in its spec) and keeps idle ones for 600 s, so every instance beyond one
    is the autoscaler's, and so is every stop."""
    import asyncio
    import time

    import aiohttp
    from hearth.controller.backend import execute
    from hearth.controller.decide import DecisionCore
    from hearth.controller.model import FunctionLoad, Observation, Start, Stop

    agent = platform.agent
    base = {
        "name": "scaled",
        "handler": f"{H}:sleep",
        "concurrency": 1,
        "queue_size": 100,
        "timeout_s": 60,
        "resources": {"cpu_millicores": 100, "memory_mb": 128},
        "keep_alive": {"policy": "fixed", "ttl_s": 600},
    }
    await agent.deploy(parse_spec(base | {"max_instances": 1}))
    # the autoscaler's view: up to 4 instances, idle ones released after 2 s (it never stops a
    # kept one); the instances it starts keep the node's 600 s, so the node never stops them
    spec = parse_spec(base | {"max_instances": 4, "keep_alive": {"ttl_s": 2}})
    start_spec = parse_spec(base | {"max_instances": 4})
    backend = LocalBackend(agent)
    core = DecisionCore(stable_window_s=4.0, panic_window_s=1.0, scale_to_zero_grace_s=2.0)
    started: list[str] = []
    stopped: list[str] = []
    peak = 0

    async def tick() -> int:
        nonlocal peak
        st = agent.status()["functions"].get("scaled") or {"instances": [], "queued": 0}
        load = FunctionLoad("scaled", sum(i["inflight"] for i in st["instances"]), st["queued"])
        insts = await backend.instances()
        obs = Observation(
            time.time(), await backend.nodes(), insts, {"scaled": spec}, {"scaled": load}
        )
        actions = core.decide(obs)
        started.extend(a.instance_id for a in actions if isinstance(a, Start))
        stopped.extend(a.instance_id for a in actions if isinstance(a, Stop))
        await execute(backend, actions, {"scaled": start_spec})
        n = len([i for i in await backend.instances() if i.function == "scaled"])
        peak = max(peak, n)
        return n

    statuses: list[int] = []

    async def client(session: aiohttp.ClientSession, calls: int) -> None:
        for _ in range(calls):  # bounded: 6 clients x 6 calls of 0.5 s
            async with session.post(
                f"{platform.url}/v1/functions/scaled:invoke", json={"seconds": 0.5}
            ) as r:
                statuses.append(r.status)

    async with aiohttp.ClientSession() as s:
        load = asyncio.gather(*(client(s, 6) for _ in range(6)))
        while not load.done():
            await tick()
            await asyncio.sleep(0.25)
        await load
    assert statuses == [200] * 36
    assert peak >= 3, peak  # scaled out beyond the node's own single instance
    assert len(set(started)) >= 2  # the autoscaler's own Start actions were carried out
    # load is gone: the stable window drains, the grace passes, and it scales to zero
    deadline = time.monotonic() + 90
    while await tick() > 0:
        assert time.monotonic() < deadline, "not scaled to zero within 90 s"
        await asyncio.sleep(0.25)
    assert len(set(stopped)) >= peak  # every instance went through a Stop of the autoscaler


async def test_agent_stops_idle_instances_by_the_decision_core_rule(platform):
    """The node agent takes its idle stops from the controller's DecisionCore: once every
    keep-alive window is over, at most half the instances go per decision (the autoscaler's
    scale-down rate), then the last one (scale to zero is the keep-alive policy's call)."""
    import asyncio
    import time

    from hearth.controller.model import Keep, Stop

    agent = platform.agent
    spec = parse_spec(
        {"name": "burst", "handler": f"{H}:sleep", "max_instances": 4, "concurrency": 1}
    )
    await agent.deploy(spec)
    outs = await asyncio.gather(
        *(
            agent.invoke(
                "burst", json.dumps({"seconds": 1.0}).encode(), content_type="application/json"
            )
            for _ in range(4)
        )
    )
    assert all(o.status == 200 for o in outs), [(o.status, o.body) for o in outs]
    fs = agent.functions["burst"]
    for _ in range(600):  # four arrived together: four starts (any still in progress finish)
        if fs.starting == 0:
            break
        await asyncio.sleep(0.05)
    assert len(fs.live()) == 4
    later = time.time() + 1000  # every window over, the autoscaler's samples long gone
    counts = []
    for k in range(4):
        before = len(fs.live())
        acts = agent.lifecycle.tick(later + k)
        stops = [a for a in acts if isinstance(a, Stop) and a.instance_id.startswith("burst")]
        keeps = [a for a in acts if isinstance(a, Keep) and a.instance_id.startswith("burst")]
        assert len(stops) + len(keeps) == before
        counts.append(len(stops))
        for _ in range(400):  # the stops run in tasks: wait until those instances have exited
            if all(i.state != "stopping" for i in fs.instances.values()):
                break
            await asyncio.sleep(0.05)
    assert counts == [2, 1, 1, 0]
    assert not fs.instances


@pytest.fixture
def handed(platform):
    """Records each `Admitter.hand` (the real one runs): was a starting instance given to a
    waiting request ahead of its ready report, in which state was it, and how many requests
    in flight the decision core then saw for its function (the handed one is no longer
    queued: uncounted, the core took the function for idle during the start)."""
    agent, seen = platform.agent, []
    real = agent.admitter.hand

    def hand(fs, inst):
        state = inst.state
        ok = real(fs, inst)
        load = agent.lifecycle.observe(time.time()).loads[fs.spec.name]
        seen.append((inst.id, state, ok, load.inflight + load.queued))
        return ok

    agent.admitter.hand = hand
    return seen


async def test_first_request_goes_ahead_of_the_ready_report(platform, handed):
    """A new instance (forked, endpoint registered ahead) and a warm-pool one (spec and first
    request back to back) each get their first request before they report ready; it is
    served by that instance and nothing leaks."""
    agent = platform.agent
    used = agent.pool.stats()["used"]
    await agent.deploy(parse_spec({"name": "ahead", "handler": f"{H}:echo"}))
    r = await agent.invoke("ahead", b"first", content_type="text/plain")
    assert (r.status, r.body, r.cold) == (200, b"first", True)
    assert handed == [(r.instance_id, "starting", True, 1)]
    assert agent.functions["ahead"].instances[r.instance_id].state == "idle"
    pooled = {
        (await agent.start_pool_instance(n)).pid for n in ("node-a", "node-b", "node-c")
    }  # one on each node: wherever placement puts it, a pooled process is there
    await agent.deploy(parse_spec({"name": "ahead-pool", "handler": f"{H}:echo"}))
    r2 = await agent.invoke("ahead-pool", b"second", content_type="text/plain")
    assert (r2.status, r2.body, r2.cold) == (200, b"second", True)
    assert handed[-1] == (r2.instance_id, "starting", True, 1)
    assert agent.functions["ahead-pool"].instances[r2.instance_id].pid in pooled
    assert (await agent.invoke("ahead", b"warm")).cold is False
    assert agent.pool.stats()["used"] == used


@pytest.mark.parametrize("how", ["raises", "exits"])
async def test_request_sent_ahead_of_a_failed_start_is_answered_and_freed(
    platform, handed, tmp_path, how
):
    """The instance the first request was sent to fails its import (reports it) or exits
    before reporting: the caller hears the start failed, and the request's slot, never
    adopted, is freed."""
    agent = platform.agent
    body = "raise ImportError('broken on purpose')" if how == "raises" else "import os; os._exit(3)"
    (tmp_path / f"broken_{how}.py").write_text(body + "\ndef f(event):\n    return b''\n")
    used = agent.pool.stats()["used"]
    name = f"broken-{how}"
    spec = {"name": name, "handler": f"broken_{how}:f", "code_path": str(tmp_path)}
    await agent.deploy(parse_spec(spec))
    with pytest.raises(InvokeError) as e:
        await agent.invoke(name, b"x" * 1000)
    assert (e.value.status, e.value.error) == (502, "cold_start_failed")
    assert handed and handed[0][1:] == ("starting", True, 1)  # it was sent ahead
    assert agent.pool.stats()["used"] == used
