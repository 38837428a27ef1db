"""Cross-node invoke latency of several versions of Hearth in ONE run: for each git revision
(and the working tree, ``.``), two node agents of that version (their own Redis), all beside one
bare aiohttp server and the two floors of ``relay_chain.py`` (the bare request through one and
through two plain asyncio processes: what a same-node and a cross-node shaped request cost with
almost no Python); 64-byte requests interleaved one by one over every version's cross-node and
same-node URL, the bare server and the floors, so a shared machine's load drifts over all of them
alike.

    .venv/bin/python benchmarks/cross_node_ab.py main . [--quick]

Prints each version's p50 over the bare request, what crossing adds over two bare hops
(cross − same over floor_cross − floor_same), and ends with one JSON line of every figure,
each version's target (``cross_node.py``'s: cross-node p50 ≤ 2× the bare request) as a boolean,
and ``targets_met``: the last version's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cross_node as cn  # noqa: E402
from hearth.controller.placement import NODE_HINT  # noqa: E402
from hearth.localnode import start_node  # noqa: E402
from hearth.redis_server import RedisServer, free_port  # noqa: E402
from revtree import checkout  # noqa: E402


def pair(tmp: Path, name: str, platform: Path, procs: list, redises: list) -> dict[str, str]:
    """Two node agents of one version; their cross-node and same-node invoke URLs."""
    redis = RedisServer(tmp / f"redis-{name}").start()
    redises.append(redis)
    nodes = {}
    for node in ("node-a", "node-b"):
        env = {**cn.NODE_ENV, "HEARTH_NODE": node, "PYTHONPATH": str(platform)}
        p = start_node(
            tmp / f"{name}-{node}", redis_url=redis.url, token=cn.TOKEN, dataplane="auto", env=env
        )
        procs.append(p)
        nodes[node] = p
    a = nodes["node-a"]
    fns = cn.FUNCTIONS[:2]  # echo-a on node-a, echo-b on node-b
    for fn, handler, node in fns:
        a.client.deploy(
            {
                "name": fn,
                "handler": f"{cn.H}:{handler}",
                "labels": {NODE_HINT: node},
                "timeout_s": 60,
            }
        )
    for h in nodes.values():
        cn._wait(
            lambda h=h: (
                len(h.client.status()["cluster"]["peers"]) == 2
                and all(f[0] in h.client.status()["cluster"]["routes"] for f in fns)
                and {f[0] for f in fns} <= {f["name"] for f in h.client.functions()}
            ),
            60,
        )
    inv = f"{a.url}/v1/functions/%s:invoke"
    return {f"{name}:cross": inv % "echo-b", f"{name}:same": inv % "echo-a"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="+", help="git revisions; '.' is the working tree")
    ap.add_argument("--requests", type=int, default=1500, help="per URL")
    ap.add_argument("--quick", action="store_true", help="500 requests per URL")
    args = ap.parse_args()
    if args.quick:
        args.requests = 500
    tmp = Path(tempfile.mkdtemp(prefix="hearth-xnode-ab-"))
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", cn.BARE, str(bare_port)])
    floors, relays = cn.start_floors()
    procs: list = []
    redises: list = []
    try:
        urls: dict[str, str] = {}
        for i, rev in enumerate(args.revs):
            urls.update(pair(tmp, rev, checkout(rev, tmp / f"src{i}"), procs, redises))
        urls["bare"] = f"http://127.0.0.1:{bare_port}/echo"
        urls.update(floors)
        time.sleep(1.5)  # three beats: every announcement lists the functions
        load0, t0 = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        lat = asyncio.run(cn.latency(urls, args.requests))
        p50 = {k: cn.pct(xs, 50) * 1e3 for k, xs in lat.items()}
        out: dict = {
            "start": t0,
            "load": [round(load0, 1), round(os.getloadavg()[0], 1)],
            "requests_per_url": args.requests,
            "p50_ms": {k: round(v, 3) for k, v in p50.items()},
        }
        b = p50["bare"]
        # two loopback hops more, and almost no Python
        hops = p50["floor_cross_shape"] - p50["floor_same_shape"]
        out["floors_over_bare_p50"] = {
            "same_node_shape": round(p50["floor_same_shape"] / b, 2),
            "cross_node_shape": round(p50["floor_cross_shape"] / b, 2),
        }
        head = ("cross/bare", "same/bare", "cross/same", "added/2hops")
        print(f"{'version':24}" + "".join(f"{h:>12}" for h in head))
        for rev in args.revs:
            x, s = p50[f"{rev}:cross"], p50[f"{rev}:same"]
            out[rev] = {
                "cross_over_bare_p50": round(x / b, 2),
                "same_over_bare_p50": round(s / b, 2),
                "cross_over_same_p50": round(x / s, 2),
                # what crossing adds to this version's same-node call, over two bare hops
                "added_over_two_hops": round((x - s) / hops, 2) if hops > 0 else None,
                "target_invoke_p50_within_2x_aiohttp": x / b <= 2.0,
            }
            print(f"{rev:24}" + "".join(f"{v!s:>12}" for v in list(out[rev].values())[:4]))
        out["targets_met"] = out[args.revs[-1]]["target_invoke_p50_within_2x_aiohttp"]
        f = out["floors_over_bare_p50"]
        print(
            f"bare aiohttp p50 {b:.3f} ms; through 1 / 2 relay processes (bare + 2 / 4 loopback "
            f"hops) {f['same_node_shape']}x / {f['cross_node_shape']}x; load {out['load']}"
        )
        print(json.dumps(out))
    finally:
        for p in procs:
            p.stop()
        for p in (bare, *relays):
            p.kill()
            p.wait()
        for r in redises:
            r.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # (a run left it behind before)


if __name__ == "__main__":
    main()
