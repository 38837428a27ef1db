"""Cold starts: a new instance from the node's zygote (fork server) against the plain process
start it replaces, with the two floors beside them, in one run.

Measured (each a median over several samples, milliseconds):
  bare fork+exec     fork()+exec of a Python interpreter until its first line (`python -c`)
  bare fork          fork() of a parent that has imported hearth's runtime and numpy, until the
                     child's first line: what a zygote cannot beat
  zygote fork        on `hearth up`: the agent asks the zygote for an instance until the child's
                     first line (the cold-start record's pod_allocation phase)
  new instance       on `hearth up`: an HTTP request for a function the node has never run until
                     the handler's first line (demo handlers hello and array-sum, each sample a
                     new function declaring `preload: [numpy, asyncio]`, the demo module's
                     dependencies, so it forks from the zygote that imported them when the first
                     such function was deployed), with the zygote (default) and with
                     HEARTH_RUNNER=process
  warm pool          the same with a warm-pool instance waiting (specialised on the request)
  warm invoke        the floor under both: the first line of a call to an instance already
                     running, measured the same way
  pool floor         the warm pool's chain of hops with no Hearth code (a new connection, an HTTP
                     POST to a plain server, one AF_UNIX message to an idle forked worker's first
                     line), one sample before each pool start, so both see the same host state;
                     and the host's bare wake-up after 0.2 s idle, after them (`host_wake_us`);
                     see pool_floor.py
  idle pool start    the warm pool's start again, its instance idle 2 s (--quick; else 5 s) before
                     it, as in real use, and the floor after the same idle: see pool_idle.py

"The request" is the moment the client writes it on a connection to the gateway that is already
open (http.client, kept alive), as a load generator or a front gateway sends: not the client
library's own set-up (urllib builds an opener and a new connection per call, ~1 ms here), nor
http.client's building of the request: the clock starts at the first write on the socket. Until
7 Dec 2026 evening it started before `conn.request()`, and so held that build (~0.1 ms);
`client_build_ms` and `warm_pool_from_build_ms` keep the old clock's view of the same starts.
  fedavg instance    a FedAvg aggregator (numpy, numba kernels) cold start, request to ready
                     (the cold-start record's total), zygote vs plain process

Targets (issue #19): new instance p50 <= 20 ms, warm pool <= 2 ms, fedavg instance <= 50 ms.
Absolute figures depend on the machine's load: the ratios beside the baselines are the stable
part. Ends with one JSON line.

    .venv/bin/python benchmarks/cold_start.py [--quick] [--rev main]

With ``--rev REV`` it also times warm-pool starts of REV's ``platform/`` (by git archive) in
pairs with this tree's: both nodes up at once, one start on each in turn, who goes first
alternating, so each pair shares the machine's load (``warm_pool_paired_ms``,
``ratio_warm_pool_vs_rev_paired``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pool_floor  # noqa: E402
import pool_idle  # noqa: E402
from bare_forks import bare_fork, bare_fork_exec  # noqa: E402
from hearth.agent.zygote import zygote_plan  # noqa: E402
from hearth.localnode import LocalNode, start_node  # noqa: E402
from hearth.spec import parse_spec  # noqa: E402
from pool_idle import STEPS, step_times  # noqa: E402

PRELOAD = ["numpy", "asyncio"]  # what the demo handlers' module imports

PROBE = """
import time

from hearth.functions.examples import handlers as demo


def hello(event):
    t = time.time()  # the handler's first line
    demo.hello(event)
    return {"t": t}


def array_sum(event):
    t = time.time()
    demo.array_sum(event)
    return {"t": t}
"""


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 2) if xs else float("nan")


def cold_records(node: LocalNode, names: list[str] = (), timeout: float = 30) -> dict[str, dict]:
    """The node's cold-start records, once those of `names` are in (a start is recorded when
    its task resumes, which can be a few loop passes after its first reply went out)."""
    t0 = time.monotonic()
    while True:
        recs = node.client.request("GET", "/v1/coldstarts", admin=True).json()["coldstarts"]
        out = {r["function"]: r for r in recs}
        if all(n in out for n in names) or time.monotonic() - t0 > timeout:
            return out
        time.sleep(0.05)


def wait_pool(node: LocalNode, want: int, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while node.client.status().get("warm_pool_ready", 0) < want:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("the warm pool did not refill")
        time.sleep(0.05)


def wait_zygote(node: LocalNode, key: str, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while node.client.status().get("zygotes", {}).get(key, {}).get("state") != "ready":
        if node.client.status().get("runner") != "zygote":
            return
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"zygote {key} did not come up")
        time.sleep(0.1)


def first_line(node: LocalNode, name: str, body: bytes, ctype: str) -> float:
    """Milliseconds from writing the invoke request (on an open keep-alive connection) to the
    handler's first line (its `t`)."""
    return timed_call(node, name, body, ctype)[0]


class WriteStamp:
    """The client's socket, stamping its first write: the moment the request leaves the
    client, after http.client has built it (the client library's work, not the platform's;
    `Timed.build_ms` keeps it, so the clock used before this can be rebuilt)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.t: float | None = None

    def sendall(self, data: bytes) -> None:
        if self.t is None:
            self.t = time.time()
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


class Timed(NamedTuple):
    first_ms: float  # the request's write -> the handler's first line
    t: float  # the handler's first line (epoch seconds)
    build_ms: float  # http.client building the request, before its write
    answer_ms: float  # the request's write -> its answer read whole (what the caller waits)


def timed_call(node: LocalNode, name: str, body: bytes, ctype: str) -> Timed:
    """One invoke on a new connection, timed from the request's first write."""
    u = urlsplit(node.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        # the connection is up before the clock starts; no request on it first, so the invoke
        # takes the path a client's first request takes (a GET first would hand the connection
        # to aiohttp's parser for good: not the lean path most invokes get)
        conn.connect()
        stamp = WriteStamp(conn.sock)
        conn.sock = stamp
        t0 = time.time()
        conn.request(
            "POST", f"/v1/functions/{name}:invoke", body=body, headers={"Content-Type": ctype}
        )
        r = conn.getresponse()
        out = r.read()
        t_end = time.time()
    finally:
        conn.close()
    if r.status != 200:
        raise RuntimeError(f"{name}: HTTP {r.status} {out[:200]!r}")
    assert stamp.t is not None  # http.client writes the request through sendall
    t = json.loads(out)["t"]
    return Timed((t - stamp.t) * 1000, t, (stamp.t - t0) * 1000, (t_end - stamp.t) * 1000)


def new_functions(
    node: LocalNode,
    code: Path,
    n: int,
    tag: str,
    pool: int = 0,
    before: Callable[[int], None] | None = None,
) -> dict:
    """n never-run functions, each invoked once: request → handler's first line; then the
    same call again (warm: the floor). `before(k)` runs ahead of the k-th one's deploy (a
    baseline's sample taken in turn with the starts)."""
    c = node.client
    first, names, warm, build, answer, wrote = [], [], [], [], [], []
    for k in range(n):
        if before is not None:
            before(k)
        name = f"cb-{tag}-{k}"
        spec, body, ctype = probe_spec(name, k, code)
        c.deploy(spec)
        if k == 0:  # its zygote starts with the first deploy, off the request path
            wait_zygote(node, zygote_plan(parse_spec(spec))[0])
        if pool:
            wait_pool(node, pool)
        got = timed_call(node, name, body, ctype)
        first.append(got.first_ms)
        wrote.append(got.t - got.first_ms / 1000)  # the request's first write, epoch s
        build.append(got.build_ms)
        answer.append(got.answer_ms)
        warm.append(first_line(node, name, body, ctype))
        names.append(name)
    recs = cold_records(node, names)
    phases = [recs[nm]["phases"] for nm in names if nm in recs]
    return {
        "first_line_ms": first,
        "build_ms": build,
        "answer_ms": answer,
        "warm_ms": warm,
        "fork_ms": [(p["process_started"] - p["spawned"]) * 1000 for p in phases],
        "total_ms": [(p["ready"] - p["requested"]) * 1000 for p in phases],
        "from_pool": sum(bool(recs[nm]["from_pool"]) for nm in names if nm in recs),
        # each start's write, its first line (ms after) and its record: where it went
        "starts": [(w, f, recs.get(nm)) for w, f, nm in zip(wrote, first, names, strict=True)],
    }


def probe_spec(name: str, k: int, code: Path) -> tuple[dict, bytes, str]:
    """The k-th sample's spec (hello and array-sum in turn) and its request body."""
    handler = "hello" if k % 2 == 0 else "array_sum"
    spec = {
        "name": name,
        "handler": f"cb_probe:{handler}",
        "code_path": str(code),
        "preload": PRELOAD,
    }
    if handler == "array_sum":
        return spec, np.arange(1024, dtype=np.float32).tobytes(), "application/octet-stream"
    return spec, b"{}", "application/json"


# each node here believes it has the machine's 2 cores x 4000m; past ~15 instances of 500m its
# placement evicts the pooled instance to make room, and a start no longer comes from the pool
MAX_PAIRS = 12


def warm_pool_pairs(state: Path, code: Path, rev: str, other: Path, n: int) -> dict:
    """Warm-pool starts of this tree and of git revision `rev` (its `platform/` at `other`) in
    pairs: both nodes up at once, one start on each in turn (who goes first alternates), so
    the two starts of a pair share the machine's load; only pairs where both came from the
    pool count."""
    first: dict[str, list[float]] = {"this": [], rev: []}
    at: dict[str, list[float]] = {"this": [], rev: []}  # the handler's first line, epoch s
    answered: dict[str, list[float]] = {"this": [], rev: []}  # the answer read, ms
    env = {"HEARTH_RUNNER": "zygote"}
    mine = {**env, "PYTHONPATH": str(ROOT / "platform")}
    theirs = {**env, "PYTHONPATH": str(other)}
    with (
        start_node(state / "pair-this", env=mine, warm_pool=1) as this_node,
        start_node(state / "pair-rev", env=theirs, warm_pool=1) as rev_node,
    ):
        nodes = {"this": this_node, rev: rev_node}
        for k in range(n):
            for who in ("this", rev) if k % 2 == 0 else (rev, "this"):
                node = nodes[who]
                spec, body, ctype = probe_spec(f"cb-pair-{k}", k, code)
                node.client.deploy(spec)
                if k == 0:
                    wait_zygote(node, zygote_plan(parse_spec(spec))[0])
                for n_ in nodes.values():  # neither node is refilling its pool meanwhile
                    wait_pool(n_, 1)
                got = timed_call(node, spec["name"], body, ctype)
                first[who].append(got.first_ms)
                at[who].append(got.t)
                answered[who].append(got.answer_ms)
        recs = {
            who: cold_records(node, [f"cb-pair-{k}" for k in range(n)])
            for who, node in nodes.items()
        }
    keep = [
        k for k in range(n) if all(recs[w].get(f"cb-pair-{k}", {}).get("from_pool") for w in nodes)
    ]
    a, b = [first["this"][k] for k in keep], [first[rev][k] for k in keep]

    def steps(who: str) -> dict[str, float]:
        """Where the starts went, step by step (medians, ms): the client's write, the agent's
        start request, the spec sent, the instance's import start and end, its ready stamp,
        the handler's first line (all on the wall clock of one machine)."""
        return {s_: med(v) for s_, v in step_samples(who).items()}

    def step_samples(who: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {s: [] for s in STEPS}
        for k in keep:
            times = step_times(
                at[who][k] - first[who][k] / 1000, first[who][k], recs[who][f"cb-pair-{k}"]
            )
            for s_, x in zip(STEPS, times, strict=True):
                out[s_].append(x)
        return out

    return {
        "this_ms": med(a),
        "rev_ms": med(b),
        "this_steps": steps("this"),
        "rev_steps": steps(rev),
        "samples": {"this": step_samples("this"), rev: step_samples(rev)},
        "ratio": round(med(a) / med(b), 3) if keep else float("nan"),
        "answer_ms": med([answered["this"][k] for k in keep]),
        "answer_rev_ms": med([answered[rev][k] for k in keep]),
        "pairs": len(keep),
        "this_faster": sum(x < y for x, y in zip(a, b, strict=True)),
    }


def fedavg_instances(node: LocalNode, n: int, tag: str) -> list[float]:
    """n FedAvg aggregators (a one-level tree each), each cold-started by a status call."""
    from hearth.functions.fedavg import client as fl
    from hearth.functions.fedavg.tree import plan_tree

    names = []
    for k in range(n):
        plan = plan_tree({"node-0": 2}, fan_in=2, levels=1, prefix=f"cb{tag}{k}")
        for s in plan.function_specs(model_bytes=1 << 16):
            node.client.deploy(s.to_dict())
            names.append(s.name)
        wait_zygote(node, "builtins")  # started by the first deploy, off the request path
        for nm in names[-len(plan.instances) :]:
            fl.control(node.url, nm, op="status")
    recs = cold_records(node, names)
    return [(recs[nm]["phases"]["ready"] - recs[nm]["phases"]["requested"]) * 1000 for nm in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    ap.add_argument(
        "--rev",
        help="also time warm-pool starts of this git revision in pairs with this tree's "
        "(two nodes up at once, starts alternated)",
    )
    ap.add_argument(
        "--idle-s", type=float, help="the idle pool starts' idle (default 2 s, 5 s without --quick)"
    )
    a = ap.parse_args()
    if a.idle_s is not None and not 0 <= a.idle_s <= 600:
        ap.error(f"--idle-s must be between 0 and 600 seconds, not {a.idle_s}")
    n_new, n_pool, n_fed, n_bare = (8, 6, 2, 10) if a.quick else (30, 20, 6, 40)
    idle_s, n_idle = pool_idle.QUICK if a.quick else pool_idle.FULL
    idle_s = idle_s if a.idle_s is None else a.idle_s  # (a short one: the procedure's control)

    base = {"fork_exec": bare_fork_exec(n_bare), "fork": bare_fork(n_bare)}
    state = Path(tempfile.mkdtemp(prefix="hearth-coldbench-"))
    try:
        import revtree  # a revision's platform/, by git archive

        # read first: a mistyped revision fails at once, before a minute of measuring
        rev_platform = revtree.platform_of(a.rev, state)
        code = state / "code"
        code.mkdir()
        (code / "cb_probe.py").write_text(PROBE)
        env = {"HEARTH_RUNNER": "zygote"}
        with start_node(state / "zygote", env=env) as node:
            wait_zygote(node, "python3.11")  # started with the node, off the request path
            zyg = new_functions(node, code, n_new, "z")
            fed_z = fedavg_instances(node, n_fed, "z")
        floor = pool_floor.Floor(state)
        with start_node(state / "pool", env=env, warm_pool=1) as node, floor:

            def floor_sample(k: int) -> None:
                _, body, ctype = probe_spec("floor", k, code)  # the k-th pool start's request
                floor.sample(lambda f: timed_call(f, "floor", body, ctype).first_ms)

            wait_pool(node, 1)
            pool = new_functions(node, code, n_pool, "p", pool=1, before=floor_sample)
            # next: the first one's instance is the refill after the last start above
            idle, idle_recs = pool_idle.idle_starts(
                node,
                n_idle,
                idle_s,
                lambda k: probe_spec(f"cb-i-{k}", k, code),
                timed_call,
                cold_records,
            )
            floor.wake_samples()  # after the starts: idle before one lengthens it (pool_floor.py)
            _, body, ctype = probe_spec("floor", 0, code)
            floor_idle = pool_idle.floor_idle_samples(
                lambda: timed_call(floor, "floor", body, ctype).first_ms, n_idle, idle_s
            )
        with start_node(state / "process", env={"HEARTH_RUNNER": "process"}) as node:
            proc = new_functions(node, code, max(4, n_new // 2), "x")
            fed_p = fedavg_instances(node, max(1, n_fed // 2), "x")
        pairs = (
            warm_pool_pairs(state, code, a.rev, rev_platform, min(MAX_PAIRS, 2 * n_pool))
            if rev_platform is not None
            else None
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)  # (a run left it behind before)

    fig = {
        "bare_fork_exec_ms": med(base["fork_exec"]),
        "bare_fork_preimported_ms": med(base["fork"]),
        "zygote_fork_ms": med(zyg["fork_ms"]),
        "new_instance_ms": med(zyg["first_line_ms"]),
        "new_instance_total_ms": med(zyg["total_ms"]),
        "new_instance_process_ms": med(proc["first_line_ms"]),
        "new_instance_process_total_ms": med(proc["total_ms"]),
        "warm_pool_ms": med(pool["first_line_ms"]),
        "warm_pool_samples": [round(x, 2) for x in pool["first_line_ms"]],  # ms, in order
        "warm_pool_total_ms": med(pool["total_ms"]),
        "warm_pool_answer_ms": med(pool["answer_ms"]),  # the request's write -> its answer
        # the same starts on the clock used before 7 Dec 2026 evening (from before http.client
        # built the request), and that build alone
        "warm_pool_from_build_ms": med(
            [a + b for a, b in zip(pool["first_line_ms"], pool["build_ms"], strict=True)]
        ),
        "client_build_ms": med(zyg["build_ms"] + pool["build_ms"]),
        "warm_pool_from_pool": f"{pool['from_pool']}/{len(pool['first_line_ms'])}",
        "warm_invoke_ms": med(zyg["warm_ms"] + pool["warm_ms"]),
        # the pool start's hops with no Hearth code, each sample just before a pool start
        "pool_floor_ms": med(floor.samples),
        "pool_floor_samples": [round(x, 2) for x in floor.samples],  # ms, in order
        "host_wake_us": round(statistics.median(floor.wakes), 1),  # a bare wake-up, 0.2 s idle
        "fedavg_instance_ms": med(fed_z),
        "fedavg_instance_process_ms": med(fed_p),
    }
    fig["ratio_new_instance_vs_process"] = round(
        fig["new_instance_ms"] / fig["new_instance_process_ms"], 3
    )
    fig["ratio_zygote_fork_vs_fork_exec"] = round(
        fig["zygote_fork_ms"] / fig["bare_fork_exec_ms"], 3
    )
    fig["ratio_zygote_fork_vs_bare_fork"] = round(
        fig["zygote_fork_ms"] / fig["bare_fork_preimported_ms"], 3
    )
    fig["ratio_warm_pool_vs_warm_invoke"] = round(fig["warm_pool_ms"] / fig["warm_invoke_ms"], 2)
    fig["ratio_warm_pool_vs_floor"] = round(fig["warm_pool_ms"] / fig["pool_floor_ms"], 2)
    fig["ratio_fedavg_vs_process"] = round(
        fig["fedavg_instance_ms"] / fig["fedavg_instance_process_ms"], 3
    )
    if pairs is not None:
        fig["rev"] = a.rev
        fig["warm_pool_paired_ms"] = pairs["this_ms"]
        fig["warm_pool_paired_rev_ms"] = pairs["rev_ms"]
        fig["ratio_warm_pool_vs_rev_paired"] = pairs["ratio"]
        # the same starts to their answers (what the caller waits for)
        fig["warm_pool_answer_paired_ms"] = pairs["answer_ms"]
        fig["warm_pool_answer_paired_rev_ms"] = pairs["answer_rev_ms"]
        fig["warm_pool_pairs"] = f"{pairs['this_faster']}/{pairs['pairs']} faster"
        fig["warm_pool_steps"] = pairs["this_steps"]
        fig["warm_pool_steps_rev"] = pairs["rev_steps"]
    # the pool starts after a realistic idle (pool_idle.py), and the floor after the same idle
    fig.update(
        pool_idle.figures(
            idle, idle_recs, pool["starts"], fig["warm_pool_ms"], fig["pool_floor_ms"], floor_idle
        )
    )
    fig["target_new_instance_le_20ms"] = fig["new_instance_ms"] <= 20
    fig["target_warm_pool_le_2ms"] = fig["warm_pool_ms"] <= 2
    fig["target_fedavg_instance_le_50ms"] = fig["fedavg_instance_ms"] <= 50
    fig["targets_met"] = all(v for k, v in fig.items() if k.startswith("target_"))
    fig["load_avg_1m"] = round(os.getloadavg()[0], 2)

    print(f"{'measure':34} {'p50 ms':>10}")
    for k, v in fig.items():
        if k.endswith("_ms"):
            print(f"{k:34} {v:>10}")
    for k, v in fig.items():
        if k.startswith("ratio_"):
            print(f"{k:34} {v:>10}")
    print(f"{'host_wake_us':34} {fig['host_wake_us']:>10}")
    print(f"{'warm_pool_idle_s':34} {fig['warm_pool_idle_s']:>10}")
    print(pool_floor.LEGEND)
    print(pool_idle.LEGEND)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
