"""LIFL across nodes: a FedAvg round whose clients are spread over 3 real node agents behind the
front gateway. One leaf per node folds that node's updates in shared memory; only one partial
aggregate per non-top node crosses the network (counted by the agents' links); the result equals
exact FedAvg; no slot is left in use on any node."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hearth.client import Client
from hearth.functions.fedavg import client as fl
from hearth.functions.fedavg.aggregation import parse_model
from hearth.functions.fedavg.pack import pack
from hearth.functions.fedavg.tree import plan_tree
from hearth.redis_server import free_port
from hearth_proc import start_front, stop_hearth
from test_multinode import cluster_status, start_nodes, wait_joined, wait_no_slot_used

NODES = ["node-a", "node-b", "node-c"]


@pytest.fixture
def three_nodes_and_front(redis_url, tmp_path):
    modes = {"node-a": "ebpf"} if os.geteuid() == 0 else {}
    nodes = start_nodes(tmp_path, redis_url, NODES, modes)
    port = free_port()
    env = {
        **os.environ,
        "HEARTH_PORT": str(port),
        "HEARTH_REDIS_URL": redis_url,
        "HEARTH_NODE_AGENTS": ",".join(h.url for h in nodes.values()),
    }
    url = f"http://127.0.0.1:{port}"
    front = start_front(env, Client(url))
    yield nodes, url
    front.terminate()
    front.wait(10)
    for h in nodes.values():
        if h.proc.poll() is None:
            stop_hearth(h)


def test_fedavg_round_over_three_nodes_sends_one_partial_per_non_top_node(three_nodes_and_front):
    nodes, front = three_nodes_and_front
    per_node = 3
    plan = plan_tree({n: per_node for n in NODES}, fan_in=4)
    assert plan.levels == 2 and len(plan.by_level("leaf")) == 3  # one leaf per node
    top_node = plan.top.node
    rng = np.random.default_rng(7)
    shapes = {"conv.weight": (32, 16, 3, 3), "fc.weight": (10, 512), "fc.bias": (10,)}
    model_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
    specs = plan.function_specs(model_bytes=model_bytes)
    a = nodes["node-a"]
    for s in specs:
        a.client.deploy(s.to_dict())
    wait_joined(nodes, [s.name for s in specs])

    fl.open_round(front, plan, 1)
    ups, update_bytes = [], {}
    for n in NODES:
        for i in range(per_node):
            m = [(k, rng.normal(0, 1, s).astype(np.float32)) for k, s in shapes.items()]
            k = int(rng.integers(1, 300))
            ups.append((m, k))
            body = pack(m, k, round=1, client=f"{n}-{i}")
            update_bytes[n] = update_bytes.get(n, 0) + len(body)
            r = fl.invoke(front, plan.leaf_for(n, i).instance, body, "application/octet-stream")
            assert r.status == 200, r.body
            # the front sent the update to the node hosting that leaf
            assert r.headers["x-hearth-node-agent"] == nodes[n].url
    model = parse_model(fl.fetch(front, plan, 1).body)
    total = sum(k for _, k in ups)
    for name, got in model.layers:
        want = sum(dict(m)[name].astype(np.float64) * k for m, k in ups) / total
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    # what crossed nodes: exactly one partial from each non-top node, to the top; nothing else
    crossed = {n: cluster_status(h)["bytes"] for n, h in nodes.items()}
    assert crossed[top_node]["sent_by_function"] == {}
    partials = []
    for n in NODES:
        if n == top_node:
            continue
        assert crossed[n]["calls_by_function"] == {plan.top.name: 1}, crossed[n]
        partials.append(crossed[n]["sent_by_function"][plan.top.name])
    assert all(model_bytes <= p < model_bytes + 4096 for p in partials)  # one model (+ header)
    cross_bytes = sum(partials)
    flat_bytes = sum(b for n, b in update_bytes.items() if n != top_node)  # all to one node
    assert cross_bytes * per_node <= flat_bytes + 2 * 4096 * per_node
    print(
        f"cross-node bytes: tree {cross_bytes}, flat {flat_bytes} ({flat_bytes / cross_bytes:.2f}x)"
    )
    wait_no_slot_used(nodes, undeploy=[s.name for s in specs])
