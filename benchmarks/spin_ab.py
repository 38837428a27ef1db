"""Is the agent's busy-poll for a lone reply worth having on? An interleaved A/B of this tree
against itself: two nodes side by side, one with ``HEARTH_SPIN_US=<--spin-us>`` ("on"), one with
``HEARTH_SPIN_US=0`` ("off"), each with its own Redis and a no-op function.

Each round measures, for each node in turn (the order alternates round by round: on, off; off,
on; ... so the shared machine's drift lands on both alike): the serial p50 (one request at a
time on one keep-alive connection, `gateway_load.serial_p50`), the open-loop p50 at
``--rate`` with the lean client (`lean_load.py`, over successful responses; the run's errors and
the sends' lateness are printed), then the closed-loop throughput (aiohttp's client,
``--concurrency`` in flight). Reports each node's median over rounds, the median of the round
ratios (on / off), in how many rounds "on" was better, and the share of the "on" node's calls that spun, per kind; ends
with one JSON line.

    .venv/bin/python benchmarks/spin_ab.py [--rounds 10] [--spin-us 150] [--serial 300]
        [--open-seconds 2] [--closed-seconds 1] [--rate 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gateway_load import run_load, serial_p50  # noqa: E402
from gateway_targets import NOOP, spin_counts, spin_report  # noqa: E402
from hearth.localnode import start_node  # noqa: E402

KINDS = ("serial", "open", "closed")


def order(k: int) -> tuple[str, str]:
    """Round `k`'s order of the two nodes: alternating, so neither always goes first."""
    return ("on", "off") if k % 2 == 0 else ("off", "on")


def summary(rounds: dict[str, dict[str, list[float]]]) -> dict:
    """Medians per node and kind, the median on/off round ratio, and the rounds "on" won
    (lower latency; higher throughput for the closed loop)."""
    out: dict = {}
    for kind in KINDS:
        on, off = rounds["on"][kind], rounds["off"][kind]
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        wins = sum((a > b) if kind == "closed" else (a < b) for a, b in zip(on, off, strict=True))
        out[kind] = {
            "on": round(float(np.median(on)), 4),
            "off": round(float(np.median(off)), 4),
            "ratio_median": round(float(np.median(ratios)), 3),
            "on_better_rounds": int(wins),
            "rounds": len(on),
            "on_rounds": [round(x, 4) for x in on],
            "off_rounds": [round(x, 4) for x in off],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--spin-us", type=float, default=150.0, help="the 'on' node's HEARTH_SPIN_US")
    ap.add_argument("--serial", type=int, default=300, help="serial requests per round and node")
    ap.add_argument("--open-seconds", type=float, default=2.0)
    ap.add_argument("--closed-seconds", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--dataplane", default="auto")
    a = ap.parse_args()
    if a.rounds < 2 or a.spin_us <= 0:
        raise SystemExit("error: --rounds must be at least 2 and --spin-us above 0")
    tmp = Path(tempfile.mkdtemp(prefix="hearth-spin-ab-"))
    platform = str(ROOT / "platform")
    spin_env = {"on": f"{a.spin_us:g}", "off": "0"}
    nodes: dict = {}
    load = [os.getloadavg()[0]]
    try:
        for name, us in spin_env.items():
            env = {"HEARTH_SPIN_US": us, "PYTHONPATH": platform}
            nodes[name] = start_node(tmp / name, dataplane=a.dataplane, env=env)
        urls = {}
        for name, node in nodes.items():
            node.client.deploy(NOOP)
            node.client.invoke("noop", b"")  # cold start outside the measurement
            urls[name] = f"{node.url}/v1/functions/noop:invoke"
            run_load(urls[name], "closed", 1.0, a.concurrency)  # warm-up
        spun = {kind: {"calls": 0.0, "hits": 0.0, "misses": 0.0, "seconds": 0.0} for kind in KINDS}
        rounds: dict = {n: {k: [] for k in KINDS} for n in nodes}
        errors = {n: 0 for n in nodes}
        late = {n: 0.0 for n in nodes}
        for k in range(a.rounds):
            for kind in KINDS:
                for name in order(k):
                    before = spin_counts(nodes[name]) if name == "on" else {}
                    if kind == "serial":
                        rounds[name][kind].append(serial_p50(urls[name], a.serial))
                    else:
                        got = (
                            run_load(urls[name], "lean", a.open_seconds, rate=a.rate)
                            if kind == "open"
                            else run_load(urls[name], "closed", a.closed_seconds, a.concurrency)
                        )
                        rounds[name][kind].append(got["p50_ms" if kind == "open" else "rps"])
                        errors[name] += got["errors"]
                        late[name] = max(late[name], got.get("late_p99_ms", 0.0))
                    if before:
                        after = spin_counts(nodes[name])
                        for c in spun[kind]:
                            spun[kind][c] += after[c] - before[c]
            load.append(os.getloadavg()[0])
            r = {n: {kind: rounds[n][kind][-1] for kind in KINDS} for n in nodes}
            print(
                f"round {k + 1} (on {'first' if order(k)[0] == 'on' else 'second'}), on / off: "
                f"serial {r['on']['serial']:.3f} / {r['off']['serial']:.3f} ms  open "
                f"{r['on']['open']:.3f} / {r['off']['open']:.3f} ms  closed "
                f"{r['on']['closed']:.0f} / {r['off']['closed']:.0f} rps  load {load[-1]:.1f}",
                flush=True,
            )
        zero = {"calls": 0.0, "hits": 0.0, "misses": 0.0, "seconds": 0.0}
        spins = {kind: spin_report(zero, spun[kind]) for kind in KINDS}
    finally:
        for node in nodes.values():
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    s = summary(rounds)
    print(f"\nspin on (HEARTH_SPIN_US={a.spin_us:g}) vs off (0), {a.rounds} interleaved rounds:")
    for kind, unit in (("serial", "ms p50"), ("open", "ms p50"), ("closed", "rps")):
        f = s[kind]
        print(
            f"  {kind:<7}{f['on']:>10.3f}{f['off']:>10.3f} {unit:<7} on/off {f['ratio_median']:.3f}"
            f" (median of rounds); on better in {f['on_better_rounds']} of {f['rounds']}"
        )
    print(
        "  the 'on' node's calls (serial / open / closed) that spun "
        + " / ".join(f"{spins[k]['spun']:.2f}" for k in KINDS)
        + ", got their reply spinning "
        + " / ".join(f"{spins[k]['hit']:.2f}" for k in KINDS)
        + ", agent CPU spinning per call "
        + " / ".join(f"{spins[k]['spin_us_per_call']:.1f}" for k in KINDS)
        + f" us; errors on / off {errors['on']} / {errors['off']}; sends late p99 at most "
        f"{max(late.values()):.3f} ms; load {min(load):.1f}-{max(load):.1f}"
    )
    out = {
        "benchmark": "spin_ab",
        "spin_us": a.spin_us,
        "rate": a.rate,
        **s,
        "spins_on": spins,
        "errors": errors,
        "lean_sends_late_p99_ms": round(max(late.values()), 3),
        "load": [round(min(load), 2), round(max(load), 2)],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
