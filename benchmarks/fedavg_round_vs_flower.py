"""A whole federated round: Hearth's round endpoint vs Flower 1.42's real deployment engine.

One round = every client sends its update, the aggregation folds them, every client has the new
global model. Both sides run the same Flower app, which this script writes into a temp dir: a
``ClientApp`` returning ``--params`` float32 parameters (62 tensors, no training; the values
depend on the partition id, the weight ``num-examples`` on the partition and the round) and a
``ServerApp`` running ``FedAvg`` that records when each round ends and saves the global model.

* **Flower** (N in ``--flower-clients``): ``flower-superlink`` (HTTP Fleet API, 127.0.0.1:8000,
  ``--insecure --disable-runtime-dependency-installation``), N ``flower-supernode`` with their
  own ``--port`` and ``--node-config partition-id=i``, then ``flwr run`` of the app against a
  federation defined in ``$FLWR_HOME/config.toml``. Round time: between the ServerApp's
  ``evaluate_fn`` calls (round 0 is called before round 1 starts). Every process started here is
  stopped at the end, also on error.
* **Hearth** (N in ``--clients`` x ``--params``): a server process runs
  :class:`~hearth.functions.fedavg.roundserver.RoundServer` on its own slot pool; client
  processes (several clients each, one thread per client) connect with
  :class:`~hearth.functions.fedavg.client.RoundClient` and send the ClientApp's arrays. Round time:
  from the coordinator's "go" to the last client holding the model (``time.monotonic``, one
  clock for all processes). ``--bridge`` rounds run the same ClientApp through the Flower bridge
  (a Flower ``train`` message per round, in a persistent process).

References, same run, interleaved with the rounds (never during one): memory bandwidth
(``np.copyto`` of 256 MB, 3 samples before round 1 and after every round; a round is compared
with the samples right before and after it) and, for TCP sets, the same client processes
sending the same update bytes to a bare loopback socket read the way the endpoint reads
(:class:`BareSink`). The bandwidth limit of a round is the time to copy its N updates and N
model downloads once at that bandwidth. Figures per set: round 1 and rounds 2+ (median and
best), vs Flower, vs the limit, ingestion GB/s into slots vs the bare socket, bytes copied on
the server per byte received, server peak RSS in models, page faults of the server's hot path
(fold + receiving threads) in rounds 2+, processes started after round 1, exactness vs float64
FedAvg and vs Flower's model.

``--quick`` (about a minute on a quiet machine, most of it Flower's start-up): Flower and Hearth
at N=2 for the comparison with Flower, and Hearth's own targets (bandwidth limit, ingestion,
memory, faults, exactness) at N=8 with the 11.2 M model; no 58 M set, no copying-client and no
bridge sets. The full run has Flower at N=8 and 16 and Hearth at 8, 16, 32 and 58 M params.

Ends with one JSON line; the exit status is 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fedavg.exactness import max_rel_err
from fedavg.flower_app import write_app
from fedavg.flower_run import FlowerRun
from fedavg.references import BandwidthProbe
from fedavg.round_figures import summarize, targets
from fedavg.round_set import hearth_set
from fedavg.sizes import R18, R152

Say = Callable[[str], None]
# (clients, params, bridge, shm, in_place)
Set = tuple[int, int, bool, bool, bool]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="~1 min: Flower and Hearth at N=2, Hearth's own targets at N=8 (see the docs)",
    )
    ap.add_argument("--clients", default=None, help="Hearth client counts, e.g. 8,16,32")
    ap.add_argument("--flower-clients", default=None, help="Flower client counts, e.g. 8,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--no-big", action="store_true", help="skip the 58 M parameter set")
    ap.add_argument("--big-clients", default=None, help="client counts of the 58 M set, e.g. 8")
    ap.add_argument(
        "--procs", type=int, default=4, help="client processes (clients per process: N/procs)"
    )
    ap.add_argument(
        "--handover",
        action="store_true",
        help="passes lend their slots to the next writers as they read them "
        "(RoundServer(handover=True); off by default): the A/B",
    )
    args = ap.parse_args(argv)
    for opt in ("clients", "flower_clients", "big_clients"):
        given = getattr(args, opt)
        if given is not None and not counts_ok(given):
            ap.error(
                f"--{opt.replace('_', '-')}: expected client counts >= 1 separated by commas "
                f"(e.g. 8,16), got {given!r}"
            )
    for opt in ("rounds", "procs"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt}: expected at least 1, got {getattr(args, opt)}")
    return args


def counts_ok(given: str) -> bool:
    """Every comma-separated entry is a whole number >= 1."""
    return all(p.strip().isdigit() and int(p) >= 1 for p in given.split(","))


def client_counts(args: argparse.Namespace) -> tuple[list[int], list[int], list[int]]:
    """Hearth's, Flower's and the 58 M set's client counts, from the options or the mode."""

    def counts(given: str | None, quick: str, full: str) -> list[int]:
        return [int(x) for x in (given or (quick if args.quick else full)).split(",")]

    hearth_n = counts(args.clients, "8", "8,16,32")
    flower_n = [] if args.no_flower else counts(args.flower_clients, "2", "8,16")
    big_n = (
        []
        if args.no_big or (args.quick and not args.big_clients)
        else counts(args.big_clients, "8", "8,16")
    )
    return hearth_n, flower_n, big_n


def plan_sets(quick: bool, hearth_n: list[int], flower_n: list[int], big_n: list[int]) -> list[Set]:
    """Same-host clients reading the model in place (the bandwidth target; also every N Flower
    runs at), the default client (its own copy of the model) once for reference, TCP (the
    ingestion target), the 58 M model, and the Flower bridge; --quick keeps what its targets
    need."""
    inplace_n = sorted(set(hearth_n) | set(flower_n))
    sets = [(n, R18, False, True, True) for n in inplace_n]
    if not quick:
        sets += [(hearth_n[0], R18, False, True, False)]
    sets += [(n, R18, False, False, False) for n in hearth_n]
    sets += [(n, R152, False, True, True) for n in big_n]
    if not quick:
        sets += [(n, R18, True, True, False) for n in flower_n]
    return sets


def hearth_line(s: dict, bridge: bool) -> str:
    """A Hearth set's line of the printed report."""
    n, params = s["clients"], s["params"]
    label = f"{'bridge' if bridge else 'native'} {s['transport']} N={n} x {params / 1e6:.2f} M"
    ingest = (
        f"; ingest {s['ingest_gbps_median']:.2f} GB/s = {s['ingest_vs_bare_socket']:.0%} "
        f"of a bare socket's {s['bare_socket_gbps_median']:.2f} (same senders, same run)"
        if s["ingest_vs_bare_socket"] is not None
        else ""
    )
    return (
        f"Hearth {label}: round 1 {s['round1_s'] * 1e3:.0f} ms, rounds 2+ median "
        f"{s['later_median_s'] * 1e3:.0f} ms = {s['later_median_vs_limit']:.2f}x the "
        f"limit (best {s['later_best_vs_limit']:.2f}x; limit "
        f"{s['bandwidth_limit_s'] * 1e3:.0f} ms at {s['bandwidth_gbps_median']:.1f} GB/s, "
        f"samples {s['bandwidth_gbps_range'][0]:.1f}-{s['bandwidth_gbps_range'][1]:.1f})"
        + ingest
        + f"; copies/byte {s['bytes_copied_per_byte_received']:.2f}; server RSS "
        f"{s['server_rss_models']:.2f} models; hot-path faults "
        f"{s['hot_path_faults_rounds2plus']}; new processes "
        f"{s['new_processes_after_round1']}; max rel err {s['max_rel_err_vs_exact']:.1e}"
    )


def run_hearth_sets(
    sets: list[Set],
    flower_n: list[int],
    args: argparse.Namespace,
    app_dir: Path,
    probe: BandwidthProbe,
    out: dict,
    say: Say,
) -> list[list[np.ndarray] | None]:
    """Every Hearth set, its figures appended to ``out["sets"]``; returns the round-1 models
    of the sets compared with Flower's model afterwards (None for the others)."""
    models: list[list[np.ndarray] | None] = []
    for n, params, bridge, shm, in_place in sets:
        h = hearth_set(
            n,
            params,
            args.rounds,
            app_dir,
            bridge,
            args.procs,
            shm,
            in_place,
            probe,
            args.handover,
        )
        s = summarize(h)
        keep = params == R18 and n in flower_n and "round1_model" in h
        models.append(h["round1_model"] if keep else None)
        out["sets"].append(s)
        say(hearth_line(s, bridge))
    return models


def run_flower(root: Path, app_dir: Path, flower_n: list[int], say: Say) -> dict[int, dict]:
    """One Flower round at each N (its own SuperLink and SuperNodes, stopped after it)."""
    flower: dict[int, dict] = {}
    for n in flower_n:
        fr = FlowerRun(root, app_dir, n, R18, 1)
        try:
            flower[n] = fr.run()
        finally:
            fr.close()
        say(
            f"Flower N={n}: round {flower[n]['round_s'][0]:.2f} s, all processes peak RSS "
            f"{flower[n]['peak_rss_all'] / 1e9:.2f} GB, SuperLink peak "
            f"{flower[n]['superlink_peak_rss'] / 1e6:.0f} MB"
        )
    return flower


def compare_with_flower(
    summaries: list[dict],
    sets: list[Set],
    models: list[list[np.ndarray] | None],
    flower: dict[int, dict],
    say: Say,
) -> None:
    """Add Flower's round and model to the figures of each 11.2 M set Flower ran at."""
    for s, (n, params, _bridge, _shm, _ip), model in zip(summaries, sets, models, strict=True):
        if params != R18 or n not in flower:
            continue
        f = flower[n]
        s["flower_round_s"] = f["round_s"][0]
        s["vs_flower_round1"] = f["round_s"][0] / s["round1_s"]
        s["vs_flower_later"] = f["round_s"][0] / s["later_median_s"]
        s["flower_peak_rss_all_gb"] = f["peak_rss_all"] / 1e9
        s["flower_superlink_peak_rss_mb"] = f["superlink_peak_rss"] / 1e6
        if model is not None:
            s["max_rel_err_vs_flower"] = max_rel_err(
                model, [a.astype(np.float64) for a in f["model"]]
            )
        say(
            f"vs Flower N={n}, {'bridge' if _bridge else 'native'} {s['transport']}: "
            f"round 1 {s['vs_flower_round1']:.1f}x, later rounds {s['vs_flower_later']:.1f}x, "
            f"max rel err vs Flower's model {s.get('max_rel_err_vs_flower', float('nan')):.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hearth_n, flower_n, big_n = client_counts(args)
    t_start = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# fedavg round vs Flower, {date}, load average {os.getloadavg()[0]:.1f}", flush=True)

    def say(text: str) -> None:
        el = time.monotonic() - t_start
        print(f"[{el:5.0f} s, load {os.getloadavg()[0]:4.1f}] {text}", flush=True)

    probe = BandwidthProbe()
    root = Path(tempfile.mkdtemp(prefix="hearth-round-bench-"))
    app_dir = write_app(root)
    out: dict = {"date": date, "load_start": os.getloadavg()[0], "quick": args.quick, "sets": []}
    out["handover"] = args.handover
    try:
        # Hearth first: Flower's teardown (thousands of MB freed, dozens of processes stopped)
        # would otherwise land on the first Hearth set. Round-1 models are kept for the sets
        # compared with Flower's model afterwards.
        sets = plan_sets(args.quick, hearth_n, flower_n, big_n)
        models = run_hearth_sets(sets, flower_n, args, app_dir, probe, out, say)
        flower = run_flower(root, app_dir, flower_n, say)
        compare_with_flower(out["sets"], sets, models, flower, say)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        probe.close()
    out["memcpy_gbps_median"] = statistics.median(probe.samples)
    out["memcpy_gbps_range"] = [min(probe.samples), max(probe.samples)]
    out["memcpy_samples"] = len(probe.samples)
    out["load_end"] = os.getloadavg()[0]
    out["elapsed_s"] = time.monotonic() - t_start
    out.update(targets(out["sets"]))
    say(
        f"memory bandwidth over the run: median {out['memcpy_gbps_median']:.1f} GB/s, "
        f"{out['memcpy_gbps_range'][0]:.1f}-{out['memcpy_gbps_range'][1]:.1f} "
        f"({len(probe.samples)} samples between rounds)"
    )
    print(json.dumps(out, default=float))
    return 0 if out["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
