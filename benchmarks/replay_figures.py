"""replay_accuracy.py's judgement and report: the overload figures at the planned rate and the
knee of the ladder, Hearth's p99 against the bare 503 floor, the printed lines and the JSON
line's figures and targets (every top-level boolean is a target)."""

from __future__ import annotations

import argparse

BAD = ("502", "507")
BACKPRESSURE = {"200", "429", "503"}
P99_BOUND_MS = 1000.0  # overload: answered (200 or back-pressure) within a second


def _share_200(r: dict) -> float:
    n = sum(r["status_counts"].values()) or 1
    return r["status_counts"].get("200", 0) / n


def overload_figures(at_rate: dict, ladder: list[dict]) -> dict:
    """Overload behaviour at the planned rate, and the knee of the ladder (if one was run)."""
    sc = {str(k): v for k, v in at_rate["status_counts"].items()}
    out = {
        "status_counts": sc,
        "response_ms_p99": at_rate["response_ms_p99"],
        "response_ms_p99_by_status": at_rate["response_ms_p99_by_status"],
        "connections_opened": at_rate["connections_opened"],
        "no_502_507": not any(sc.get(b) for b in BAD),
        # every request answered (no client timeout: status 0) within the bound
        "response_p99_bounded": at_rate["response_ms_p99"] <= P99_BOUND_MS,
        "overload_answers_backpressure_only": set(sc) <= BACKPRESSURE,
    }
    if ladder:
        ok = [r for r in ladder if _share_200(r) >= 0.99 and r["response_ms_p99"] <= 50.0]
        knee = max(ok, key=lambda r: r["planned_rate"]) if ok else None
        out["knee_rate"] = knee["planned_rate"] if knee else 0.0
        out["knee"] = [
            {
                "rate": r["planned_rate"],
                "ok_200_pct": round(100 * _share_200(r), 2),
                "response_ms_p99": r["response_ms_p99"],
                "status_counts": r["status_counts"],
                "response_ms_p99_by_status": r["response_ms_p99_by_status"],
                "send_lag_ms_p99": r["lag_ms_p99"],  # the sender's own delay (client saturated?)
            }
            for r in ladder
        ]
        out["knee_found"] = knee is not None
        out["knee_no_502_507"] = knee is not None and not any(
            str(b) in {str(k) for k in knee["status_counts"]} for b in BAD
        )
    return out


#: Hearth's overload p99 may be this many times the bare 503 server's (same sender, same rate)
WITHIN_X_OF_BARE = 2.0


def bare_503_figures(hearth: dict, bare: dict) -> dict:
    """Hearth's overload answer against the floor: a bare aiohttp server answering every POST
    at once with a constant 503 + Retry-After, driven by the same sender at the same rate. When
    even the floor's p99 is over P99_BOUND_MS, the absolute bound measures the machine and the
    sender (2 shared cores), not Hearth; the ratio is what Hearth adds."""
    ratio = hearth["response_ms_p99"] / max(bare["response_ms_p99"], 1e-3)
    return {
        "bare_503": {  # nested: its figures are the baseline's, not targets of this run
            "achieved_rate": bare["achieved_rate"],
            "lag_ms_p99": bare["lag_ms_p99"],
            "client_loop_lag_ms_p99": bare["client_loop_lag_ms_p99"],
            "response_ms_p50": bare["response_ms_p50"],
            "response_ms_p99": bare["response_ms_p99"],
            "server_cpu_us_per_request": bare["server_cpu_us_per_request"],
            "connections_opened": bare["connections_opened"],
            "status_counts": bare["status_counts"],
            "processes": bare.get("processes"),
            "response_p99_within_bound": bare["response_ms_p99"] <= P99_BOUND_MS,
        },
        "p99_bound_ms": P99_BOUND_MS,
        # a sentence, not a boolean: every top-level boolean is a target
        "p99_bound_here": (
            "machine limit: even the bare 503 server's p99 is over the bound"
            if bare["response_ms_p99"] > P99_BOUND_MS
            else "reachable: the bare 503 server's p99 is within the bound"
        ),
        "response_p99_over_bare_503": round(ratio, 2),
        "server_cpu_per_request_over_bare_503": round(
            (hearth["server_cpu_us_per_request"] or 0.0)
            / max(bare["server_cpu_us_per_request"] or 0.0, 1e-3),
            2,
        ),
        f"response_p99_within_{WITHIN_X_OF_BARE:g}x_of_bare_503": ratio <= WITHIN_X_OF_BARE,
    }


def report(
    a: argparse.Namespace,
    seconds: float,
    target_kind: str,
    dataplane: str | None,
    runs: list[dict],
    ladder: list[dict],
    baseline: dict | None,
    bare: dict | None,
    rev: dict | None,
    relay: dict | None,
) -> dict:
    """Prints each run's lines; the JSON line's figures and targets (``runs[0]`` is the precise
    run against the target; the others are figures beside it)."""
    p = runs[0]
    for r in runs:
        print(
            f"{r['run']:>16}: planned {r['planned_rate']:.1f}/s achieved {r['achieved_rate']:.1f}/s "
            f"({r['rate_error_pct']:+.2f}%), lag p50 {r['lag_ms_p50']:.3f} ms p99 {r['lag_ms_p99']:.3f} ms "
            f"max {r['lag_ms_max']:.1f} ms, response p50 {r['response_ms_p50']:.2f} ms, failed {r['failed']}"
        )
    if bare is not None:
        print(
            f"bare 503 (floor): achieved {bare['achieved_rate']:.1f}/s, lag p99 "
            f"{bare['lag_ms_p99']:.1f} ms, client loop lag p99 {bare['client_loop_lag_ms_p99']:.1f} ms, "
            f"response p50 {bare['response_ms_p50']:.2f} ms p99 {bare['response_ms_p99']:.1f} ms, "
            f"server CPU {bare['server_cpu_us_per_request']} us/request "
            f"(Hearth's gateway process {p['server_cpu_us_per_request']}); "
            f"Hearth p99 {p['response_ms_p99']:.1f} ms (bound {P99_BOUND_MS:.0f} ms, "
            f"{p['response_ms_p99'] / max(bare['response_ms_p99'], 1e-3):.2f}x the floor)"
        )
    if relay is not None:
        print(
            f"relay baseline: {relay['status_counts']}, response p50 "
            f"{relay['response_ms_p50']:.2f} ms p99 {relay['response_ms_p99']:.1f} ms "
            f"({relay['response_ms_p99'] / max(bare['response_ms_p99'], 1e-3):.2f}x the floor; "
            f"Hearth {p['response_ms_p99'] / max(relay['response_ms_p99'], 1e-3):.2f}x the relay)"
        )
    for name, r in (("Hearth", p), (f"@{a.rev}", rev)):
        if r is not None and r.get("node"):
            f = r["node"]
            print(
                f"{name:>8} node: {f['instance_starts']} instance starts, spins "
                f"{f['spins_hit']} hit / {f['spins_miss']} miss ({f['spin_cpu_s'] * 1000:.0f} ms "
                f"CPU), {f['gc_collections']} collections ({f['gc_pause_s'] * 1000:.0f} ms, "
                f"{f['gc_pauses_over_5ms']} over 5 ms), lag ticks over 2/5/10 ms: "
                + "/".join(str(v) for v in f["lag_ticks_over_ms"].values())
                + f" of {f['lag_ticks']}"
            )
    for name, r in (("Hearth", p), (f"@{a.rev}", rev), ("bare 503", bare), ("relay", relay)):
        for role, f in ((r or {}).get("processes") or {}).items():
            print(
                f"{name:>8} {role:>9}: {f['cores']:.2f} core, {f['cpu_us_per_request']:.0f} us CPU "
                f"and {f['runq_wait_us_per_request']:.0f} us waiting for a CPU per request, "
                f"{f['wakeups_per_request']:.2f} wake-ups and {f['preempted_per_request']:.2f} "
                f"preemptions ({f['processes']} processes)"
            )
    out = {
        "benchmark": "replay_accuracy",
        "target": target_kind,
        "rate": a.rate,
        "seconds": seconds,
        "achieved_rate": p["achieved_rate"],
        "rate_error_pct": p["rate_error_pct"],
        "lag_ms_p50": p["lag_ms_p50"],
        "lag_ms_p99": p["lag_ms_p99"],
        "lag_ms_max": p["lag_ms_max"],
        "rate_within_1pct": bool(abs(p["rate_error_pct"]) <= 1.0),
        "lag_p99_le_2ms": bool(p["lag_ms_p99"] <= 2.0),
        "runs": runs,
    }
    if target_kind == "hearth":
        out["dataplane"] = dataplane  # the mode the node reported (auto resolves to one)
        out.update(overload_figures(p, ladder))
    if baseline is not None:  # nested: its booleans are figures, not this run's targets
        out["no_shed_baseline"] = baseline
        out["no_shed_over_shed_response_p99"] = round(
            baseline["response_ms_p99"] / max(p["response_ms_p99"], 1e-3), 2
        )
    if bare is not None:
        out.update(bare_503_figures(p, bare))
    if relay is not None:  # nested: a second baseline's figures, not targets of this run
        out["relay_baseline"] = {
            k: relay[k]
            for k in (
                "achieved_rate",
                "lag_ms_p99",
                "client_loop_lag_ms_p99",
                "response_ms_p50",
                "response_ms_p99",
                "status_counts",
                "processes",
            )
        }
        out["relay_p99_over_bare_503"] = round(
            relay["response_ms_p99"] / max(bare["response_ms_p99"], 1e-3), 2
        )
        out["response_p99_over_relay"] = round(
            p["response_ms_p99"] / max(relay["response_ms_p99"], 1e-3), 2
        )
    if rev is not None:  # nested: the revision's figures, not targets of this run
        out["rev"] = {
            "rev": a.rev,
            **rev["overload"],
            "server_cpu_us_per_request": rev["server_cpu_us_per_request"],
            "processes": rev["processes"],
            "node": rev["node"],
            **(
                {
                    "response_p99_over_bare_503": bare_503_figures(rev, bare)[
                        "response_p99_over_bare_503"
                    ]
                }
                if bare is not None
                else {}
            ),
        }
        out["response_p99_over_rev"] = round(
            p["response_ms_p99"] / max(rev["response_ms_p99"], 1e-3), 2
        )
        print(
            f"@{a.rev}: p99 {rev['response_ms_p99']:.1f} ms {rev['status_counts']}, server CPU "
            f"{rev['server_cpu_us_per_request']} us/request; this tree's p99 "
            f"{out['response_p99_over_rev']:.2f}x the revision's"
        )
    targets = [k for k, v in out.items() if isinstance(v, bool)]
    out["targets_met"] = all(out[k] for k in targets)
    if bare is not None:
        # the same targets with the absolute bound left out (the floor shows whether the machine
        # can meet it at all); a figure beside targets_met, never instead of it
        out["targets_met_but_absolute_p99"] = all(
            out[k] for k in targets if k != "response_p99_bounded"
        )
    if len(runs) > 1 and runs[0]["lag_ms_p99"] > 0:
        out["aiohttp_client_over_raw_lag_p99"] = round(
            runs[1]["lag_ms_p99"] / runs[0]["lag_ms_p99"], 2
        )
        out["sleep_pacing_over_precise_lag_p99"] = round(
            runs[2]["lag_ms_p99"] / runs[0]["lag_ms_p99"], 2
        )
    return out
