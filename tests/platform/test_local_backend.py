"""The local backend passes the controller's backend contract with real processes; with three
simulated nodes, placement packs an affinity group and warm-pool cold starts skip phases."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))
import backend_contract  # noqa: E402
from backend_contract import BackendContract  # noqa: E402
from hearth.config import Settings
from hearth.invoke import BatchItem
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
    async with Platform(s, warm_pool_size=0) as p:
        check_dataplane("auto", p.agent.mode, s.state)
        yield p


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
