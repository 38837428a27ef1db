"""The fold benchmark's ``--platform`` rounds: the tree deployed on a real ``hearth up`` node."""

from __future__ import annotations

import shutil
import time

import numpy as np
from hearth.functions.fedavg.tree import plan_tree

from fedavg.sizes import GB, layer_shapes


def platform_rounds(trim: str, nclients: int, params: int, rounds: int, fan_in: int) -> dict:
    """Rounds on a real node (``hearth up``: gateway, node agent, proxy daemon, one process per
    aggregator): each client's packed update is POSTed to its leaf, which folds it from the slot
    and forwards its partial to the top. ``trim``: "default" (slots >= 16 MiB give their pages
    back on release) or "off" (``HEARTH_POOL_TRIM=off``). Per round: wall time of the POSTs
    (pre-packed bodies), and the pids of the tree's instances (a new pid = a process start)."""
    import tempfile

    from hearth.functions.fedavg import client as flc
    from hearth.functions.fedavg.pack import pack
    from hearth.localnode import start_node

    tmp = tempfile.mkdtemp(prefix="hfl-bench-")
    env = {
        "HEARTH_MAX_BODY_BYTES": str(256 << 20),
        "HEARTH_POOL_TRIM": "off" if trim == "off" else "",
    }
    node = start_node(tmp, env=env, client_timeout=120)  # its own private redis-server
    c = node.client
    res: dict = {"trim": trim, "rounds": []}
    try:
        plan = plan_tree({"node-0": nclients}, fan_in=fan_in, prefix=f"flbench{trim}")
        for spec in plan.function_specs(model_bytes=params * 4):
            c.deploy(spec.to_dict())
        names = [r.name for r in plan.roles]
        rng = np.random.default_rng(7)
        shapes = layer_shapes(params, 62, 7)
        models = [
            [(f"l{j}", rng.random(sh, dtype=np.float32) + 0.5) for j, sh in enumerate(shapes)]
            for _ in range(nclients)
        ]
        counts = [int(x) for x in rng.integers(100, 5000, nclients)]
        first_pids: set[int] | None = None
        for rnd in range(1, rounds + 1):
            bodies = [
                bytes(pack(m, n, round=rnd, client=f"c{i}"))
                for i, (m, n) in enumerate(zip(models, counts, strict=True))
            ]
            flc.open_round(c.url, plan, rnd)
            t = time.perf_counter()
            for i, b in enumerate(bodies):
                r = flc.invoke(
                    c.url, plan.leaf_for("node-0", i).instance, b, "application/octet-stream"
                )
                assert r.status == 200, r.body
            wall = time.perf_counter() - t
            flc.fetch(c.url, plan, rnd)  # the global model is published
            fns = c.status()["functions"]
            pids = {
                int(i["pid"])
                for n in names
                for i in (fns.get(n) or {}).get("instances", [])
                if i["state"] not in ("stopping", "dead")
            }
            if first_pids is None:
                first_pids = pids
            res["rounds"].append(
                {
                    "round": rnd,
                    "s": wall,
                    "gbps": nclients * params * 4 / wall / GB,
                    "new_pids": len(pids - first_pids),
                }
            )
            print(
                f"  platform trim={trim:<7} round {rnd}  {wall:7.3f} s  "
                f"{nclients * params * 4 / wall / GB:6.2f} GB/s  instances {sorted(pids)}",
                flush=True,
            )
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    later = res["rounds"][1:]
    res["round1_gbps"] = res["rounds"][0]["gbps"]
    res["round2plus_gbps"] = max(r["gbps"] for r in later)
    res["process_starts_after_round1"] = sum(r["new_pids"] for r in later)
    return res
