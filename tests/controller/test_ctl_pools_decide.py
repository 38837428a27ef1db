import pytest
from backend_contract import BackendContract
from hearth.controller.backend import MemoryBackend, execute
from hearth.controller.decide import DecisionCore
from hearth.controller.keepalive import PolicySet, Profile
from hearth.controller.model import (
    Buffer,
    FunctionLoad,
    Instance,
    Keep,
    Node,
    Observation,
    Prewarm,
    Start,
    Stop,
)
from hearth.controller.pools import pool_target, refill, take_from_pool
from hearth.spec import parse_spec

NODES = [Node(f"n{i}", 4000, 4096) for i in range(3)]


def spec(name="fn", **kw):
    return parse_spec(
        {
            "name": name,
            "handler": "m:h",
            "resources": {"memory_mb": 512, "cpu_millicores": 500},
            **kw,
        }
    )


def test_pool_target_littles_law():
    assert pool_target(cold_starts_per_s=2.0, refill_s=1.5, nodes=3) == 2  # 2×1.5×1.5/3 = 1.5 -> 2
    assert pool_target(0.0, 1.0, 3) == 0


def test_take_and_refill():
    insts = [
        Instance("p1", None, "n0", "idle", started_at=2),
        Instance("p0", None, "n0", "idle", started_at=1),
        Instance("x", "fn", "n0", "idle"),
    ]
    assert take_from_pool(insts, spec(), "n0").id == "p0"
    assert take_from_pool(insts, spec(), "n1") is None
    assert refill(insts, NODES, {"python3.11": 2}, taken={"p0"}) == [
        ("python3.11", "n0"),
        ("python3.11", "n1"),
        ("python3.11", "n1"),
        ("python3.11", "n2"),
        ("python3.11", "n2"),
    ]


def test_decide_scale_from_zero_buffers_and_starts_from_pool():
    core = DecisionCore()
    obs = Observation(
        now=100.0,
        nodes=NODES,
        instances=[Instance("pool-a", None, "n1", "idle")],
        functions={"fn": spec()},
        loads={"fn": FunctionLoad("fn", inflight=0, queued=3)},
        pool_targets={"python3.11": 1},
    )
    acts = core.decide(obs)
    assert Buffer("fn", 3) in acts
    starts = [a for a in acts if isinstance(a, Start)]
    assert starts and starts[0].node == "n1" and starts[0].from_pool == "pool-a"
    # the pool instance taken is refilled on n1, and n0/n2 get their pool instance
    pre = sorted(a.node for a in acts if isinstance(a, Prewarm))
    assert pre == ["n0", "n1", "n2"]


def test_decide_never_gives_a_pool_instance_to_a_function_with_env_from_secrets():
    """A pool pod exists before the function: the kubelet cannot add env from a Secret to it."""
    env = {"DB": {"secret_key_ref": {"name": "s", "key": "k"}}}
    obs = Observation(
        now=100.0,
        nodes=NODES[:1],
        instances=[Instance("pool-a", None, "n0", "idle")],
        functions={"fn": spec(env_value_from=env), "plain": spec("plain")},
        loads={"fn": FunctionLoad("fn", queued=1), "plain": FunctionLoad("plain", queued=1)},
        pool_targets={"python3.11": 1},
    )
    starts = {a.function: a for a in DecisionCore().decide(obs) if isinstance(a, Start)}
    assert starts["fn"].from_pool is None and starts["plain"].from_pool == "pool-a"
    assert take_from_pool(obs.instances, obs.functions["fn"], "n0") is None


def test_decide_affinity_group_lands_on_one_node():
    fns = {f"agg{k}": spec(f"agg{k}", affinity_group="tree", min_instances=1) for k in range(4)}
    acts = DecisionCore().decide(Observation(now=0.0, nodes=NODES, instances=[], functions=fns))
    nodes = {a.node for a in acts if isinstance(a, Start)}
    assert len([a for a in acts if isinstance(a, Start)]) == 4 and len(nodes) == 1


def test_decide_keepalive_stops_after_ttl_exactly_and_keeps_before():
    s = spec(keep_alive={"policy": "fixed", "ttl_s": 60})
    core = DecisionCore(scale_to_zero_grace_s=0)
    inst = Instance(
        "fn-1", "fn", "n0", "idle", last_used_at=1000.0, memory_mb=512, cpu_millicores=500
    )
    a1 = core.decide(Observation(now=1059.0, nodes=NODES, instances=[inst], functions={"fn": s}))
    assert Keep("fn-1", 1060.0, "fixed") in a1
    a2 = core.decide(Observation(now=1060.0, nodes=NODES, instances=[inst], functions={"fn": s}))
    assert Stop("fn-1", "fixed: keep-alive expired") in a2


def test_decide_never_stops_busy_and_honours_min_instances():
    s = spec(min_instances=1, keep_alive={"ttl_s": 0})
    insts = [
        Instance("a", "fn", "n0", "busy", inflight=1),
        Instance("b", "fn", "n0", "idle", last_used_at=0),
    ]
    acts = DecisionCore(scale_to_zero_grace_s=0).decide(
        Observation(now=10_000.0, nodes=NODES, instances=insts, functions={"fn": s})
    )
    stopped = {a.instance_id for a in acts if isinstance(a, Stop)}
    assert "a" not in stopped


def test_global_default_policy_unless_spec_sets_one():
    core = DecisionCore(policies=PolicySet(default="coldstart-aware"))
    assert core.policy_name(spec()) == "coldstart-aware"
    assert core.policy_name(spec(keep_alive={"policy": "fixed"})) == "fixed"


async def test_execute_on_memory_backend_specialises_pool():
    be = MemoryBackend(NODES)
    await be.start_instance(None, "n1", "pool-a", runtime="python3.11")
    core = DecisionCore()
    obs = Observation(
        now=0.0,
        nodes=await be.nodes(),
        instances=await be.instances(),
        functions={"fn": spec()},
        loads={"fn": FunctionLoad("fn", queued=1)},
    )
    await execute(be, core.decide(obs), {"fn": spec()})
    (inst,) = await be.instances()
    assert inst.function == "fn" and inst.from_pool and inst.node == "n1"


class TestMemoryBackendContract(BackendContract):
    @pytest.fixture
    async def backend(self):
        yield MemoryBackend(NODES)


def test_decide_unloads_then_prewarms_before_the_next_periodic_arrival():
    s = spec(keep_alive={"policy": "coldstart-aware"})
    core = DecisionCore(scale_to_zero_grace_s=0)
    core.policies.set("fn", "coldstart-aware")
    pol = core.policies.get("fn")
    for _ in range(10):  # a 5-minute timer
        pol.record("fn", 0.0, 300.0, Profile(512, 1.0, 60))
    inst = Instance(
        "fn-1", "fn", "n0", "idle", last_used_at=1000.0, memory_mb=512, cpu_millicores=500
    )
    a1 = core.decide(Observation(now=1000.5, nodes=NODES, instances=[inst], functions={"fn": s}))
    assert Stop("fn-1", "coldstart-aware: unload until pre-warm") in a1
    a2 = core.decide(Observation(now=1200.0, nodes=NODES, instances=[], functions={"fn": s}))
    assert not [a for a in a2 if isinstance(a, Start)]
    a3 = core.decide(Observation(now=1296.0, nodes=NODES, instances=[], functions={"fn": s}))
    (start,) = [a for a in a3 if isinstance(a, Start)]
    assert start.reason == "prewarm" and start.function == "fn"
    # the pre-warmed instance is idle and has served nothing: it waits for the predicted
    # arrival (its policy alone would unload a freshly idle instance again at once)
    warm = Instance(start.instance_id, "fn", "n0", "idle", last_used_at=1297.0, memory_mb=512)
    until = 1000.0 + pol.window("fn", 1000.0, Profile(512, 1.0, 60)).keep_s
    for now in (1297.5, 1299.0, until - 0.5):
        a4 = core.decide(Observation(now=now, nodes=NODES, instances=[warm], functions={"fn": s}))
        assert not [a for a in a4 if isinstance(a, Stop)], now
        assert Keep(warm.id, until, "coldstart-aware") in a4
    # no arrival within the window: it stops, and no new pre-warm is made from its own idle time
    a5 = core.decide(Observation(now=until + 1, nodes=NODES, instances=[warm], functions={"fn": s}))
    assert Stop(warm.id, "coldstart-aware: pre-warm window over") in a5
    a6 = core.decide(Observation(now=until + 400, nodes=NODES, instances=[], functions={"fn": s}))
    assert not [a for a in a6 if isinstance(a, Start)]
