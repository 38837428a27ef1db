"""`hearth.metrics.Tally`: a counter the serving loop bumps with `n += 1` (no call, no lock on the
warm path, #19) still shows on the node's /metrics as the Prometheus counter it replaced, with
the same name and value, and a second one of the same name is refused like a second Counter."""

from __future__ import annotations

import pytest
from hearth.metrics import Metrics, Tally
from prometheus_client import CollectorRegistry, generate_latest


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
