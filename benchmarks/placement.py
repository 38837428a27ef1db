"""Placement benchmark: 10,000 placements over 1,000 nodes.

Hearth (affinity groups packed by Best-Fit-Decreasing, single instances by the scoring function)
against two baselines run on the same workload in the same process:
  k8s-least-allocated  the default scheduler's spreading score (most free capacity wins),
                       no knowledge of affinity groups
  first-fit            first node with room, no knowledge of affinity groups
and Hearth's per-instance path (`hearth-online`: every instance through `Cluster.place`, the
affinity bonus only, as the controller does when one replica is added).
Prints time, nodes used vs the ⌈U/C⌉ lower bound, and the fraction of affinity-group edges
(parent-child edges of aggregation/fan-out trees) that stay inside one node; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from hearth.controller.model import Node
from hearth.controller.placement import Cluster, Request, lower_bound_nodes

NODE_CPU, NODE_MEM = 16_000, 32_768
SIZES = [(250, 256), (500, 512), (1000, 1024), (2000, 4096)]


def workload(
    n_items: int, seed: int
) -> tuple[list[tuple[str, list[Request], list[tuple[int, int]]]], list[Request]]:
    """A mixed arrival sequence of affinity groups (trees) and single instances.

    Returns the sequence of ("group", requests, edges) / ("single", [request], []) and the flat
    request list. Trees are in depth-first order (a parent, then its subtree)."""
    rng = np.random.default_rng(seed)
    seq = []
    flat: list[Request] = []
    g = 0
    while len(flat) < n_items:
        kind = rng.random()
        if kind < 0.35:  # FL aggregation tree: top -> 2-4 middle -> 2-6 leaves each
            name = f"fl{g}"
            reqs, edges = [], []
            reqs.append(Request(f"{name}-top", 1000, 2048, group=name))
            for m in range(int(rng.integers(2, 5))):
                mi = len(reqs)
                reqs.append(Request(f"{name}-mid{m}", 500, 1024, group=name))
                edges.append((0, mi))
                for _leaf in range(int(rng.integers(2, 7))):
                    edges.append((mi, len(reqs)))
                    reqs.append(Request(f"{name}-leaf{m}", 250, 512, group=name))
        elif kind < 0.55:  # vector-search fan-out: root -> 2-8 partitions
            name = f"vs{g}"
            reqs = [Request(f"{name}-root", 500, 512, group=name)]
            edges = []
            for _ in range(int(rng.integers(2, 9))):
                edges.append((0, len(reqs)))
                reqs.append(Request(f"{name}-part", 1000, 2048, group=name))
        else:
            c, m = SIZES[int(rng.integers(len(SIZES)))]
            seq.append(("single", [Request(f"fn{g}", c, m)], []))
            flat.append(seq[-1][1][0])
            g += 1
            continue
        reqs = reqs[: n_items - len(flat)]
        edges = [(a, b) for a, b in edges if a < len(reqs) and b < len(reqs)]
        seq.append(("group", reqs, edges))
        flat.extend(reqs)
        g += 1
    return seq, flat


def run_hearth(nodes, seq):
    c = Cluster(nodes)
    placed = []
    t0 = time.perf_counter()
    for kind, reqs, _ in seq:
        placed.append(c.place_group(reqs) if kind == "group" else [c.place(reqs[0])])
    dt = time.perf_counter() - t0
    return c, placed, dt


def run_hearth_online(nodes, seq):
    """Every instance placed on its own through the scoring function (affinity bonus only)."""
    c = Cluster(nodes)
    placed = []
    t0 = time.perf_counter()
    for _kind, reqs, _ in seq:
        placed.append([c.place(r) for r in reqs])
    return c, placed, time.perf_counter() - t0


def run_baseline(nodes, seq, rule):
    c = Cluster(nodes)
    placed = []
    t0 = time.perf_counter()
    for _kind, reqs, _ in seq:
        out = []
        for r in reqs:
            feas = c.feasible(r.cpu_millicores, r.memory_mb)
            if not feas.any():
                out.append(None)
                continue
            if rule == "least-allocated":
                i = int(
                    np.argmax(np.where(feas, c.residual(r.cpu_millicores, r.memory_mb), -np.inf))
                )
            else:
                i = int(np.argmax(feas))
            c.commit(i, r)
            out.append(i)
        placed.append(out)
    return c, placed, time.perf_counter() - t0


def edge_locality(seq, placed) -> float:
    inside = total = 0
    for (kind, _reqs, edges), where in zip(seq, placed, strict=True):
        if kind != "group":
            continue
        for a, b in edges:
            total += 1
            inside += where[a] is not None and where[a] == where[b]
    return inside / total if total else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition instead of three")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    nodes = [Node(f"n{i:04d}", NODE_CPU, NODE_MEM) for i in range(a.nodes)]
    seq, flat = workload(a.items, a.seed)
    lb = lower_bound_nodes(flat, NODE_CPU, NODE_MEM)
    reps = 1 if a.quick else 3
    best = float("inf")
    for _ in range(reps):
        hc, hp, dt = run_hearth(nodes, seq)
        best = min(best, dt)

    def best_of(run):  # every contender gets the same repetitions; the fastest run counts
        runs = [run() for _ in range(reps)]
        return min(runs, key=lambda r: r[2])

    rows = {
        "hearth": (hc, hp, best),
        "hearth-online": best_of(lambda: run_hearth_online(nodes, seq)),
    }
    for rule in ("least-allocated", "first-fit"):
        rows[rule] = best_of(lambda rule=rule: run_baseline(nodes, seq, rule))
    n_groups = sum(1 for k, _, _ in seq if k == "group")
    print(
        f"{len(flat)} placements ({n_groups} affinity groups, {len(seq) - n_groups} single instances) over {a.nodes} nodes of {NODE_CPU} m / {NODE_MEM} MiB"
    )
    print(f"lower bound ⌈U/C⌉ = {lb} nodes")
    print(
        f"{'policy':<18}{'time s':>9}{'µs/place':>10}{'nodes':>8}{'vs LB':>8}{'edges in-node':>15}{'unplaced':>10}"
    )
    out: dict[str, float | int] = {"placements": len(flat), "nodes": a.nodes, "lower_bound": lb}
    for name, (c, placed, dt) in rows.items():
        used = c.nodes_used()
        loc = edge_locality(seq, placed)
        unplaced = sum(1 for p in placed for i in p if i is None)
        print(
            f"{name:<18}{dt:>9.3f}{dt / len(flat) * 1e6:>10.1f}{used:>8}{used / lb:>8.3f}{loc:>15.3f}{unplaced:>10}"
        )
        key = name.replace("-", "_")
        out[f"{key}_time_s"] = round(dt, 4)
        out[f"{key}_nodes_used"] = used
        out[f"{key}_edge_locality"] = round(loc, 4)
    h = rows["hearth"]
    out["hearth_nodes_over_lb"] = round(h[0].nodes_used() / lb, 4)
    out["nodes_ratio_vs_least_allocated"] = round(
        h[0].nodes_used() / rows["least-allocated"][0].nodes_used(), 4
    )
    out["nodes_ratio_vs_first_fit"] = round(
        h[0].nodes_used() / rows["first-fit"][0].nodes_used(), 4
    )
    out["edge_locality_ratio_vs_first_fit"] = round(
        edge_locality(seq, h[1]) / max(edge_locality(seq, rows["first-fit"][1]), 1e-9), 4
    )
    out["within_1s"] = h[2] <= 1.0 and rows["hearth-online"][2] <= 1.0
    print(
        f"hearth: {h[2]:.3f} s for {len(flat)} placements ({'within' if h[2] <= 1.0 else 'OVER'} the 1 s budget); "
        f"nodes {out['nodes_ratio_vs_least_allocated']}x of least-allocated, {out['nodes_ratio_vs_first_fit']}x of first-fit; "
        f"edge locality {out['edge_locality_ratio_vs_first_fit']}x first-fit's"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
