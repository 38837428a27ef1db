"""Hearth fedavg vs Flower's aggregate() / aggregate_inplace() on the same updates, in one run.

Sets: 32 x 11.21 M params (ResNet-18) and 8 x 58.27 M (ResNet-152); ``--quick``: 8 x 11.21 M and
4 x 58.27 M.

Ingestion, timed apart from aggregation, per round: (a) the gateway's slot write alone, in process
(pack into a slot with fresh tmpfs pages = round 1, then into the same slot released with its
pages kept = rounds 2+); (b) through the gateway's HTTP path: a client process POSTs every update
over loopback TCP to an aiohttp server running the gateway's own body streaming
(``hearth.gateway.body._read_into_slot``: socket -> slot). Between HTTP rounds the slots are
released as the leaves release them after folding: with the platform's default trim (slots >=
16 MiB give their pages back, so every round faults them in again), with pages kept
(``HEARTH_POOL_TRIM=off``), and trimmed then ``SlotPool.prefault``-ed. The slots of the last
round are what every contender reads: Hearth folds them in place; Flower's aggregate() gets numpy
views of them; Flower's aggregate_inplace() gets FitRes messages serialised from them.

Per contender: seconds, GB/s of update bytes, peak RSS growth (VmHWM reset before each run).
Hearth is measured cold (round 1: accumulators allocated and first touched) and warm (rounds 2+:
same aggregators), as the tree (fan-in 4, leaves -> middle -> top with promotion) receiving a
burst (queued updates folded 4 per pass) and as one aggregator folding one update at a time.
Flower's aggregate() is reported for its first call in the process and, separately, for its
repeated calls (glibc then hands back the models the previous call freed: no page faults), and
the 5x target is checked against each (``target_5x_vs_first_call``,
``target_5x_vs_repeated_call``). Physical references, same run: the bare ``np.add(out=)`` pass
(reads the update, reads and writes the accumulator) and a read-only pass (``x.sum()``: every
fold must read each update byte at least once); ``warm_5x_needs_gbps`` is what 5x the repeated
call would need. Checked figures (exit status 1 if one fails): peak model-sized buffers per
aggregator <= fan-in + 2, no new accumulator and no process started after round 1 (in-process
here; on the platform the same pids serving round 2 are checked by
tests/functions/test_fedavg_e2e.py and, with ``--platform``, here). Contenders are interleaved
and keep their best run; each set runs in a fresh process (Flower's first call is the first).

``--platform`` adds 4 rounds of 8 updates x 3.9 M params on a real ``hearth up`` node (gateway,
node agent, proxy daemon, one process per aggregator), slot trim default vs off: per-round GB/s
and process starts after round 1 from the instances' pids.

Ends with one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from fedavg.fold_figures import platform_figures, set_figures, targets
from fedavg.fold_set import run_set
from fedavg.ingest import http_client, slot_reader
from fedavg.platform_rounds import platform_rounds
from fedavg.sizes import R18, R152


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="8 x ResNet-18 and 4 x ResNet-152 (about a minute)"
    )
    ap.add_argument("--fan-in", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per contender; the best is kept (the load is noisy). Flower's aggregate() "
        "runs this often: its first call, then repeat-1 repeated calls",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="fold threads per aggregator in the tree run"
    )
    ap.add_argument(
        "--platform",
        action="store_true",
        help="also run rounds on a real `hearth up` node (needs redis-server), slot trim default "
        "vs off; 8 updates of 3.9 M params, which fit the default pool's 16 MiB slot class",
    )
    ap.add_argument("--only-set", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.repeat < 2:
        ap.error("--repeat must be >= 2 (Flower's first call and at least one repeated call)")
    if a.fan_in < 2:
        ap.error(f"--fan-in must be >= 2 (inputs of a leaf or middle aggregator), got {a.fan_in}")
    return a


def sets_of(quick: bool) -> list[tuple[str, int, int, int]]:
    """(name, clients, params, layers) of each set."""
    return [
        ("resnet18", 8 if quick else 32, R18, 62),
        ("resnet152", 4 if quick else 8, R152, 465),
    ]


def run_sets(a: argparse.Namespace, nsets: int) -> list[dict]:
    """Each set in a fresh process, so Flower's "first call" really is the first in its process
    (a heap warmed by the previous set would make it a partly repeated call)."""
    results = []
    for i in range(nsets):
        with tempfile.NamedTemporaryFile(suffix=".json") as tf:
            cmd = [sys.executable, os.path.abspath(__file__), "--only-set", str(i)]
            cmd += ["--result-file", tf.name, "--fan-in", str(a.fan_in), "--seed", str(a.seed)]
            cmd += ["--repeat", str(a.repeat), "--threads", str(a.threads)]
            subprocess.run(cmd + (["--quick"] if a.quick else []), check=True)
            with open(tf.name) as f:
                results.append(json.load(f))
    return results


def platform_summary(fan_in: int) -> dict:
    """Rounds on a real node, slot trim default vs off."""
    print("\n== platform: 8 updates x 3.90 M params through `hearth up`, 4 rounds ==", flush=True)
    summary: dict = {}
    for trim in ("default", "off"):
        pr = platform_rounds(trim, 8, 3_900_000, 4, fan_in)
        summary.update(platform_figures(trim, pr))
    summary["check_zero_platform_process_starts_after_round1"] = all(
        summary[f"platform_trim_{t}_process_starts_after_round1"] == 0 for t in ("default", "off")
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--http-client"]:  # the trainers' process of the ingestion measurement
        return http_client(int(argv[1]), argv[2], argv[3])
    if argv[:1] == ["--read-slots"]:  # a leaf's process reading the round's slots
        return slot_reader(argv[1], argv[2])
    a = parse_args(argv)
    sets = sets_of(a.quick)
    if a.only_set is not None:  # one set in this (fresh) process; the parent reads the file
        n, c, p, nl = sets[a.only_set]
        r = run_set(n, c, p, nl, a.fan_in, a.seed + a.only_set, a.threads, a.repeat)
        with open(a.result_file, "w") as f:
            json.dump(r, f, default=float)
        return 0
    load0 = os.getloadavg()
    print(
        f"fedavg vs Flower ({'quick' if a.quick else 'full'}); pid {os.getpid()}; load average "
        f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    results = run_sets(a, len(sets))
    summary: dict = {
        "benchmark": "fedavg_vs_flower",
        "quick": a.quick,
        "fan_in": a.fan_in,
        "loadavg_start": round(load0[0], 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
    }
    for r in results:
        summary.update(set_figures(r))
    if a.platform:
        summary.update(platform_summary(a.fan_in))
    summary.update(targets(results))
    print(json.dumps(summary))
    return 0 if all(summary[c] for c in summary if c.startswith("check_")) else 1


if __name__ == "__main__":
    sys.exit(main())
