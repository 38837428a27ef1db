"""Invocations that cross node containers (#14 scenarios b and c), on the shared cluster of the
project's image: (b) a chained call crosses two nodes — slot, agent-to-agent link over the
cluster network, slot — and returns the right bytes at 1 KiB and 64 MiB; (c) a FedAvg round whose
clients are spread over the three nodes sends one partial per non-top node over the network and
equals exact FedAvg. Each ends with every slot of every node free again."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cluster import Cluster
from hearth.controller.placement import NODE_HINT
from hearth.functions.fedavg import client as fl
from hearth.functions.fedavg.aggregation import parse_model
from hearth.functions.fedavg.pack import pack
from hearth.functions.fedavg.tree import plan_tree
from test_cluster import assert_no_slot_held, deploy_everywhere

H = "hearth.functions.examples.handlers"


def cluster_status(c: Cluster, node: str) -> dict:
    return c.client(node).status()["cluster"]


def wait_placed(c: Cluster, functions: list[str]) -> None:
    """Every live node sees all live peers and has `functions` in its placement."""
    live = [b.name for b in c.nodes if c.state(b.name) == "running"]
    for n in live:
        c.wait(
            lambda n=n: (
                set(live) <= set(cluster_status(c, n)["peers"])
                and all(f in cluster_status(c, n)["placement"] for f in functions)
            ),
            what=f"peers and placement on {n}",
            timeout=60,
        )


def undeploy(c: Cluster, names: list[str]) -> None:
    for n in names:
        c.front.delete(n)


def test_b_chained_call_crosses_two_node_containers(cluster: Cluster):
    c = cluster
    specs = [
        {"name": "xn-relay", "handler": f"{H}:relay", "labels": {NODE_HINT: "node-a"}},
        {"name": "echo", "handler": f"{H}:echo", "labels": {NODE_HINT: "node-b"}},
    ]
    for s in specs:
        deploy_everywhere(c, s)
    wait_placed(c, [s["name"] for s in specs])
    # node-a routes echo to node-b only once node-b has announced it (its next heartbeat);
    # until then a call would run echo on node-a itself
    c.wait(
        lambda: cluster_status(c, "node-a")["routes"].get("echo") == "node-b",
        what="node-a to route echo to node-b",
        timeout=60,
    )
    a = c.client("node-a", timeout=120)
    before = cluster_status(c, "node-a")["bytes"]["sent_by_function"].get("echo", 0)
    for size in (1024, 64 << 20):
        body = os.urandom(size)
        r = a.invoke("xn-relay", body)  # relay (node-a) → ctx.invoke("echo") on node-b
        assert r.status == 200 and len(r.body) == size
        assert hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
    sent = cluster_status(c, "node-a")["bytes"]["sent_by_function"].get("echo", 0) - before
    # each payload crossed the network once, node-a → node-b (on failure: what each node sent,
    # and where the relay ran)
    seen = {
        b.name: (
            cluster_status(c, b.name)["bytes"]["sent_by_function"],
            c.client(b.name).status()["functions"].get("xn-relay", {}).get("instances"),
        )
        for b in c.nodes
    }
    assert sent == 1024 + (64 << 20), (sent, seen)
    assert c.client("node-b").status()["functions"]["echo"]["instances"]
    assert not c.client("node-a").status()["functions"]["echo"]["instances"]
    undeploy(c, [s["name"] for s in specs])
    assert_no_slot_held(c)


def test_c_fedavg_round_over_three_node_containers(cluster: Cluster):
    c = cluster
    nodes = [b.name for b in c.nodes]
    per_node = 3
    plan = plan_tree({n: per_node for n in nodes}, fan_in=4, prefix="xnfl")
    shapes = {"conv.weight": (32, 16, 3, 3), "fc.weight": (10, 512), "fc.bias": (10,)}
    model_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
    specs = plan.function_specs(model_bytes=model_bytes)
    for s in specs:
        # a fresh container has no numba cache: the aggregator's first start compiles its fold
        # kernels (tens of seconds on a loaded machine), so the start may take that long
        deploy_everywhere(c, {**s.to_dict(), "timeout_s": 240})
    wait_placed(c, [s.name for s in specs])
    front = c.boxes["gateway"].url
    before = {n: cluster_status(c, n)["bytes"] for n in nodes}
    try:
        fl.open_round(front, plan, 1)
    except Exception:
        for n in nodes:
            print(f"--- {n} ---\n{c.logs(n, tail=40)}")
        raise
    rng = np.random.default_rng(3)
    ups = []
    for n in nodes:
        for i in range(per_node):
            m = [(k, rng.normal(0, 1, s).astype(np.float32)) for k, s in shapes.items()]
            k = int(rng.integers(1, 300))
            ups.append((m, k))
            body = pack(m, k, round=1, client=f"{n}-{i}")
            r = fl.invoke(front, plan.leaf_for(n, i).instance, body, "application/octet-stream")
            assert r.status == 200 and r.headers["x-hearth-node-agent"] == c.agent_url(n)
    model = parse_model(fl.fetch(front, plan, 1).body)
    total = sum(k for _, k in ups)
    for name, got in model.layers:
        want = sum(dict(m)[name].astype(np.float64) * k for m, k in ups) / total
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for n in nodes:
        after = cluster_status(c, n)["bytes"]
        calls = {
            f: v - before[n]["calls_by_function"].get(f, 0)
            for f, v in after["calls_by_function"].items()
        }
        calls = {f: v for f, v in calls.items() if v}
        sent = after["sent_by_function"].get(plan.top.name, 0) - before[n]["sent_by_function"].get(
            plan.top.name, 0
        )
        if n == plan.top.node:
            assert calls == {}, calls
        else:  # exactly one model (+ its header) crossed, to the top, and nothing else
            assert calls == {plan.top.name: 1}, (n, calls)
            assert model_bytes <= sent < model_bytes + 4096
    undeploy(c, [s.name for s in specs])
    assert_no_slot_held(c)
