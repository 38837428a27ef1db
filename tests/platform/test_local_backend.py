"""The local backend passes the controller's backend contract with real processes; with three
simulated nodes, placement packs an affinity group and warm-pool cold starts skip phases."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))
import backend_contract  # noqa: E402
from backend_contract import BackendContract  # noqa: E402
from hearth.config import Settings
from hearth.local_backend import LocalBackend
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform

H = "hearth.functions.examples.handlers"


@pytest.fixture
async def platform(redis_url):
    s = Settings.from_env(port=free_port(), redis_url=redis_url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix="hearth-lb-"))
    s.admin_token = "test-token-123456"
    s.nodes = "node-a:1000:1024,node-b:1000:1024,node-c:1000:1024"
    async with Platform(s, warm_pool_size=0) as p:
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


async def test_warm_pool_start_skips_process_start_and_is_faster(platform):
    agent = platform.agent
    spec = parse_spec({"name": "pooled-fn", "handler": f"{H}:hello"})
    await agent.deploy(spec)
    await agent.start_pool_instance("node-a")
    pooled = await agent.start_instance(spec, node="node-a")
    fresh = await agent.start_instance(spec, node="node-a", use_pool=False)
    recs = {r["instance"]: r for r in agent.cold_starts}
    p, f = recs[pooled.id], recs[fresh.id]
    assert p["from_pool"] and not f["from_pool"]

    def costs(r):
        ph = r["phases"]
        return ph["process_started"] - ph["spawned"], ph["ready"] - ph["requested"]

    (p_alloc, p_total), (f_alloc, f_total) = costs(p), costs(f)
    assert p_alloc < f_alloc  # no interpreter start: the phase was done before
    assert p_total < f_total  # recorded both; the pool start is the faster one
