"""A short FL round for ``hearth demo``: simulated clients on two nodes, a 3-level tree on the
shared-memory slot pool, checked against exact FedAvg (float64) and Flower's ``aggregate()``.

``run_demo()`` returns the figures; ``hearth demo`` prints ``summary_line(...)``."""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np


def run_demo(
    clients: int = 12, params: int = 200_000, fan_in: int = 3, seed: int = 0
) -> dict[str, Any]:
    from flwr.server.strategy.aggregate import aggregate
    from hearth.dataplane.shm import SlotPool
    from hearth.functions.fedavg.aggregation import Aggregation, exact_fedavg
    from hearth.functions.fedavg.tree import plan_tree

    rng = np.random.default_rng(seed)
    half = clients // 2
    plan = plan_tree({"node-a": clients - half, "node-b": half}, fan_in=fan_in, levels=3)
    shapes = [(params // 2,), (params // 8, 2), (params - params // 2 - 2 * (params // 8),)]
    pool = SlotPool.create(
        f"hearth-fl-demo-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        [(1 << 16, 16), (params * 4 + (1 << 16), clients + 2 * len(plan.roles) + 4)],
    )
    agg = Aggregation(plan, pool=pool)
    try:
        out: dict[str, Any] = {
            "clients": clients,
            "params": params,
            "levels": plan.levels,
            "aggregators": len(plan.roles),
        }
        for rid in (1, 2):
            ups = [
                (
                    [
                        (f"layer{j}", rng.uniform(0.5, 1.5, s).astype(np.float32))
                        for j, s in enumerate(shapes)
                    ],
                    int(rng.integers(10, 1000)),
                )
                for _ in range(clients)
            ]
            nodes = ["node-a"] * (clients - half) + ["node-b"] * half
            created = sum(a.accumulators_created for a in agg.aggs.values())
            model = agg.run_round(rid, ups, nodes=nodes)
            exact = exact_fedavg(ups)
            flower = aggregate([([a for _, a in m], n) for m, n in ups])
            out[f"round{rid}_max_rel_err_exact"] = max(
                float(np.max(np.abs(g - e) / np.abs(e), initial=0.0))
                for (_, g), (_, e) in zip(model.layers, exact, strict=True)
            )
            out[f"round{rid}_max_rel_err_flower"] = max(
                float(np.max(np.abs(g - f) / np.abs(f), initial=0.0))
                for (_, g), f in zip(model.layers, flower, strict=True)
            )
            out[f"round{rid}_new_accumulators"] = (
                sum(a.accumulators_created for a in agg.aggs.values()) - created
            )
            out["structure_equal_flower"] = all(
                g.shape == f.shape and g.dtype == f.dtype
                for (_, g), f in zip(model.layers, flower, strict=True)
            )
        out["promotions"] = len(agg.promotions)
        out["ok"] = (
            out["round2_max_rel_err_exact"] <= 1e-5
            and out["round1_max_rel_err_exact"] <= 1e-5
            and out["structure_equal_flower"]
        )
        return out
    finally:
        agg.close()
        pool.destroy()


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"fedavg: {r['clients']} clients x {r['params']:,} params, {r['levels']}-level tree of {r['aggregators']} aggregators, 2 rounds; "
        f"max rel err vs exact FedAvg {max(r['round1_max_rel_err_exact'], r['round2_max_rel_err_exact']):.1e}, "
        f"vs Flower aggregate() {max(r['round1_max_rel_err_flower'], r['round2_max_rel_err_flower']):.1e}; "
        f"new accumulators in round 2: {r['round2_new_accumulators']} -> {'OK' if r['ok'] else 'MISMATCH'}"
    )
