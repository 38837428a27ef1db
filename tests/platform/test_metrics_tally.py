"""`hearth.metrics.Tally`: a counter the serving loop bumps with `n += 1` (no call, no lock on the
warm path, #19) still shows on the node's /metrics as the Prometheus counter it replaced, with
the same name and value, and a second one of the same name is refused like a second Counter;
`hearth.metrics.Calls` (invocations and their latency, counted the same way) shows the series of
the Counter and Histogram it replaced."""

from __future__ import annotations

import pytest
from hearth.metrics import LATENCY_BUCKETS, Metrics, Tally
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


def _line(registry: CollectorRegistry, name: str) -> str:
    text = generate_latest(registry).decode()
    return next(ln for ln in text.splitlines() if ln.startswith(name + " "))


def test_a_tally_is_scraped_as_a_counter_with_its_current_count():
    m = Metrics()
    m.fast_path.n += 3
    m.fast_path_direct.n += 2
    assert (
        _line(m.registry, "hearth_gateway_fast_path_total") == "hearth_gateway_fast_path_total 3.0"
    )
    assert _line(m.registry, "hearth_gateway_fast_path_direct_total").endswith(" 2.0")
    text = generate_latest(m.registry).decode()
    assert "# TYPE hearth_gateway_fast_path_total counter" in text
    assert "# TYPE hearth_gateway_fast_path_created gauge" in text  # as a Counter has it
    m.fast_path.n += 1  # read at scrape time, not at registration
    assert _line(m.registry, "hearth_gateway_fast_path_total").endswith(" 4.0")


def test_a_second_tally_of_the_same_name_is_refused():
    r = CollectorRegistry()
    Tally("hearth_x", "x", r)
    with pytest.raises(ValueError, match="Duplicated"):
        Tally("hearth_x", "x again", r)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in registry.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def test_calls_are_scraped_as_the_counter_and_histogram_they_replaced():
    """The same calls counted by `Calls` and by prometheus_client's Counter and Histogram give
    the same series and values, bucket for bucket (a bound itself, +Inf, sums)."""
    mine = Metrics()
    ref = CollectorRegistry()
    calls = Counter("hearth_invocations", "x", ["function", "status"], registry=ref)
    latency = Histogram(
        "hearth_invocation_duration_seconds",
        "x",
        ["function"],
        buckets=LATENCY_BUCKETS,
        registry=ref,
    )
    seen = [
        ("a", 200, 0.0003),
        ("a", 200, 0.0005),  # on a bound: that bucket
        ("a", 502, 0.02),
        ("b", 200, 75.0),  # past the last bound: +Inf
        ("a", 200, 1.0),
    ]
    for function, status, t in seen:
        mine.calls.count(function, status, t)
        calls.labels(function, str(status)).inc()
        latency.labels(function).observe(t)
    got = {k: v for k, v in _samples(mine.registry).items() if "invocation" in k[0]}
    assert got == _samples(ref)
    assert mine.calls.invocations("a", 200) == 3 and mine.calls.invocations("b", 502) == 0
    text = generate_latest(mine.registry).decode()
    assert "# TYPE hearth_invocations_total counter" in text
    assert "# TYPE hearth_invocation_duration_seconds histogram" in text
    assert 'hearth_invocation_duration_seconds_created{function="b"}' in text
    assert 'hearth_invocations_created{function="a",status="502"}' in text
