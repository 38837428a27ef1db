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
their commands and loads in docs/performance-journal.md): that target measured mostly
the client. The lean client's own floor (against a minimal static responder) is printed and in the
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
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import revtree  # noqa: E402
from gateway_load import collect, figures, run_load, serial_p50  # noqa: E402
from gateway_report import report  # noqa: E402
from gateway_targets import Targets, spin_counts, targets  # noqa: E402

# This file holds the command line and the rounds; gateway_targets.py the nodes and servers
# measured, gateway_load.py the load generators and their figures, gateway_report.py the p50
# target's judgement, the printed report and the JSON line.


def measure(t: Targets, a: argparse.Namespace, seconds: float, rounds: int) -> dict:
    """Every target's measurements in alternating rounds (the order reversed every other
    round), each node's spins counted by kind of measurement; the rounds' figures by target."""
    ratios: list[float] = []
    results: dict = {}
    for url in t.urls.values():
        run_load(url, "closed", 1.0, a.concurrency)  # warm-up
    closed: dict[str, list[dict]] = {name: [] for name in t.urls}
    serial: dict[str, list[float]] = {name: [] for name in t.urls}
    spins_of = {
        name: {
            kind: {"calls": 0.0, "hits": 0.0, "misses": 0.0, "seconds": 0.0}
            for kind in ("closed", "serial", "open")
        }
        for name in t.by_node
    }

    def counted(kind: str, name: str, measure, *args, **kw):
        if name not in t.by_node:
            return measure(*args, **kw)
        before = spin_counts(t.by_node[name])
        out = measure(*args, **kw)
        after = spin_counts(t.by_node[name])
        for k in spins_of[name][kind]:
            spins_of[name][kind][k] += after[k] - before[k]
        return out

    # the open loops in the same rounds, seconds / rounds each (pooled per target), so the
    # load's drift lands on every target alike; the order reverses every other round
    opens: dict[str, dict[str, list[dict]]] = {name: {"lean": [], "open": []} for name in t.urls}
    floor_runs: list[dict] = []
    for k in range(rounds):
        for name in list(t.urls)[:: 1 if k % 2 == 0 else -1]:
            url = t.urls[name]
            closed[name].append(
                counted("closed", name, run_load, url, "closed", seconds / rounds, a.concurrency)
            )
            serial[name].append(counted("serial", name, serial_p50, url, 300 if a.quick else 1000))
            for client in ("lean", "open"):
                opens[name][client].append(
                    counted("open", name, collect, url, client, seconds / rounds, rate=a.rate)
                )
        floor_runs.append(collect(t.floor_url, "lean", seconds / rounds, rate=a.rate))
        h_rps, b_rps = closed["hearth"][-1]["rps"], closed["aiohttp"][-1]["rps"]
        ratios.append(h_rps / b_rps)
        print(
            f"round {k + 1}: hearth {h_rps:7.0f} rps  aiohttp {b_rps:7.0f} rps  ratio {ratios[-1]:.3f}",
            flush=True,
        )
    for name in t.urls:
        runs = closed[name]
        med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        results[name] = {
            "closed": med,
            "closed_rounds": [round(r["rps"]) for r in runs],
            "serial_p50_ms": float(np.median(serial[name])),
            "open_lean": figures(opens[name]["lean"]),
            "open": figures(opens[name]["open"]),
        }
    return {
        "results": results,
        "serial": serial,
        "ratios": ratios,
        "floor_open": figures(floor_runs),
        "spins_of": spins_of,
    }


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
    tmp = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    rev_platform = revtree.platform_of(a.rev, tmp)  # first: a mistyped one starts no node
    with targets(tmp, a.dataplane, a.rev, rev_platform) as t:
        mode = t.node.dataplane
        got = measure(t, a, seconds, rounds)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report(a, seconds, rounds, mode, **got)))


if __name__ == "__main__":
    main()
