"""CPU per call of a no-op function's instance process and of its node agent (issues #16, #19).

A node runs the no-op function (one instance, concurrency 64, as ``gateway_overhead.py``); calls
go through its HTTP gateway. The figure is process CPU time (every thread's time on a CPU, from
``/proc/<pid>/task/*/schedstat``) over thousands of calls, divided by the calls answered: it
counts the work a call costs, not how long it waited for a CPU, so it holds on a shared machine
where wall times do not. Three loads, each measured on every node in turn:

- ``serial``: one call at a time on one keep-alive connection (this process is the client);
- ``closed``: `--concurrency` connections each sending its next call when the last is answered
  (a client process of its own);
- ``open``: a fixed rate (`--rate`/s) with ``lean_load.py``'s client (a process of its own): the
  shape of the replay in ``replay_accuracy.py``, where calls arrive alone or a few together.

``--rev REV`` starts a second node from revision REV's ``platform/`` (by ``git archive``) beside
this tree's; the measurements alternate between the nodes, `--reps` rounds, and each figure is
the median of its rounds. Prints a table with this tree's figures over the revision's and ends
with one JSON line. Target (with ``--rev``): the instance's CPU per no-op call at most 0.8x the
revision's, serial and open loop (the median round ratio; the closed loop is printed, not judged:
it batches on both trees).

    .venv/bin/python benchmarks/instance_cpu.py [--quick] [--rev main] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import revtree  # noqa: E402
from gateway_targets import NOOP  # noqa: E402  (the no-op function, as gateway_overhead.py deploys it)
from hearth.localnode import start_node  # noqa: E402

TARGET = 0.8  # this tree's instance CPU per call over the revision's, at most


def cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has run so far, every thread: the sum of its threads'
    ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds; ``/proc/<pid>/stat``'s user + system
    count clock ticks of 10 ms, too coarse for a few thousand calls of ~50 us)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):
            pass  # a thread that ended since the listing: its time is in no file now
    return total / 1e9


def serial(url: str, n: int) -> int:
    """`n` calls one after another on one keep-alive connection; the calls answered 200."""
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    ok = 0
    try:
        for _ in range(n):
            c.request("POST", u.path, body=b"")
            r = c.getresponse()
            r.read()
            ok += r.status == 200
    finally:
        c.close()
    return ok


async def _closed(url: str, n: int, concurrency: int) -> int:
    """`n` calls over `concurrency` keep-alive connections, each sending its next call when
    its last is answered (raw HTTP/1.1: the client's own cost stays out of the way)."""
    u = urlsplit(url)
    req = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    left = [n]
    ok = [0]

    async def worker() -> None:
        r, w = await asyncio.open_connection(u.hostname, u.port)
        try:
            while left[0] > 0:
                left[0] -= 1
                w.write(req)
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                if length:
                    await r.readexactly(length)
                ok[0] += head[9:12] == b"200"
        finally:
            w.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok[0]


def _client(mode: str, url: str, n: int, concurrency: int, rate: float, q: mp.Queue) -> None:
    if mode == "closed":
        q.put(asyncio.run(_closed(url, n, concurrency)))
    else:
        from lean_load import open_loop

        r = asyncio.run(open_loop(url, n / rate, rate))
        q.put(r["n"] - r["errors"])


def in_process(mode: str, url: str, n: int, concurrency: int, rate: float) -> int:
    """Run a client of its own process (spawned); the calls it had answered 200."""
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_client, args=(mode, url, n, concurrency, rate, q))
    p.start()
    try:
        return q.get(timeout=300)
    finally:
        p.join(30)


def instance_pid(node) -> int:
    """The pid of the no-op function's (one) instance."""
    st = json.loads(node.client.request("GET", "/v1/functions/noop", admin=True).body)
    (inst,) = st["status"]["instances"]
    return int(inst["pid"])


def measure(node, mode: str, n: int, concurrency: int, rate: float) -> dict:
    """CPU per answered call (us) of the instance and the agent over one load."""
    url = f"{node.url}/v1/functions/noop:invoke"
    ipid, apid = instance_pid(node), node.proc.pid
    i0, a0 = cpu_s(ipid), cpu_s(apid)
    t0 = time.monotonic()
    ok = serial(url, n) if mode == "serial" else in_process(mode, url, n, concurrency, rate)
    el = time.monotonic() - t0
    i1, a1 = cpu_s(ipid), cpu_s(apid)
    if instance_pid(node) != ipid:
        raise RuntimeError("the instance was replaced during the measurement")
    calls = max(ok, 1)
    return {
        "calls": ok,
        "instance_us": 1e6 * (i1 - i0) / calls,
        "agent_us": 1e6 * (a1 - a0) / calls,
        "rps": ok / el,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer calls per measurement")
    ap.add_argument("--rev", help="also run a node from this git revision's platform/")
    ap.add_argument("--reps", type=int, default=3, help="rounds (median reported)")
    ap.add_argument("-n", type=int, default=None, help="calls per measurement (10000; quick 3000)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop calls per second")
    ap.add_argument("--dataplane", default="auto")
    a = ap.parse_args()
    n = a.n or (3000 if a.quick else 10000)
    tmp = Path(tempfile.mkdtemp(prefix="hearth-instcpu-"))
    rev_platform = revtree.platform_of(a.rev, tmp)  # first: a mistyped one starts no node
    names = ["tree"] + ([f"@{a.rev}"] if a.rev else [])
    nodes: dict = {}
    modes = ("serial", "closed", "open")
    runs: dict = {name: {m: [] for m in modes} for name in names}
    try:
        nodes["tree"] = start_node(tmp / "node", dataplane=a.dataplane)
        if rev_platform is not None:
            env = {"PYTHONPATH": str(rev_platform)}
            nodes[names[1]] = start_node(tmp / "node-rev", dataplane=a.dataplane, env=env)
        for node in nodes.values():
            node.client.deploy(NOOP)
            node.client.invoke("noop", b"")  # the cold start, outside the measurement
            serial(f"{node.url}/v1/functions/noop:invoke", 300)  # warm-up
        for k in range(a.reps):
            order = names if k % 2 == 0 else names[::-1]  # neither node always goes first
            for mode in modes:
                for name in order:
                    r = measure(nodes[name], mode, n, a.concurrency, a.rate)
                    runs[name][mode].append(r)
                    print(
                        f"round {k + 1} {mode:<6} {name:<10} instance {r['instance_us']:6.1f} us"
                        f"  agent {r['agent_us']:6.1f} us  ({r['calls']} calls, {r['rps']:.0f}/s)",
                        flush=True,
                    )
    finally:
        for node in nodes.values():
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name][mode])

    out: dict = {
        "benchmark": "instance_cpu",
        "calls_per_measurement": n,
        "reps": a.reps,
        "concurrency": a.concurrency,
        "rate": a.rate,
        "dataplane": nodes["tree"].dataplane,
    }
    print(f"\nCPU per no-op call, us (median of {a.reps} rounds of {n} calls)")
    print(f"{'load':<8}{'':<11}{'instance':>10}{'agent':>10}")
    for mode in modes:
        for name in names:
            print(
                f"{mode:<8}{name:<11}{med(name, mode, 'instance_us'):>10.1f}"
                f"{med(name, mode, 'agent_us'):>10.1f}"
            )
            key = "" if name == "tree" else "rev_"
            out[f"{key}{mode}_instance_us"] = round(med(name, mode, "instance_us"), 1)
            out[f"{key}{mode}_agent_us"] = round(med(name, mode, "agent_us"), 1)
        if a.rev:
            ratios = {
                who: [
                    t[f"{who}_us"] / max(r[f"{who}_us"], 1e-9)
                    for t, r in zip(runs["tree"][mode], runs[names[1]][mode], strict=True)
                ]
                for who in ("instance", "agent")
            }
            for who, rs in ratios.items():
                out[f"{mode}_{who}_ratio"] = round(statistics.median(rs), 3)
                out[f"{mode}_{who}_ratio_rounds"] = [round(x, 3) for x in rs]
            print(
                f"{mode:<8}{'ratio':<11}{out[f'{mode}_instance_ratio']:>9.2f}x"
                f"{out[f'{mode}_agent_ratio']:>9.2f}x   (median of the rounds' tree/{a.rev})"
            )
    if a.rev:
        out["rev"] = a.rev
        for mode in ("serial", "open"):
            out[f"target_{mode}_instance_le_{TARGET}x_rev"] = (
                out[f"{mode}_instance_ratio"] <= TARGET
            )
        out["targets_met"] = all(v for k, v in out.items() if k.startswith("target_"))
    else:
        out["targets_met"] = None  # the target is against a revision: run with --rev
    out["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
