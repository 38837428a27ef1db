"""`hearth.metrics.Tally` and `Calls` expose `_created` series exactly when prometheus_client's
own Counter and Histogram do: the library's setting (`PROMETHEUS_DISABLE_CREATED_SERIES` at its
import, then `disable_created_metrics()` / `enable_created_metrics()`) is the one switch. Each
way, the same counts scraped from them and from a real Counter and Histogram give the same
lines (`_created` values aside: each was made at its own time)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import prometheus_client
from hearth import metrics
from hearth.metrics import LATENCY_BUCKETS, Calls, Tally
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


def _lines(registry: CollectorRegistry) -> list[str]:
    """The scrape's lines without HELP (the docs differ) and with `_created` values blanked."""
    text = generate_latest(registry).decode()
    return sorted(
        ln if ln.startswith("#") else re.sub(r"(_created(\{[^}]*\})?) \S+$", r"\1 T", ln)
        for ln in text.splitlines()
        if not ln.startswith("# HELP")
    )


def scrapes() -> tuple[list[str], list[str]]:
    """The lines of a `Tally` and a `Calls`, and of the Counters and Histogram they stand for,
    after the same counts."""
    mine, ref = CollectorRegistry(), CollectorRegistry()
    tally = Tally("hearth_t", "x", mine)
    calls = Calls(mine)
    t = Counter("hearth_t", "x", registry=ref)
    n = Counter("hearth_invocations", "x", ["function", "status"], registry=ref)
    h = Histogram(
        "hearth_invocation_duration_seconds",
        "x",
        ["function"],
        buckets=LATENCY_BUCKETS,
        registry=ref,
    )
    tally.n += 2
    t.inc(2)
    for function, status, s in [("a", 200, 0.001), ("a", 502, 3.0), ("b", 200, 0.02)]:
        calls.count(function, status, s)
        n.labels(function, str(status)).inc()
        h.labels(function).observe(s)
    return _lines(mine), _lines(ref)


def _created_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "_created" in ln and not ln.startswith("#")]


def test_created_series_follow_the_librarys_switch_in_process() -> None:
    try:
        for on in (True, False, True):
            if on:
                prometheus_client.enable_created_metrics()
            else:
                prometheus_client.disable_created_metrics()
            mine, ref = scrapes()
            assert mine == ref
            assert metrics.use_created() is on
            assert len(_created_lines(mine)) == (6 if on else 0)  # tally, 3 counts, 2 histograms
    finally:
        prometheus_client.enable_created_metrics()  # (as the library starts without the variable)


def test_created_series_follow_the_environment_variable() -> None:
    """`PROMETHEUS_DISABLE_CREATED_SERIES` is read by prometheus_client at its import: a fresh
    interpreter with and without it."""
    here = Path(__file__).parent
    code = (
        f"import json, sys; sys.path.insert(0, {str(here)!r}); "
        "from test_metrics_created import scrapes; print(json.dumps(scrapes()))"
    )
    for value, on in (("true", False), ("1", False), ("false", True), (None, True)):
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_DISABLE_CREATED_SERIES"}
        if value is not None:
            env["PROMETHEUS_DISABLE_CREATED_SERIES"] = value
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        mine, ref = json.loads(out.stdout)
        assert mine == ref, value
        assert len(_created_lines(mine)) == (6 if on else 0), value
