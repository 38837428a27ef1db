"""The one rule for stopping idle instances (autoscaler.keep_floor), used by the Kubernetes
controller and the node agent alike: an idle instance stops when its keep-alive window is over
and the function keeps the autoscaler's floor; scale to zero is the keep-alive policy's call."""

from hearth.controller.autoscaler import keep_floor
from hearth.controller.decide import DecisionCore
from hearth.controller.model import FunctionLoad, Instance, Node, Observation, Stop
from hearth.spec import parse_spec

NODES = [Node("n0", 8000, 8192)]


def spec(**kw):
    return parse_spec(
        {
            "name": "fn",
            "handler": "m:h",
            "resources": {"memory_mb": 128, "cpu_millicores": 100},
            "keep_alive": {"policy": "fixed", "ttl_s": 1},
            **kw,
        }
    )


def idle(k: int, last_used: float = 0.0) -> Instance:
    return Instance(f"fn-{k}", "fn", "n0", "idle", last_used_at=last_used + k * 0.001)


def stops(actions) -> set[str]:
    return {a.instance_id for a in actions if isinstance(a, Stop)}


def decide(core, now, instances, inflight=0, queued=0, s=None):
    return core.decide(
        Observation(
            now=now,
            nodes=NODES,
            instances=instances,
            functions={"fn": s or spec()},
            loads={"fn": FunctionLoad("fn", inflight=inflight, queued=queued)},
        )
    )


def test_keep_floor_cases():
    assert keep_floor(want=1, rate_floor=0, work=0) == 0  # the last instance: keep-alive's call
    assert keep_floor(want=1, rate_floor=0, work=2) == 1  # work in flight holds it
    assert keep_floor(want=3, rate_floor=0, work=0) == 3  # what the load needs stays
    assert keep_floor(want=0, rate_floor=2, work=0) == 2  # at most half go per decision


def test_last_idle_instance_stops_at_keep_alive_despite_recent_traffic():
    """Recent traffic makes the autoscaler want one instance (stable average > 0, the
    scale-to-zero grace) but nothing is in flight: the keep-alive window decides."""
    core = DecisionCore()  # default 30 s scale-to-zero grace, 60 s stable window
    decide(core, 10.0, [Instance("fn-0", "fn", "n0", "busy", inflight=1)], inflight=1)
    acts = decide(core, 10.5, [idle(0, last_used=10.0)])
    assert "fn-0" not in stops(acts)  # window (1 s) not over yet
    acts = decide(core, 11.2, [idle(0, last_used=10.0)])
    assert stops(acts) == {"fn-0"}


def test_queued_work_holds_the_last_instance():
    core = DecisionCore()
    acts = decide(core, 100.0, [idle(0, last_used=0.0)], queued=1)
    assert not stops(acts)


def test_load_that_needs_instances_keeps_them_past_their_window():
    core = DecisionCore()
    insts = [Instance(f"fn-{k}", "fn", "n0", "busy", inflight=1) for k in range(3)]
    for t in range(0, 20):  # 20 s at concurrency 3
        decide(core, float(t), insts, inflight=3)
    acts = decide(core, 25.0, [idle(k, last_used=20.0) for k in range(3)])
    assert not stops(acts)  # the stable average (~2.4 over the window) still wants 3


def test_scale_down_at_most_halves_per_decision_then_reaches_zero():
    core = DecisionCore()
    insts = [idle(k) for k in range(4)]
    seen = []
    now = 100.0
    while insts:
        gone = stops(decide(core, now, insts))
        seen.append(len(gone))
        insts = [i for i in insts if i.id not in gone]
        now += 1
        assert len(seen) < 10
    assert seen == [2, 1, 1]


def test_min_instances_stay():
    core = DecisionCore()
    acts = decide(core, 100.0, [idle(0), idle(1)], s=spec(min_instances=1))
    assert stops(acts) == {"fn-0"}  # the least recently used goes, one stays


def test_admit_request_path_rule():
    from hearth.controller.autoscaler import admit

    # from zero: one start per queued invocation's worth of concurrency
    assert (
        admit(live=0, starting=0, queued=0, concurrency=1, max_instances=4, queue_size=8) == "start"
    )
    assert (
        admit(live=0, starting=2, queued=2, concurrency=1, max_instances=4, queue_size=8) == "start"
    )
    assert (
        admit(live=0, starting=3, queued=2, concurrency=1, max_instances=4, queue_size=8) == "wait"
    )
    # while instances serve: one start at a time (no cold-start storm)
    assert (
        admit(live=2, starting=1, queued=5, concurrency=1, max_instances=9, queue_size=8) == "wait"
    )
    assert (
        admit(live=2, starting=0, queued=5, concurrency=1, max_instances=9, queue_size=8) == "start"
    )
    # at max_instances: queue up to queue_size (plus what starting instances will take), then 429
    assert (
        admit(live=4, starting=0, queued=7, concurrency=1, max_instances=4, queue_size=8) == "wait"
    )
    assert (
        admit(live=4, starting=0, queued=8, concurrency=1, max_instances=4, queue_size=8)
        == "reject"
    )
