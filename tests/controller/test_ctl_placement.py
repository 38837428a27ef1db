import math

import numpy as np
from hearth.controller.model import Instance, Node
from hearth.controller.placement import Cluster, Request, fits_alone, lower_bound_nodes


def nodes(n, cpu=4000, mem=4096):
    return [Node(f"n{i}", cpu, mem) for i in range(n)]


def test_best_fit_uses_lower_bound_for_unit_items():
    # capacity 4 units per node, 10 unit items -> ceil(10/4) = 3 nodes
    c = Cluster(nodes(10))
    reqs = [Request(f"f{k}", 1000, 1024) for k in range(10)]
    for r in reqs:
        assert c.place(r) is not None
    assert c.nodes_used() == 3 == lower_bound_nodes(reqs, 4000, 4096) == math.ceil(10 / 4)


def test_group_fits_on_one_node_keeps_all_edges_inside():
    c = Cluster(nodes(3))
    group = [Request(f"agg{k}", 500, 512, group="tree") for k in range(5)]
    placed = c.place_group(group)
    assert len(set(placed)) == 1


def test_group_larger_than_a_node_uses_fewest_nodes():
    c = Cluster(nodes(3))
    group = [Request(f"agg{k}", 1000, 1024, group="tree") for k in range(6)]  # 6 units, cap 4
    placed = c.place_group(group)
    assert None not in placed
    assert len(set(placed)) == 2  # ceil(6/4)


def test_affinity_pulls_member_to_group_node():
    c = Cluster(nodes(3))
    c.place_group([Request("top", 1000, 1024, group="tree")])
    first = int(np.flatnonzero(c.by_group["tree"])[0])
    # an empty node would be equally good by fit alone; affinity decides
    i = c.place(Request("leaf", 1000, 1024, group="tree"))
    assert i == first


def test_spread_puts_replicas_on_distinct_nodes():
    c = Cluster(nodes(3))
    got = [c.place(Request("web", 500, 512, spread=True)) for _ in range(3)]
    assert sorted(got) == [0, 1, 2]


def test_pack_puts_replicas_together():
    c = Cluster(nodes(3))
    got = [c.place(Request("web", 500, 512)) for _ in range(3)]
    assert len(set(got)) == 1


def test_infeasible_returns_none():
    c = Cluster(nodes(2, cpu=1000, mem=1024))
    assert c.place(Request("big", 2000, 512)) is None


def test_one_node_is_chosen_exactly_when_the_request_fits():
    # the one-node shortcut in `best` answers as the scoring does: node 0 or None
    for cpu, mem, spread in ((1000, 1024, False), (4000, 4096, True), (4001, 1, False)):
        c = Cluster(nodes(1))
        req = Request("f", cpu, mem, spread=spread)
        s = c.scores(req)
        want = None if s[0] == -np.inf else 0
        assert c.best(req) == want == (0 if cpu <= 4000 and mem <= 4096 else None)
    c = Cluster(nodes(1))
    assert c.place(Request("a", 3000, 1024)) == 0
    assert c.place(Request("b", 1001, 1024)) is None  # 1000m left


def test_from_observation_accounts_existing_instances_and_pool():
    ns = nodes(2)
    insts = [
        Instance("a", "f", "n0", "idle", memory_mb=4096, cpu_millicores=4000),
        Instance("p", None, "n1", "idle", memory_mb=0, cpu_millicores=0),
    ]
    c = Cluster.from_observation(ns, insts)
    assert c.free_cpu[0] == 0
    # n0 is full, and n1 has a pool instance: new instance goes to n1
    assert c.best(Request("g", 1000, 1024)) == 1
    assert c.pool["python3.11"][1] == 1


def test_warm_instance_of_same_function_breaks_tie():
    ns = nodes(2)
    c = Cluster.from_observation(
        ns, [Instance("a", "f", "n1", "idle", memory_mb=0, cpu_millicores=0)]
    )
    assert c.best(Request("f", 1000, 1024)) == 1


# -- which nodes host each function (the cluster's placement) ----------------------------------
from hearth.controller.placement import NODE_HINT, assign_hosts  # noqa: E402
from hearth.spec import FunctionSpec  # noqa: E402


def fspec(name, group=None, hint=None, mem=256, cpu=500, spread=False):
    return FunctionSpec(
        name=name,
        handler="m:f",
        affinity_group=group,
        spread=spread,
        resources={"memory_mb": mem, "cpu_millicores": cpu},
        labels={NODE_HINT: hint} if hint else {},
    )


def test_hosts_ungrouped_functions_everywhere_and_a_group_on_one_node():
    ns = nodes(3)
    plan = assign_hosts(ns, [fspec("web"), fspec("a", "g"), fspec("b", "g"), fspec("c", "g")])
    assert plan["web"] == ("n0", "n1", "n2")  # runs where it arrives: nothing crosses
    assert len({plan[f] for f in "abc"}) == 1 and len(plan["a"]) == 1  # chained calls stay inside


def test_hint_pins_a_function_and_draws_its_group():
    plan = assign_hosts(nodes(3), [fspec("top", "g", hint="n2"), fspec("leaf", "g")])
    assert plan == {"top": ("n2",), "leaf": ("n2",)}
    # a hint may name the node's DNS label (as the fedavg tree writes it)
    ns = [Node("Node_A", 4000, 4096), Node("node-b", 4000, 4096)]
    assert assign_hosts(ns, [fspec("x", hint="node-a")])["x"] == ("Node_A",)


def test_a_dead_hinted_node_is_replaced_by_a_live_one():
    ns = nodes(2)
    plan = assign_hosts(ns, [fspec("x", "g", hint="gone"), fspec("y", "g")])
    assert plan["x"] == plan["y"] and plan["x"][0] in ("n0", "n1")
    assert assign_hosts(ns, [fspec("solo", hint="gone")])["solo"] == ("n0", "n1")


def test_a_group_stays_where_it_was_while_that_node_lives():
    ns = nodes(3)
    specs = [fspec("a", "g"), fspec("b", "g")]
    first = assign_hosts(ns, specs)
    elsewhere = next(n.name for n in ns if (n.name,) != first["a"])
    sticky = assign_hosts(ns, specs, {"a": (elsewhere,), "b": (elsewhere,)})
    assert sticky["a"] == sticky["b"] == (elsewhere,)
    moved = assign_hosts([n for n in ns if n.name != elsewhere], specs, sticky)
    assert moved["a"] == moved["b"] and moved["a"] != (elsewhere,)


def test_groups_that_do_not_fit_one_node_are_split_and_two_groups_pack_by_best_fit():
    ns = nodes(2, cpu=2000, mem=2048)
    big = [fspec(f"m{i}", "big", mem=1024, cpu=1000) for i in range(3)]  # 3 GiB > a node
    plan = assign_hosts(ns, big)
    assert {plan[f"m{i}"][0] for i in range(3)} == {"n0", "n1"}
    two = assign_hosts(
        ns, [fspec("p", "g1", mem=1500, cpu=1500), fspec("q", "g2", mem=1500, cpu=1500)]
    )
    assert two["p"] != two["q"]  # each group whole on its own node
    assert assign_hosts([], [fspec("x")]) == {}


def test_fedavg_tree_specs_place_one_leaf_per_node_and_only_partials_cross():
    from hearth.functions.fedavg.tree import plan_tree

    tree = plan_tree({"node-a": 4, "node-b": 3, "node-c": 3}, fan_in=4)
    specs = tree.function_specs(model_bytes=1 << 20)
    ns = [Node(n, 8000, 16384) for n in ("node-a", "node-b", "node-c")]
    plan = assign_hosts(ns, specs)
    for r in tree.roles:
        assert plan[r.name] == (r.node,), r
    crossing = [
        (c, p) for c, p in ((r.name, r.parent) for r in tree.roles) if p and plan[c] != plan[p]
    ]
    assert sorted(crossing) == sorted(tree.cross_node_edges())
    assert len(crossing) == 2  # one partial from each non-top node


def test_fits_alone_answers_as_best_does_on_one_node():
    """The single-node shortcut a node agent takes on every cold start: the same answer as
    `Cluster.best` over the observation, at and around the exact fit."""
    rng = np.random.default_rng(7)
    node = Node("n0", 4000, 4096)
    for _ in range(300):
        insts = [
            Instance(
                f"i{k}",
                None if k % 3 == 0 else f"f{k}",
                "n0",
                "idle",
                memory_mb=int(rng.integers(1, 1024)),
                cpu_millicores=int(rng.integers(1, 1500)),
            )
            for k in range(int(rng.integers(0, 6)))
        ]
        cpu = sum(i.cpu_millicores for i in insts)
        mem = sum(i.memory_mb for i in insts)
        req = Request(
            "g",
            int(rng.choice([max(0, 4000 - cpu), 4000 - cpu + 1, int(rng.integers(1, 2000))])),
            int(rng.choice([max(0, 4096 - mem), 4096 - mem + 1, int(rng.integers(1, 2000))])),
        )
        best = Cluster.from_observation([node], insts).best(req)
        assert fits_alone(node, cpu, mem, req) == (best == 0)
