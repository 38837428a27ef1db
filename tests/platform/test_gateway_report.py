"""gateway_overhead.py's JSON line (benchmarks/gateway_report.py): every key its readers know
(docs and earlier runs compare them), each figure from the right target and client."""

from __future__ import annotations

import argparse

from benchmark_module import load_benchmark

rep = load_benchmark("gateway_report")

KEYS = {  # the JSON line's keys with --rev, as on e43629a
    "benchmark", "seconds", "dataplane", "hearth_rps", "aiohttp_rps", "throughput_ratio",
    "throughput_ratio_rounds", "hearth_rps_rounds", "aiohttp_rps_rounds",
    "hearth_p50_ms_at_rate", "hearth_p99_ms_at_rate", "aiohttp_p99_ms_at_rate",
    "aiohttp_p50_ms_at_rate", "hearth_p50_ms_serial", "aiohttp_p50_ms_serial", "ratio_p50_serial",
    "hearth_p50_ms_at_rate_lean", "hearth_p99_ms_at_rate_lean", "aiohttp_p50_ms_at_rate_lean",
    "aiohttp_p99_ms_at_rate_lean", "floor_p50_ms_at_rate_lean", "floor_p99_ms_at_rate_lean",
    "hearth_p50_ms_at_rate_lean_intended", "hearth_p99_ms_at_rate_lean_intended",
    "aiohttp_p50_ms_at_rate_lean_intended", "aiohttp_p99_ms_at_rate_lean_intended",
    "floor_p50_ms_at_rate_lean_intended", "hearth_errors_at_rate_lean", "hearth_sends_late_p99_ms",
    "lean_sends_late_p99_ms", "lean_late_bound_ms", "lean_run_valid", "rate", "errors",
    "target_throughput_ratio_ge_0_4", "target_p99_le_5ms", "target_p50_le_0_5ms",
    "loadavg_at_end", "spins", "rev", "rev_p50_ms_serial", "rev_p50_ms_serial_rounds",
    "hearth_p50_ms_serial_rounds", "ratio_p50_serial_vs_rev", "rev_rps", "ratio_rps_vs_rev",
    "rev_p50_ms_at_rate", "rev_p99_ms_at_rate", "rev_p50_ms_at_rate_lean", "rev_spins",
    "rev_p99_ms_at_rate_lean", "targets_met",
}  # fmt: skip


def _figs(base: float) -> dict:
    """One measurement's figures, each a distinct value: a figure read from the wrong place
    shows as the wrong number."""
    return {
        "n": 1000, "rps": 1000 * base, "errors": 0, "p50_ms": base + 0.01, "p99_ms": base + 0.02,
        "max_ms": base + 0.03, "p50_intended_ms": base + 0.04, "p99_intended_ms": base + 0.05,
        "late_p99_ms": 0.1, "timed_out": 0, "connections": 4,
    }  # fmt: skip


def _target(base: float) -> dict:
    return {
        "closed": _figs(base),
        "closed_rounds": [round(1000 * base)] * 2,
        "serial_p50_ms": base + 0.06,
        "open_lean": _figs(base + 0.1),
        "open": _figs(base + 0.2),
    }


def test_the_json_line_keeps_its_keys_and_reads_each_figure_from_its_target():
    a = argparse.Namespace(rev="main", rate=500.0, concurrency=32)
    results = {"hearth": _target(1.0), "aiohttp": _target(2.0), "@main": _target(3.0)}
    counts = {"calls": 10.0, "hits": 2.0, "misses": 1.0, "seconds": 1e-4}
    spins_of = {
        n: {k: dict(counts) for k in ("closed", "serial", "open")} for n in ("hearth", "@main")
    }
    out = rep.report(
        a,
        5.0,
        2,
        "ebpf",
        results=results,
        serial={n: [r["serial_p50_ms"]] * 2 for n, r in results.items()},
        ratios=[0.5, 0.5],
        floor_open=_figs(4.0),
        spins_of=spins_of,
    )
    assert set(out) == KEYS
    assert (out["hearth_p50_ms_at_rate"], out["aiohttp_p99_ms_at_rate"]) == (1.21, 2.22)
    assert (out["aiohttp_p50_ms_at_rate_lean"], out["floor_p99_ms_at_rate_lean"]) == (2.11, 4.02)
    assert out["hearth_p99_ms_at_rate_lean_intended"] == 1.15
    assert out["floor_p50_ms_at_rate_lean_intended"] == 4.04
    assert (out["rev_p99_ms_at_rate"], out["rev_p50_ms_at_rate_lean"]) == (3.22, 3.11)
    assert out["spins"]["open"] == {
        "calls": 10.0,
        "spun": 0.3,
        "hit": 0.2,
        "spin_us_per_call": 10.0,
    }
    assert out["rev_spins"] == out["spins"]
