"""The deployable handlers, wired by the specs the planner emits, chained leaf → middle → top
through ``context.invoke``; warm state across rounds; control ops; placement of the specs."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate
from hearth.controller.model import Node
from hearth.controller.placement import Cluster, Request
from hearth.functions.fedavg import handlers
from hearth.functions.fedavg.aggregation import parse_model
from hearth.functions.fedavg.localhost import LocalHost
from hearth.functions.fedavg.pack import pack
from hearth.functions.fedavg.tree import PlanError, plan_tree
from hearth.sdk import MSGPACK
from hearth.spec import load_spec

SPECS = Path(__file__).resolve().parents[2] / "functions" / "fedavg" / "specs"


def updates(rng, k, shapes=((6, 4), (4,))):
    return [
        (
            [(f"l{i}", rng.uniform(1, 2, s).astype(np.float32)) for i, s in enumerate(shapes)],
            int(rng.integers(1, 500)),
        )
        for _ in range(k)
    ]


def ctl(host, fn, **msg):
    r = host.invoke(fn, msgpack.packb(msg), MSGPACK)
    return r


@pytest.fixture
def host():
    hosts = []

    def make(plan):
        h = LocalHost(plan.function_specs(model_bytes=1 << 20))
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.close()
    handlers.STATE.clear()


def submit_all(host, plan, ups, rnd, nodes):
    counters: dict[str, int] = {}
    last = None
    for i, (m, n) in enumerate(ups):
        node = nodes[i]
        leaf = plan.leaf_for(node, counters.get(node, 0))
        counters[node] = counters.get(node, 0) + 1
        last = host.invoke(leaf.instance, pack(m, n, round=rnd, client=f"c{i}"))
        assert last.status == 200, last.body
    return last


def test_handlers_chain_through_context_invoke_and_match_flower(host):
    rng = np.random.default_rng(0)
    plan = plan_tree({"n0": 6, "n1": 4}, fan_in=2, levels=3)
    h = host(plan)
    for rnd in (1, 2):
        ups = updates(rng, 10)
        last = submit_all(h, plan, ups, rnd, ["n0"] * 6 + ["n1"] * 4)
        r = ctl(h, plan.top.name, op="fetch", round=rnd)
        assert r.status == 200 and r.headers["x-hearth-round"] == str(rnd)
        model = parse_model(r.body)
        ref = aggregate([([a for _, a in m], n) for m, n in ups])
        assert [n for n, _ in model.layers] == ["l0", "l1"]
        for (_, got), want in zip(model.layers, ref, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5)
        assert json.loads(last.body)["aggregator"].startswith("fedavg-leaf")
    st = json.loads(ctl(h, plan.top.name, op="status").body)["roles"][0]
    assert st["models"] == [1, 2] and st["accumulators_created"] == 1  # warm across rounds
    # leaves were invoked by clients; middles and the top only by their children
    assert h.calls.count(plan.top.name) >= 2 * 4


def test_late_update_for_a_finished_aggregator_is_409(host):
    rng = np.random.default_rng(1)
    plan = plan_tree(2, fan_in=2, levels=2)
    h = host(plan)
    ups = updates(rng, 3)
    leaf = plan.by_level("leaf")[0].name
    for i in range(2):
        assert h.invoke(leaf, pack(*ups[i], round=1, client=f"c{i}")).status == 200
    r = h.invoke(leaf, pack(*ups[2], round=1, client="late"))
    assert r.status == 409
    assert "late update from 'late' rejected" in json.loads(r.body)["detail"]
    r = h.invoke(leaf, pack(*ups[2], round=0, client="old"))
    assert r.status == 409 and "round 0" in json.loads(r.body)["detail"]


def test_bad_updates_are_4xx_and_do_not_spoil_the_round(host):
    rng = np.random.default_rng(2)
    plan = plan_tree(3, fan_in=3, levels=1)
    h = host(plan)
    ups = updates(rng, 3)
    top = plan.top.name
    assert h.invoke(top, pack(*ups[0], round=1)).status == 200
    assert h.invoke(top, b"garbage").status == 400
    bad = [("l0", np.full((6, 4), np.inf, np.float32)), ("l1", np.ones(4, np.float32))]
    r = h.invoke(top, pack(bad, 5, round=1, client="x"))
    assert r.status == 422 and "non-finite" in json.loads(r.body)["detail"]
    r = h.invoke(
        top, pack([("l0", np.ones((4, 6), np.float32)), ("l1", np.ones(4, np.float32))], 5, round=1)
    )
    assert r.status == 422 and "expected shape (6, 4), got (4, 6)" in json.loads(r.body)["detail"]
    for m, n in ups[1:]:
        assert h.invoke(top, pack(m, n, round=1)).status == 200
    model = parse_model(ctl(h, top, op="fetch").body)
    ref = aggregate([([a for _, a in m], n) for m, n in ups])
    np.testing.assert_allclose(model.layers[0][1], ref[0], rtol=1e-5)
    assert ctl(h, top, op="fetch", round=9).status == 404
    assert ctl(h, top, op="bogus").status == 400


def test_flush_at_deadline_forwards_what_was_folded(host):
    rng = np.random.default_rng(3)
    plan = plan_tree({"a": 4}, fan_in=2, levels=3)
    h = host(plan)
    ups = updates(rng, 3)  # the fourth client straggles
    submit_all(h, plan, ups, 1, ["a"] * 3)
    assert ctl(h, plan.top.name, op="fetch", round=1).status == 404
    for level in ("leaf", "middle", "top"):  # the coordinator flushes bottom-up
        for r in plan.by_level(level):
            assert ctl(h, r.name, op="flush", round=1).status == 200
    model = parse_model(ctl(h, plan.top.name, op="fetch", round=1).body)
    ref = aggregate([([a for _, a in m], n) for m, n in ups])
    np.testing.assert_allclose(model.layers[1][1], ref[1], rtol=1e-5)
    assert model.n == sum(n for _, n in ups)


def test_promoted_plan_hosts_the_middle_in_the_leaf_instance(host):
    rng = np.random.default_rng(4)
    plan = plan_tree({"a": 4}, fan_in=2, levels=3)
    first_leaf = plan.by_level("leaf")[0]
    promoted = plan.promote(first_leaf.name)
    specs = promoted.function_specs(model_bytes=1 << 20)
    names = {s.name for s in specs}
    assert first_leaf.parent not in names  # no separate instance for the middle
    h = host(promoted)
    ups = updates(rng, 4)
    submit_all(h, promoted, ups, 1, ["a"] * 4)
    model = parse_model(ctl(h, plan.top.name, op="fetch", round=1).body)
    ref = aggregate([([a for _, a in m], n) for m, n in ups])
    np.testing.assert_allclose(model.layers[0][1], ref[0], rtol=1e-5)
    assert h.edges and all(a != b for a, b in h.edges)  # never invokes itself
    # a straggling sibling: the promoted leaf's flush folds locally, then forwards to the top
    h2 = host(promoted.__class__.from_dict({**promoted.to_dict(), "prefix": "fedavg"}))
    handlers.STATE.clear()
    ups = updates(rng, 3)
    submit_all(h2, promoted, ups, 2, ["a"] * 3)
    for level in ("leaf", "middle", "top"):  # what `hearth fl round close` sends
        for r in promoted.by_level(level):
            assert ctl(h2, r.instance, op="flush", round=2, role=r.name).status == 200
    model = parse_model(ctl(h2, plan.top.name, op="fetch", round=2).body)
    ref = aggregate([([a for _, a in m], n) for m, n in ups])
    np.testing.assert_allclose(model.layers[0][1], ref[0], rtol=1e-5)
    assert all(a != b for a, b in h2.edges)
    with pytest.raises(PlanError, match="already carried"):
        promoted.promote(plan.by_level("leaf")[1].name)


def test_specs_place_each_node_group_on_one_node():
    plan = plan_tree({"n0": 12, "n1": 8, "n2": 5}, fan_in=4, levels=3)
    specs = plan.function_specs(model_bytes=45_000_000)
    assert all(
        s.min_instances == 0 and s.max_instances == 1 and s.keep_alive.ttl_s == 600 for s in specs
    )
    assert all(s.min_instances == 1 for s in plan.function_specs(pinned=True))
    cluster = Cluster([Node(f"k{i}", 8000, 16000) for i in range(4)])
    where = {}
    groups: dict[str, list] = {}
    for s in specs:
        groups.setdefault(s.affinity_group, []).append(s)
    for members in groups.values():
        for s, i in zip(
            members, cluster.place_group([Request.for_spec(s) for s in members]), strict=True
        ):
            where[s.name] = i
    for r in plan.roles:
        if r.parent and plan.role(r.parent).level == "middle":
            assert where[r.name] == where[r.parent]  # leaf → middle stays inside a node
    crossing = {(a, b) for a, b in plan.cross_node_edges()}
    assert crossing and all(
        plan.role(a).level == "middle" and plan.role(b).level == "top" for a, b in crossing
    )


def test_example_specs_load():
    files = sorted(SPECS.glob("*.yaml"))
    assert files
    for f in files:
        s = load_spec(f)
        assert s.handler.startswith("hearth.functions.fedavg.handlers:")
        assert s.affinity_group


def test_redelivered_update_is_acknowledged_not_folded_twice(host):
    rng = np.random.default_rng(5)
    plan = plan_tree(2, fan_in=2, levels=1)
    h = host(plan)
    ups = updates(rng, 2)
    top = plan.top.name
    body = pack(*ups[0], round=1, client="c0")
    assert h.invoke(top, body).status == 200
    r = h.invoke(top, body)
    assert r.status == 200 and json.loads(r.body)["duplicate"] is True
    assert h.invoke(top, pack(*ups[1], round=1, client="c1")).status == 200
    model = parse_model(ctl(h, top, op="fetch", round=1).body)
    ref = aggregate([([a for _, a in m], n) for m, n in ups])
    np.testing.assert_allclose(model.layers[0][1], ref[0], rtol=1e-5)
    assert json.loads(ctl(h, top, op="status").body)["roles"][0]["duplicates"] == 1


def test_stream_prefix_adds_a_stream_trigger_to_entry_roles_only():
    plan = plan_tree({"a": 4}, fan_in=2, levels=2)
    specs = {s.name: s for s in plan.function_specs(stream_prefix="fl:")}
    for r in plan.roles:
        streams = [t.stream for t in specs[r.name].stream_triggers()]
        assert streams == ([f"fl:{r.name}"] if r.level == "leaf" else [])


def test_a_refused_partial_is_reported_not_swallowed(host):
    rng = np.random.default_rng(6)
    plan = plan_tree(2, fan_in=2, levels=2)
    h = host(plan)
    leaf = plan.by_level("leaf")[0].name
    fl_open = ctl(h, plan.top.name, op="open", round=1)
    assert fl_open.status == 200
    assert ctl(h, plan.top.name, op="flush", round=1).status == 200  # the top gave up early
    ups = updates(rng, 2)
    assert h.invoke(leaf, pack(*ups[0], round=1, client="a")).status == 200
    r = h.invoke(leaf, pack(*ups[1], round=1, client="b"))
    assert r.status == 409
    assert f"{leaf} -> {plan.top.name}: HTTP 409" in json.loads(r.body)["detail"]
