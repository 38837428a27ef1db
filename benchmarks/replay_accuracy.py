"""Replay accuracy: 2,000 invocations/s for 60 s (``--quick``: 15 s), open loop.

Side by side in one run, against the same no-op target:
* ``precise/raw``: Hearth's driver (sleep, yield, spin the last ~200 us; keep-alive raw
  HTTP/1.1 client);
* ``precise/aiohttp``: same pacing, aiohttp's client (the sender cost baseline);
* ``sleep/raw``: pacing with ``asyncio.sleep`` only (what a simple loader does).

Target: a bare aiohttp no-op server started here on loopback, in its own process (the
baseline); ``--hearth``: a private Hearth started here with the replay workload deployed as
the no-op function (duration 0); or ``--url`` (a running gateway; ``--function``).
Prints achieved rate, lag p50/p99/max per run; the last line is one JSON object.
Targets: achieved rate within 1% of planned, lag p99 <= 2 ms. Against Hearth also the overload
targets: no 502 or 507 at the planned rate (overload answers only 200, 429 or 503), response
p99 <= 1 s there (back-pressure comes early, not after hidden queueing), and with
``--knee`` the knee: the highest of a ladder of rates (a few seconds each) at which >= 99 % of
responses are 200 with response p99 <= 50 ms; at the knee, again no 502/507. The ladder runs
first. ``--baseline-no-shed`` repeats the Hearth runs on a node without load shedding.

With ``--hearth``, the overload floor runs last (Hearth stopped): a bare aiohttp server answering
every POST at once with a constant 503 + Retry-After, body unread, driven by the same sender at
the same rate. Its p99 is what the machine and the sender allow; the JSON gives Hearth's p99 as
a ratio to it (target ``response_p99_within_2x_of_bare_503``) beside the absolute bound, which
stays a target (``targets_met_but_absolute_p99`` is the rest). Every run also reports the
sender's own event-loop lag (``client_loop_lag_ms_p99``): response times run from the actual
write to when the sender's loop handles the answer, so a lagging sender inflates them.

``--dataplane`` picks the node's data plane as `hearth up` takes it (default auto: eBPF where it
loads; unix: the proxy daemon relays every descriptor). ``--rev REV`` runs the same ladder and
run on a node from revision REV's ``platform/`` (by git archive) right after this tree's, before
the floor: an A/B in one run (``rev`` and ``response_p99_over_rev`` in the JSON); the second
node measured lower p99s with the same code in both places (2.2x, 2026-12-07), so alternate
``--rev-first`` between runs. Each run also
reports, per process role (server, proxy, instances, redis, sender), the cores used and the CPU
and run-queue wait per request, and its wake-ups (voluntary context switches) and preemptions
per request (``processes``): where a call waited for a CPU, and how many times each process had
to be woken for it. ``--relay-baseline`` adds a second baseline after the floor, a figure and
not a target: a bare aiohttp front relaying every body to one worker process over a unix socket
(the cheapest design in which the function runs in a process of its own, as isolation needs),
driven the same way (``relay_baseline``, ``relay_p99_over_bare_503``,
``response_p99_over_relay``). Against a node, each run also reports what the node counted
during it (``node``, read from its /metrics before and after; figures, not targets): instance
starts, the agent's busy-polls for replies (hits, misses, CPU), garbage collections and their
pause time, and lag-timer ticks later than 2/5/10 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from replay_figures import overload_figures, report
from replay_run import run_one
from replay_servers import start_hearth_gateway, start_noop_server

# This file holds the command line and the order of the runs; replay_servers.py the targets,
# replay_run.py one run, replay_processes.py what the processes and the node spent,
# replay_figures.py the overload figures, the printed report and the JSON line.


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="15 s per run instead of 60 s")
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--url", default=None, help="target base URL (e.g. a Hearth gateway)")
    ap.add_argument(
        "--function",
        default=None,
        help="function name on the target (default noop; replay-workload with --hearth)",
    )
    ap.add_argument(
        "--hearth",
        action="store_true",
        help="start a private Hearth and replay against it (LEAD HOOK)",
    )
    ap.add_argument(
        "--records", default=None, help="write the precise run's records here (.parquet/.csv)"
    )
    ap.add_argument("--only-precise", action="store_true", help="skip the two baseline runs")
    ap.add_argument(
        "--baseline-no-shed",
        action="store_true",
        help="with --hearth: the same runs again on a node without shedding or queue bound",
    )
    ap.add_argument(
        "--knee",
        action="store_true",
        help="also step the rate up (250..rate) and report the knee (>=99%% 200, p99 <= 50 ms)",
    )
    ap.add_argument(
        "--dataplane",
        choices=("auto", "ebpf", "unix"),
        default="auto",
        help="the node's data plane, as `hearth up` takes it (auto: eBPF where it loads; unix: "
        "the daemon relays every descriptor, one more process on each call's path)",
    )
    ap.add_argument(
        "--rev",
        help="with --hearth: the same ladder and run again on a node running this git revision's "
        "platform/ (by git archive), right after this tree's and before the floor (A/B in one run)",
    )
    ap.add_argument(
        "--rev-first",
        action="store_true",
        help="with --rev: run the revision's node first (the second node measured lower p99s "
        "with the same code in both places: alternate the order between runs)",
    )
    ap.add_argument(
        "--relay-baseline",
        action="store_true",
        help="with --hearth: also run the relay baseline after the floor (a bare aiohttp front "
        "relaying every body to one worker process over a unix socket; a figure, not a target)",
    )
    a = ap.parse_args()
    if a.rev_first and not (a.rev and a.only_precise):
        ap.error("--rev-first needs --rev and --only-precise")
    if a.relay_baseline and not (a.hearth and a.url is None):
        ap.error("--relay-baseline needs --hearth (it runs after the floor)")
    seconds = a.seconds or (15.0 if a.quick else 60.0)
    rev_platform = rev_tmp = None
    if a.rev and a.hearth and a.url is None:  # read first: a mistyped one starts nothing
        import tempfile

        import revtree  # a revision's platform/, by git archive

        rev_tmp = tempfile.mkdtemp(prefix="hearth-bench-rev-")
        rev_platform = str(revtree.platform_of(a.rev, Path(rev_tmp)))

    proc = None
    target_kind = "url"
    url = a.url
    function = a.function or "noop"
    node = dataplane = None
    if url is None and a.hearth:
        from hearth.localnode import NodeStartError

        try:
            node = start_hearth_gateway(
                dataplane=a.dataplane, platform=rev_platform if a.rev_first else None
            )
        except NodeStartError as e:
            print(f"error: could not start a Hearth node: {e}", file=sys.stderr)
            return 1
        url = node.url
        dataplane = node.dataplane
        target_kind = "hearth"
        function = a.function or "replay-workload"
    elif url is None:
        url, proc = start_noop_server()
        target_kind = "aiohttp-noop-loopback"
    time.sleep(0.3)

    def overload_ladder(url: str) -> list[dict]:
        # before the planned-rate run: an overload run's leftovers would spoil the low rates
        step_s = 4.0 if a.quick else 10.0
        rates = [r for r in (250, 500, 1000, 1500, 2000, 3000) if r <= a.rate]
        run_one(url, rates[0], 2.0, "precise", function, "raw")  # warm-up (instances), unscored
        return [run_one(url, r, step_s, "precise", function, "raw") for r in rates]

    baseline = bare = rev = relay = None
    try:
        ladder = overload_ladder(url) if a.knee else []
        pid = node.proc.pid if node is not None else None
        records = None if a.rev_first else a.records
        runs = [run_one(url, a.rate, seconds, "precise", function, "raw", records, pid, node)]
        if not a.only_precise:
            runs.append(run_one(url, a.rate, seconds, "precise", function, "aiohttp"))
            runs.append(run_one(url, a.rate, seconds, "sleep", function, "raw"))
        if node is not None and a.baseline_no_shed:
            node.stop()
            node = start_hearth_gateway(shed=False, dataplane=a.dataplane)
            b_ladder = overload_ladder(node.url) if a.knee else []
            b_run = run_one(node.url, a.rate, seconds, "precise", function, "raw")
            baseline = overload_figures(b_run, b_ladder)
        if node is not None and rev_platform is not None:
            node.stop()
            node = start_hearth_gateway(
                dataplane=a.dataplane, platform=None if a.rev_first else rev_platform
            )
            r_ladder = overload_ladder(node.url) if a.knee else []
            rev = run_one(
                node.url, a.rate, seconds, "precise", function, "raw", None, node.proc.pid, node
            )
            if a.rev_first:  # the first node ran the revision: swap the figures back
                rev, runs, r_ladder, ladder = runs[0], [rev], ladder, r_ladder
            rev["overload"] = overload_figures(rev, r_ladder)
        if node is not None:
            # the floor: the same sender at the same rate against the cheapest possible
            # back-pressure (Hearth stopped first, so both ran alone with the sender)
            node.stop()
            node = None
            bare_url, proc = start_noop_server(bare_503=True)
            bare = run_one(bare_url, a.rate, seconds, "precise", function, "raw", None, proc.pid)
            if a.relay_baseline:
                proc.terminate()
                proc.wait(15)
                relay_url, proc = start_noop_server(relay=True)
                relay = run_one(
                    relay_url, a.rate, seconds, "precise", function, "raw", None, proc.pid
                )
    finally:
        if node is not None:
            node.stop()  # hearth up and everything it started
        if rev_tmp is not None:
            import shutil

            shutil.rmtree(rev_tmp, ignore_errors=True)
        if isinstance(proc, subprocess.Popen):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = report(a, seconds, target_kind, dataplane, runs, ladder, baseline, bare, rev, relay)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
