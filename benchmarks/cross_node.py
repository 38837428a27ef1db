"""Cross-node invocations: two real node agents (`hearth up`, separate processes, state dirs,
pools and data planes, one Redis) joined by the agent-to-agent link, measured side by side with
their baselines in the same run:

* 64-byte invoke latency (p50/p99) through node a's gateway of a function hosted on node b
  (forwarded over the link), of the same function hosted on node a (same node), and of a bare
  aiohttp server answering the same bytes, and of that bare request passed through one and
  through two plain asyncio relay processes (``relay_chain.py``: the floors of a same-node and a
  cross-node shaped request; not in ``--containers``) — one client, requests interleaved round
  by round;
* payload throughput of a chained call whose 1/64/256 MiB payload (lent from the caller's shared
  memory) crosses to node b, against a plain Python socket loop (sendall a memoryview / recv_into
  a preallocated buffer) between two processes;
* a FedAvg round over both nodes: bytes that crossed (one partial from the non-top node) against
  the flat alternative (every update of that node sent to the top).

    .venv/bin/python benchmarks/cross_node.py [--quick]

Ends with one JSON line: every figure, each target as a boolean, and `targets_met`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from hearth.client import Client  # noqa: E402
from hearth.controller.placement import NODE_HINT  # noqa: E402
from hearth.localnode import start_node  # noqa: E402
from hearth.redis_server import RedisServer, free_port  # noqa: E402

MiB = 1 << 20
COLD_S = 400.0  # a fresh container compiles the fold kernels (numba) at the first start
H = "hearth.functions.examples.handlers"
TOKEN = "bench-admin-token-0123456789"
CLUSTER = "bench-cluster-token-0123456789abcdef"

BARE = """
from aiohttp import web
async def h(request):
    return web.Response(body=await request.read())
app = web.Application()
app.router.add_post("/echo", h)
argv = __import__("sys").argv
web.run_app(app, host=argv[2] if len(argv) > 2 else "127.0.0.1", port=int(argv[1]), print=None, access_log=None)
"""

# The raw-TCP baseline's receiver: recv_into one preallocated buffer, ack each transfer with a byte.
RECEIVER = """
import socket, sys
n = int(sys.argv[2])
buf = memoryview(bytearray(n))
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1", int(sys.argv[1]))); srv.listen(1)
while True:  # one sender connection at a time
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        hdr = c.recv(8, socket.MSG_WAITALL)
        if len(hdr) < 8:
            break
        want, got = int.from_bytes(hdr, "little"), 0
        while got < want:
            k = c.recv_into(buf[got:want])
            if not k:
                break
            got += k
        c.sendall(b"k")
    c.close()
"""

# The raw-TCP baseline's sender, for a run inside a container: prints the seconds of each transfer.
SENDER = """
import socket, sys, time
host, port, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = memoryview(bytearray(b"\\x07" * n))
s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(reps):
    t0 = time.perf_counter()
    s.sendall(n.to_bytes(8, "little")); s.sendall(data)
    assert s.recv(1) == b"k"
    print(time.perf_counter() - t0, flush=True)
s.close()
"""


def start_floors() -> tuple[dict[str, str], list[subprocess.Popen]]:
    """The two floors of benchmarks/relay_chain.py: a bare aiohttp request passed through one
    process (the shape of a same-node invoke: bare + 2 loopback hops) and through two (the shape
    of a cross-node one: bare + 4); their URLs and processes."""
    chain = str(Path(__file__).resolve().parent / "relay_chain.py")
    urls, procs = {}, []
    for name, n in (("floor_same_shape", 1), ("floor_cross_shape", 2)):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, chain, str(port), str(n)]))
        urls[name] = f"http://127.0.0.1:{port}/echo"
    return urls, procs


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


class RawTcp:
    """The baseline: a plain Python socket loop to another process (sendall a memoryview,
    recv_into one preallocated buffer there, a one-byte ack per transfer)."""

    def __init__(self, largest: int):
        port = free_port()
        self.rx = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), str(largest)])
        for _ in range(200):
            try:
                self.s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.data = memoryview(bytearray(b"\x07" * largest))

    def seconds(self, n: int) -> float:
        t0 = time.perf_counter()
        self.s.sendall(n.to_bytes(8, "little"))
        self.s.sendall(self.data[:n])
        assert self.s.recv(1) == b"k"
        return time.perf_counter() - t0

    def close(self) -> None:
        self.s.close()
        self.rx.kill()
        self.rx.wait()


async def latency(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    import aiohttp

    body = b"x" * 64
    lat: dict[str, list[float]] = {k: [] for k in urls}
    async with aiohttp.ClientSession() as s:
        for i in range(n + 50):
            for k, u in urls.items():
                t0 = time.perf_counter()
                async with s.post(
                    u, data=body, headers={"Content-Type": "application/octet-stream"}
                ) as r:
                    got = await r.read()
                    assert r.status == 200 and got == body, (k, r.status, got[:200])
                if i >= 50:
                    lat[k].append(time.perf_counter() - t0)
    return lat


def push(c: Client, to: str, n: int, reps: int) -> float:
    """Median seconds of one chained call carrying n bytes to `to` (timed inside the caller)."""
    r = c.invoke(
        "push", json.dumps({"bytes": n, "to": to, "reps": reps + 1}).encode(), "application/json"
    )
    return float(np.median(json.loads(r.body)["seconds"][1:]))


def fedavg_round(nodes: dict, per_node: int) -> dict:
    from hearth.functions.fedavg import client as fl
    from hearth.functions.fedavg.aggregation import parse_model
    from hearth.functions.fedavg.pack import pack
    from hearth.functions.fedavg.tree import plan_tree

    plan = plan_tree({n: per_node for n in nodes}, fan_in=max(4, per_node), prefix="benchfl")
    shapes = {"w1": (256, 512), "w2": (512, 64), "b": (64,)}
    model_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
    a = next(iter(nodes.values()))
    for s in plan.function_specs(model_bytes=model_bytes):
        # in a fresh container the first start compiles the fold kernels (numba): allow for it
        a.client.deploy({**s.to_dict(), "timeout_s": int(COLD_S)})
    names = [r.name for r in plan.roles]
    for h in nodes.values():
        _wait(lambda h=h: all(f in h.client.status()["cluster"]["placement"] for f in names))
    before = {n: h.client.status()["cluster"]["bytes"] for n, h in nodes.items()}
    for r in sorted(plan.roles, key=lambda r: ("top", "middle", "leaf").index(r.level)):
        # a client talks to the node of each aggregator (the front gateway's routing)
        ctl = msgpack.packb({"op": "open", "round": 1, "expected": r.inputs})
        fl.invoke(nodes[r.node].url, r.name, ctl, "application/msgpack", timeout=COLD_S)
    rng = np.random.default_rng(0)
    ups, flat = [], 0
    for n, h in nodes.items():
        for i in range(per_node):
            m = [(k, rng.normal(0, 1, s).astype(np.float32)) for k, s in shapes.items()]
            k = int(rng.integers(1, 100))
            ups.append((m, k))
            body = pack(m, k, round=1, client=f"{n}-{i}")
            if n != plan.top.node:
                flat += len(body)
            leaf = plan.leaf_for(n, i).instance
            assert fl.invoke(h.url, leaf, body, "application/octet-stream", COLD_S).status == 200
    fetch = msgpack.packb({"op": "fetch", "round": 1})
    top = fl.invoke(nodes[plan.top.node].url, plan.top.name, fetch, "application/msgpack", COLD_S)
    got = dict(parse_model(top.body).layers)
    total = sum(k for _, k in ups)
    exact = all(
        np.allclose(
            got[name],
            sum(dict(m)[name].astype(np.float64) * k for m, k in ups) / total,
            rtol=1e-5,
            atol=1e-7,
        )
        for name in shapes
    )
    crossed, calls = 0, 0
    for n, h in nodes.items():
        b = h.client.status()["cluster"]["bytes"]
        crossed += sum(b["sent_by_function"].values()) - sum(before[n]["sent_by_function"].values())
        calls += sum(b["calls_by_function"].values()) - sum(before[n]["calls_by_function"].values())
    non_top = len(nodes) - 1
    return {
        "fedavg_model_bytes": model_bytes,
        "fedavg_cross_node_bytes": crossed,
        "fedavg_cross_node_calls": calls,
        "fedavg_flat_cross_node_bytes": flat,
        "fedavg_flat_over_tree": round(flat / max(1, crossed), 2),
        "fedavg_exact": bool(exact),
        "fedavg_one_model_per_non_top_node": bool(
            calls == non_top and model_bytes * non_top <= crossed < (model_bytes + 4096) * non_top
        ),
    }


def _wait(cond, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("cluster did not settle")
        time.sleep(0.1)


FUNCTIONS = (
    ("echo-a", "echo", "node-a"),
    ("echo-b", "echo", "node-b"),
    ("sink-a", "noop", "node-a"),
    ("sink-b", "noop", "node-b"),
    ("push", "push", "node-a"),
)
NODE_ENV = {
    "HEARTH_CLUSTER_TOKEN": CLUSTER,
    "HEARTH_HEARTBEAT_S": "0.5",
    # big slots that keep their pages (steady traffic, as the raw loop's buffer)
    "HEARTH_POOL_CLASSES": "64KiB:1024,1MiB:64,80MiB:4,320MiB:3",
    "HEARTH_POOL_TRIM": "off",
}


@dataclass
class Side:
    """One node agent as the benchmark sees it."""

    url: str
    client: Client
    dataplane: str


def measure(
    nodes: dict[str, Side],
    bare_url: str,
    raw,
    n_lat: int,
    reps: int,
    mode: str,
    floors: dict[str, str] | None = None,
) -> dict:
    sizes = [1 * MiB, 64 * MiB, 256 * MiB]
    a = nodes["node-a"]
    for fn, handler, node in FUNCTIONS:
        a.client.deploy(
            {"name": fn, "handler": f"{H}:{handler}", "labels": {NODE_HINT: node}, "timeout_s": 120}
        )
    for h in nodes.values():
        _wait(
            lambda h=h: (
                len(h.client.status()["cluster"]["peers"]) == 2
                and all(f[0] in h.client.status()["cluster"]["placement"] for f in FUNCTIONS)
                and {f[0] for f in FUNCTIONS} <= {f["name"] for f in h.client.functions()}
            ),
            60,
        )
    time.sleep(1.5)  # three beats: every announcement lists the functions
    inv = f"{a.url}/v1/functions/%s:invoke"
    lat = asyncio.run(
        latency(
            {
                "cross_node": inv % "echo-b",
                "same_node": inv % "echo-a",
                "bare_aiohttp": bare_url,
                **(floors or {}),
            },
            n_lat,
        )
    )
    out: dict = {
        "mode": mode,
        "dataplanes": {n: h.dataplane for n, h in nodes.items()},
        "latency_requests": n_lat,
    }
    for k, xs in lat.items():
        out[f"{k}_p50_ms"] = round(pct(xs, 50) * 1e3, 3)
        out[f"{k}_p99_ms"] = round(pct(xs, 99) * 1e3, 3)
    out["cross_over_bare_p50"] = round(out["cross_node_p50_ms"] / out["bare_aiohttp_p50_ms"], 2)
    out["cross_over_same_p50"] = round(out["cross_node_p50_ms"] / out["same_node_p50_ms"], 2)
    for k in floors or {}:  # the least these shapes cost with plain asyncio processes
        out[f"{k}_over_bare_p50"] = round(out[f"{k}_p50_ms"] / out["bare_aiohttp_p50_ms"], 2)
    for n in sizes:
        raw.seconds(n)  # warm the receiver's pages
        # alternate baseline and cross-node runs: the shared machine's load drifts
        rs, cs = [], []
        for _ in range(reps):
            rs.append(raw.seconds(n))
            cs.append(push(a.client, "sink-b", n, 1))
        same = n / push(a.client, "sink-a", n, reps)
        cross, base = n / float(np.median(cs)), n / float(np.median(rs))
        tag = f"{n // MiB}mib"
        out[f"cross_node_{tag}_gbps"] = round(cross / 1e9, 3)
        out[f"same_node_{tag}_gbps"] = round(same / 1e9, 3)
        out[f"raw_tcp_{tag}_gbps"] = round(base / 1e9, 3)
        out[f"cross_over_raw_{tag}"] = round(cross / base, 3)
    out.update(fedavg_round(nodes, 3))
    for f in a.client.functions():  # instances stop; the buffers they held go back
        a.client.delete(f["name"])
    for h in nodes.values():
        _wait(lambda h=h: h.client.status()["pool"]["used"] == 0, timeout=30)
    out["slots_in_use_after"] = {n: h.client.status()["pool"]["used"] for n, h in nodes.items()}
    targets = {
        "target_payload_half_of_raw_tcp": all(
            out[f"cross_over_raw_{m}mib"] >= 0.5 for m in (64, 256)
        ),
        "target_invoke_p50_within_2x_aiohttp": out["cross_over_bare_p50"] <= 2.0,
        "target_fedavg_one_model_per_non_top_node": out["fedavg_one_model_per_non_top_node"]
        and out["fedavg_exact"],
    }
    out.update(targets)
    out["targets_met"] = all(targets.values())
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}")
    for k in ("cross_node", "same_node", "bare_aiohttp", *(floors or {})):
        print(f"{k:24}{out[f'{k}_p50_ms']:>10}{out[f'{k}_p99_ms']:>10}")
    print(f"cross-node / bare aiohttp p50: {out['cross_over_bare_p50']}x")
    if floors:
        print(
            "floors (bare aiohttp through 1 / 2 plain relay processes) / bare p50: "
            f"{out['floor_same_shape_over_bare_p50']}x / {out['floor_cross_shape_over_bare_p50']}x"
        )
    print(f"{'payload':10}{'cross GB/s':>12}{'raw TCP GB/s':>14}{'ratio':>8}{'same-node GB/s':>16}")
    for n in sizes:
        t = f"{n // MiB}mib"
        print(
            f"{n // MiB:>4} MiB  {out[f'cross_node_{t}_gbps']:>12}{out[f'raw_tcp_{t}_gbps']:>14}"
            f"{out[f'cross_over_raw_{t}']:>8}{out[f'same_node_{t}_gbps']:>16}"
        )
    print(
        f"fedavg: {out['fedavg_cross_node_bytes']} bytes crossed ({out['fedavg_cross_node_calls']} call), "
        f"flat alternative {out['fedavg_flat_cross_node_bytes']} ({out['fedavg_flat_over_tree']}x)"
    )
    return out


def on_host(n_lat: int, reps: int) -> dict:
    """Two `hearth up` processes on this machine (one Redis, loopback)."""
    tmp = Path(tempfile.mkdtemp(prefix="hearth-xnode-bench-"))
    redis = RedisServer(tmp / "redis").start()
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port)])
    floors, relays = start_floors()
    procs, raw = [], None
    try:
        nodes = {}
        for name in ("node-a", "node-b"):
            p = start_node(
                tmp / name,
                redis_url=redis.url,
                token=TOKEN,
                dataplane="auto",
                env={"HEARTH_NODE": name, **NODE_ENV},
            )
            procs.append(p)
            nodes[name] = Side(p.url, p.client, p.dataplane)
        raw = RawTcp(256 * MiB)
        return measure(
            nodes,
            f"http://127.0.0.1:{bare_port}/echo",
            raw,
            n_lat,
            reps,
            "two host processes (not containers)",
            floors,
        )
    finally:
        if raw is not None:
            raw.close()
        for p in procs:
            p.stop()
        for b in (bare, *relays):
            b.kill()
            b.wait()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # (a run left it behind before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute")
    ap.add_argument(
        "--containers",
        action="store_true",
        help="between two node containers of the project's image (podman; see tests/cluster)",
    )
    args = ap.parse_args()
    n_lat = 300 if args.quick else 2000
    reps = 5 if args.quick else 15
    if args.containers:
        from cross_node_containers import in_containers

        out = in_containers(n_lat, reps, measure, Side, NODE_ENV, BARE, RECEIVER, SENDER)
    else:
        out = on_host(n_lat, reps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
