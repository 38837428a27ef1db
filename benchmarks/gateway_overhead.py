"""Gateway overhead: a no-op function invoked through Hearth (gateway → slot + descriptor →
instance process → reply) vs a bare aiohttp handler returning the same bytes, with the same load
generator (a separate process) in the same run.

Three measurements per target: closed-loop throughput at fixed concurrency, latency at a fixed
open-loop rate (500 requests/s), and the latency of one request at a time ("serial": no queueing,
so the figure a busy shared machine distorts least; issue #19's warm no-op invoke p50 <= 0.5 ms is
checked on it and on the open-loop p50).

The open loop is measured twice per target, with two clients. **The p50 target is judged with
the lean client** (`lean_load.py`: raw asyncio protocol, HTTP/1.1 keep-alive, a bounded pool of
connections, its own process, the same for every target), since 7 Dec 2026. Before, it was
judged with aiohttp's client alone, which costs about 0.4 ms of its own per request (the bare
aiohttp server measured 0.51-0.74 ms open loop with it, 0.11 ms with the lean one: figures with
their commands and loads in docs/platform.md): that target measured mostly the
client. The lean client's own floor (against a minimal static responder) is printed and in the
JSON (`floor_*_lean`), and the bare aiohttp server is measured with it in the same run. The
aiohttp client's figures are still measured, printed and in the JSON under their old keys
(`*_at_rate`), and the p99 <= 5 ms target is still judged on them. The serial client
(http.client, one keep-alive connection) is unchanged. Every measurement runs in alternating
rounds (Hearth, aiohttp, ...; the order reversed every other round: the load on a shared machine
drifts within a minute, so each round compares neighbours): the closed loop's median round ratio
is reported; the open loops run `seconds / rounds` per round and are pooled per target.

Percentiles are of successful (200) responses only, and a target with errors in its
measurement is not met (fast errors would pull a percentile down). The lean client also times
each response from its request's intended send time (`*_lean_intended`: what a generator
falling behind would hide); the p50 target counts only if the lean generator kept its schedule
(its sends' lateness p99 <= `LATE_BOUND_MS`), else the JSON says `lean_run_valid: false` and the
target is not met. Prints a table and ends with one JSON line.

    .venv/bin/python benchmarks/gateway_overhead.py [--quick] [--seconds 20] [--rounds 4] [--rev REV]

`--rev REV` adds a node running revision REV's `platform/` (by `git archive`) as a third target in
the same alternating rounds, and reports this tree's serial and closed-loop figures against it
(the A/B for a change on a shared, noisy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import revtree  # noqa: E402
from hearth.localnode import start_node  # noqa: E402
from hearth.redis_server import free_port  # noqa: E402
from lean_load import RESPONDER  # noqa: E402

BARE = """
from aiohttp import web
async def h(request):
    await request.read()
    return web.Response(body=b"")
app = web.Application()
app.router.add_post("/noop", h)
web.run_app(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), print=None, access_log=None)
"""


def _loadgen(
    url: str, mode: str, seconds: float, concurrency: int, rate: float, q: mp.Queue
) -> None:
    if mode == "lean":  # the open loop with the lean client (lean_load.py)
        from lean_load import run_open_loop

        q.put(run_open_loop(url, seconds, rate))
        return
    import aiohttp

    async def post(s: aiohttp.ClientSession, lat: list[float]) -> int:
        """One POST, its latency appended to `lat` if it succeeded; 1 if it failed (not 200:
        not timed, so fast errors cannot pull a percentile down), else 0."""
        t0 = time.perf_counter()
        async with s.post(url, data=b"") as r:
            await r.read()
            failed = int(r.status != 200)
        if not failed:
            lat.append(time.perf_counter() - t0)
        return failed

    async def closed() -> dict:
        lat: list[float] = []
        errors = 0
        stop = time.perf_counter() + seconds
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < stop:
                    failed = await post(s, lat)  # awaited first: `errors` is shared by workers
                    errors += failed

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            el = time.perf_counter() - t0
        return {"n": len(lat), "rps": len(lat) / el, "lat": lat, "errors": errors}

    async def open_loop() -> dict:
        lat: list[float] = []
        errors = 0
        n = int(seconds * rate)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as s:

            async def one() -> None:
                nonlocal errors
                failed = await post(s, lat)
                errors += failed

            start = time.perf_counter()
            tasks = []
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
            el = time.perf_counter() - start
        return {"n": len(lat), "rps": len(lat) / el, "lat": lat, "errors": errors}

    q.put(asyncio.run(closed() if mode == "closed" else open_loop()))  # (mode "open")


def serial_p50(url: str, n: int) -> float:
    """p50 (ms) of `n` requests sent one after another on one keep-alive connection. Any answer
    but 200 makes the measurement fail (RuntimeError naming the count and the first status): a
    fast 429 or 503 must not pass for a fast invoke."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    lat = []
    bad: list[int] = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            c.request("POST", u.path, body=b"")
            r = c.getresponse()
            r.read()
            lat.append((time.perf_counter() - t0) * 1000)
            if r.status != 200:
                bad.append(r.status)
    finally:
        c.close()
    if bad:
        raise RuntimeError(
            f"serial: {len(bad)} of {n} answers to {url} were not 200 (first: {bad[0]})"
        )
    return float(np.median(lat))


def collect(url: str, mode: str, seconds: float, concurrency: int = 32, rate: float = 500) -> dict:
    """One measurement's raw result (latencies in seconds), from the generator's own process."""
    q: mp.Queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(
        target=_loadgen, args=(url, mode, seconds, concurrency, rate, q)
    )
    p.start()
    res = q.get(timeout=seconds * 4 + 60)
    p.join()
    return res


def figures(runs: list[dict]) -> dict:
    """The figures of one target's measurement from its rounds' raw results, pooled: rps
    (mean of the rounds'), errors, and percentiles (ms) of the successful responses' latencies
    (infinite if none succeeded); for the lean client also from the intended send times
    (`*_intended_ms`) and the sends' lateness (`late_p99_ms`)."""

    def pct(key: str, q: float) -> float:
        xs = np.concatenate([np.asarray(r[key], dtype=float) for r in runs]) * 1000
        return float(np.percentile(xs, q)) if len(xs) else float("inf")

    out = {
        "n": sum(r["n"] for r in runs),
        "rps": float(np.mean([r["rps"] for r in runs])),
        "errors": sum(r["errors"] for r in runs),
        "p50_ms": pct("lat", 50),
        "p99_ms": pct("lat", 99),
        "max_ms": pct("lat", 100),
    }
    if "lat_intended" in runs[0]:
        out.update(
            p50_intended_ms=pct("lat_intended", 50),
            p99_intended_ms=pct("lat_intended", 99),
            late_p99_ms=pct("late", 99),
            timed_out=sum(r["timed_out"] for r in runs),
            connections=max(r["opened"] for r in runs),
        )
    return out


def run_load(url: str, mode: str, seconds: float, concurrency: int = 32, rate: float = 500) -> dict:
    """One measurement's figures (see `figures`)."""
    return figures([collect(url, mode, seconds, concurrency, rate)])


# #19's p50 target is judged on the lean open loop only if the generator kept its schedule: 99 %
# of its sends at most this late (4x the target; a generator falling behind, or starved of CPU,
# shows here); else the run is invalid, not passed.
LATE_BOUND_MS = 2.0


def judge_p50(serial_p50_ms: float, open_lean: dict, late_bound_ms: float = LATE_BOUND_MS) -> dict:
    """#19's warm no-op p50 <= 0.5 ms target: the serial p50 and the lean open loop's p50 (over
    its 200s), with no errors in that open loop, and only in a valid run (the sends' lateness
    p99 within `late_bound_ms`). `valid` False: the run says nothing of the target."""
    valid = open_lean["late_p99_ms"] <= late_bound_ms
    worst = max(serial_p50_ms, open_lean["p50_ms"])
    if not valid:
        why = f"invalid run: the generator's sends late p99 {open_lean['late_p99_ms']:.2f} ms > {late_bound_ms:g} ms"
    elif open_lean["errors"]:
        why = f"{open_lean['errors']} errors in the lean open loop"
    else:
        why = f"p50 {worst:.3f} ms {'<=' if worst <= 0.5 else '>'} 0.5 ms"
    met = valid and not open_lean["errors"] and open_lean["n"] > 0 and worst <= 0.5
    return {"valid": valid, "met": met, "why": why}


def spin_counts(node) -> dict[str, float]:
    """The node's busy-polls for replies so far (`hearth_agent_spin*`), and its invocations."""
    body = node.client.request("GET", "/metrics", admin=True).body.decode()
    got = {"hits": 0.0, "misses": 0.0, "seconds": 0.0, "calls": 0.0}
    for line in body.splitlines():
        name, _, value = line.rpartition(" ")
        if name == 'hearth_agent_spins_total{outcome="hit"}':
            got["hits"] = float(value)
        elif name == 'hearth_agent_spins_total{outcome="miss"}':
            got["misses"] = float(value)
        elif name == "hearth_agent_spin_seconds_total":
            got["seconds"] = float(value)
        elif name.startswith("hearth_invocations_total{"):
            got["calls"] += float(value)
    return got


def spin_report(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Spins during one kind of measurement: per call, the share that spun, that got their
    reply while spinning, and the agent CPU the spins took."""
    d = {k: after[k] - before[k] for k in after}
    calls = max(d["calls"], 1.0)
    return {
        "calls": d["calls"],
        "spun": round((d["hits"] + d["misses"]) / calls, 3),
        "hit": round(d["hits"] / calls, 3),
        "spin_us_per_call": round(d["seconds"] / calls * 1e6, 1),
    }


def wait_http(
    url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 30
) -> None:
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise RuntimeError(f"{url}: the server exited with code {proc.returncode}\n{tail}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="5 s per measurement instead of 20 s")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--rounds", type=int, default=None, help="alternating closed-loop rounds (4; quick 2)"
    )
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--dataplane", default="auto")
    ap.add_argument("--rev", help="also measure this git revision's platform/ (interleaved)")
    a = ap.parse_args()
    seconds = a.seconds or (5.0 if a.quick else 20.0)
    rounds = a.rounds or (2 if a.quick else 4)
    ratios: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    results: dict = {}
    rev_platform = revtree.platform_of(a.rev, tmp)  # first: a mistyped one starts no node
    node = start_node(tmp / "node", dataplane=a.dataplane)  # with its own redis-server
    nodes = [node]
    if rev_platform is not None:
        env = {"PYTHONPATH": str(rev_platform)}
        try:
            nodes.append(start_node(tmp / "node-rev", dataplane=a.dataplane, env=env))
        except BaseException:
            node.stop()
            raise
    bport = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bport)])
    fport = free_port()  # the lean client's floor: a minimal static responder
    floor = subprocess.Popen([sys.executable, "-c", RESPONDER, str(fport)])
    mode = node.dataplane
    try:
        wait_http(f"http://127.0.0.1:{bport}/noop", bare)
        wait_http(f"http://127.0.0.1:{fport}/noop", floor)
        for n in nodes:
            n.client.deploy(
                {
                    "name": "noop",
                    "handler": "hearth.functions.examples.handlers:noop",
                    "concurrency": 64,
                    "max_instances": 1,
                    "queue_size": 10000,
                }
            )
            n.client.invoke("noop", b"")  # cold start outside the measurement
        targets = {
            "hearth": f"{node.url}/v1/functions/noop:invoke",
            "aiohttp": f"http://127.0.0.1:{bport}/noop",
        }
        if a.rev:
            targets[f"@{a.rev}"] = f"{nodes[1].url}/v1/functions/noop:invoke"
        for url in targets.values():
            run_load(url, "closed", 1.0, a.concurrency)  # warm-up
        closed: dict[str, list[dict]] = {name: [] for name in targets}
        serial: dict[str, list[float]] = {name: [] for name in targets}
        # each node's busy-polls for replies (hearth.agent.spin), by kind of measurement
        by_node = {"hearth": node, f"@{a.rev}": nodes[-1]} if a.rev else {"hearth": node}
        spins_of = {
            name: {
                kind: {"calls": 0.0, "hits": 0.0, "misses": 0.0, "seconds": 0.0}
                for kind in ("closed", "serial", "open")
            }
            for name in by_node
        }
        spins = spins_of["hearth"]

        def counted(kind: str, name: str, measure, *args, **kw):
            if name not in by_node:
                return measure(*args, **kw)
            before = spin_counts(by_node[name])
            out = measure(*args, **kw)
            after = spin_counts(by_node[name])
            for k in spins_of[name][kind]:
                spins_of[name][kind][k] += after[k] - before[k]
            return out

        # the open loops in the same rounds, seconds / rounds each (pooled per target), so the
        # load's drift lands on every target alike; the order reverses every other round
        opens: dict[str, dict[str, list[dict]]] = {
            name: {"lean": [], "open": []} for name in targets
        }
        floor_runs: list[dict] = []
        floor_url = f"http://127.0.0.1:{fport}/noop"
        for k in range(rounds):
            for name in list(targets)[:: 1 if k % 2 == 0 else -1]:
                url = targets[name]
                closed[name].append(
                    counted(
                        "closed", name, run_load, url, "closed", seconds / rounds, a.concurrency
                    )
                )
                serial[name].append(
                    counted("serial", name, serial_p50, url, 300 if a.quick else 1000)
                )
                for client in ("lean", "open"):
                    opens[name][client].append(
                        counted("open", name, collect, url, client, seconds / rounds, rate=a.rate)
                    )
            floor_runs.append(collect(floor_url, "lean", seconds / rounds, rate=a.rate))
            h_rps, b_rps = closed["hearth"][-1]["rps"], closed["aiohttp"][-1]["rps"]
            ratios.append(h_rps / b_rps)
            print(
                f"round {k + 1}: hearth {h_rps:7.0f} rps  aiohttp {b_rps:7.0f} rps  ratio {ratios[-1]:.3f}",
                flush=True,
            )
        for name in targets:
            runs = closed[name]
            med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
            results[name] = {
                "closed": med,
                "closed_rounds": [round(r["rps"]) for r in runs],
                "serial_p50_ms": float(np.median(serial[name])),
                "open_lean": figures(opens[name]["lean"]),
                "open": figures(opens[name]["open"]),
            }
        floor_open = figures(floor_runs)
    finally:
        for n in nodes:
            n.stop()
        for proc in (bare, floor):
            proc.terminate()
            proc.wait(10)
    shutil.rmtree(tmp, ignore_errors=True)
    h, b = results["hearth"], results["aiohttp"]
    print(
        f"\nGateway overhead ({seconds:g} s per measurement, data plane {mode}, concurrency {a.concurrency}, open loop {a.rate:g}/s)"
    )
    print(
        f"{'target':<12}{'closed rps':>12}{'p50 ms':>9}{'p99 ms':>9}   {'open rps':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    )
    for name, r in results.items():
        cl, op, ol = r["closed"], r["open"], r["open_lean"]
        errors = cl["errors"] + op["errors"] + ol["errors"]
        print(
            f"{name:<12}{cl['rps']:>12.0f}{cl['p50_ms']:>9.2f}{cl['p99_ms']:>9.2f}   {op['rps']:>9.0f}{op['p50_ms']:>9.2f}{op['p99_ms']:>9.2f}{errors:>8}"
        )
    print(
        f"open loop at {a.rate:g}/s with the lean client (lean_load.py; the p50 target's): p50 / p99 ms"
        " of the 200s from the actual send; from the intended send"
    )
    for name, ol in [*((n, r["open_lean"]) for n, r in results.items()), ("floor", floor_open)]:
        print(
            f"  {name:<10}{ol['p50_ms']:>9.3f}{ol['p99_ms']:>9.3f};{ol['p50_intended_ms']:>9.3f}{ol['p99_intended_ms']:>9.3f}"
            f"   sends late p99 {ol['late_p99_ms']:.3f} ms, {ol['connections']} connections, {ol['errors']} errors"
        )
    ratio = float(np.median(ratios))
    print(
        f"hearth/aiohttp throughput: {ratio:.3f} (median of {rounds} rounds: {', '.join(f'{r:.3f}' for r in ratios)}; target ≥ 0.40);  hearth p99 at {a.rate:g}/s: {h['open']['p99_ms']:.2f} ms (target ≤ 5 ms)"
    )
    p50_judged = judge_p50(h["serial_p50_ms"], h["open_lean"])
    out = {
        "benchmark": "gateway_overhead",
        "seconds": seconds,
        "dataplane": mode,
        "hearth_rps": round(h["closed"]["rps"], 1),
        "aiohttp_rps": round(b["closed"]["rps"], 1),
        "throughput_ratio": round(ratio, 3),
        "throughput_ratio_rounds": [round(r, 3) for r in ratios],
        "hearth_rps_rounds": h["closed_rounds"],
        "aiohttp_rps_rounds": b["closed_rounds"],
        "hearth_p50_ms_at_rate": round(h["open"]["p50_ms"], 3),
        "hearth_p99_ms_at_rate": round(h["open"]["p99_ms"], 3),
        "aiohttp_p99_ms_at_rate": round(b["open"]["p99_ms"], 3),
        "aiohttp_p50_ms_at_rate": round(b["open"]["p50_ms"], 3),
        "hearth_p50_ms_serial": round(h["serial_p50_ms"], 3),
        "aiohttp_p50_ms_serial": round(b["serial_p50_ms"], 3),
        "ratio_p50_serial": round(h["serial_p50_ms"] / b["serial_p50_ms"], 3),
        # the open loop with the lean client (the *_at_rate keys above: aiohttp's client)
        "hearth_p50_ms_at_rate_lean": round(h["open_lean"]["p50_ms"], 3),
        "hearth_p99_ms_at_rate_lean": round(h["open_lean"]["p99_ms"], 3),
        "aiohttp_p50_ms_at_rate_lean": round(b["open_lean"]["p50_ms"], 3),
        "aiohttp_p99_ms_at_rate_lean": round(b["open_lean"]["p99_ms"], 3),
        "floor_p50_ms_at_rate_lean": round(floor_open["p50_ms"], 3),
        "floor_p99_ms_at_rate_lean": round(floor_open["p99_ms"], 3),
        # from the intended send times (coordinated omission: a generator falling behind)
        "hearth_p50_ms_at_rate_lean_intended": round(h["open_lean"]["p50_intended_ms"], 3),
        "hearth_p99_ms_at_rate_lean_intended": round(h["open_lean"]["p99_intended_ms"], 3),
        "aiohttp_p50_ms_at_rate_lean_intended": round(b["open_lean"]["p50_intended_ms"], 3),
        "aiohttp_p99_ms_at_rate_lean_intended": round(b["open_lean"]["p99_intended_ms"], 3),
        "floor_p50_ms_at_rate_lean_intended": round(floor_open["p50_intended_ms"], 3),
        "hearth_errors_at_rate_lean": h["open_lean"]["errors"],
        "hearth_sends_late_p99_ms": round(h["open_lean"]["late_p99_ms"], 3),
        "lean_sends_late_p99_ms": round(
            max(
                r["open_lean"]["late_p99_ms"]
                for r in [*results.values(), {"open_lean": floor_open}]
            ),
            3,
        ),
        "lean_late_bound_ms": LATE_BOUND_MS,
        "lean_run_valid": p50_judged["valid"],
        "rate": a.rate,
        "errors": h["closed"]["errors"] + h["open"]["errors"] + h["open_lean"]["errors"],
        "target_throughput_ratio_ge_0_4": ratio >= 0.4,
        "target_p99_le_5ms": h["open"]["p99_ms"] <= 5.0 and not h["open"]["errors"],
        "target_p50_le_0_5ms": p50_judged["met"],
        "loadavg_at_end": round(os.getloadavg()[0], 2),
        "spins": {kind: spin_report({k: 0.0 for k in v}, v) for kind, v in spins.items()},
    }
    if a.rev:
        r = results[f"@{a.rev}"]
        out.update(
            rev=a.rev,
            rev_p50_ms_serial=round(r["serial_p50_ms"], 3),
            rev_p50_ms_serial_rounds=[round(x, 3) for x in serial[f"@{a.rev}"]],
            hearth_p50_ms_serial_rounds=[round(x, 3) for x in serial["hearth"]],
            ratio_p50_serial_vs_rev=round(h["serial_p50_ms"] / r["serial_p50_ms"], 3),
            rev_rps=round(r["closed"]["rps"], 1),
            ratio_rps_vs_rev=round(h["closed"]["rps"] / r["closed"]["rps"], 3),
            rev_p50_ms_at_rate=round(r["open"]["p50_ms"], 3),
            rev_p99_ms_at_rate=round(r["open"]["p99_ms"], 3),
            rev_p50_ms_at_rate_lean=round(r["open_lean"]["p50_ms"], 3),
            rev_spins={
                kind: spin_report({k: 0.0 for k in v}, v)
                for kind, v in spins_of[f"@{a.rev}"].items()
            },
            rev_p99_ms_at_rate_lean=round(r["open_lean"]["p99_ms"], 3),
        )
    out["targets_met"] = all(v for k, v in out.items() if k.startswith("target_"))
    print(
        f"open loop p50 (lean client): hearth {out['hearth_p50_ms_at_rate_lean']:.3f} ms, aiohttp "
        f"{out['aiohttp_p50_ms_at_rate_lean']:.3f} ms, the client's floor {out['floor_p50_ms_at_rate_lean']:.3f} ms"
        f" (aiohttp's client: hearth {out['hearth_p50_ms_at_rate']:.3f}, aiohttp {out['aiohttp_p50_ms_at_rate']:.3f} ms)"
    )
    print(
        f"one request at a time, p50: hearth {h['serial_p50_ms']:.3f} ms, aiohttp "
        f"{b['serial_p50_ms']:.3f} ms ({out['ratio_p50_serial']:.2f}x; target hearth <= 0.5 ms)"
    )
    print(f"p50 target (serial and lean open loop): {p50_judged['why']}")
    print(
        "busy-polls for replies, per call (serial / closed loop / open loop): spun "
        + " / ".join(f"{out['spins'][k]['spun']:.2f}" for k in ("serial", "closed", "open"))
        + ", agent CPU spinning "
        + " / ".join(
            f"{out['spins'][k]['spin_us_per_call']:.1f}" for k in ("serial", "closed", "open")
        )
        + " us"
    )
    if a.rev:
        print(
            f"against {a.rev}: serial p50 {out['rev_p50_ms_serial']:.3f} ms "
            f"(this tree {out['ratio_p50_serial_vs_rev']:.2f}x), closed-loop rps "
            f"{out['ratio_rps_vs_rev']:.2f}x; its calls that spun (serial / closed / open) "
            + " / ".join(f"{out['rev_spins'][k]['spun']:.2f}" for k in ("serial", "closed", "open"))
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
