"""The pure batch planner of the node agent (hearth.batching)."""

from __future__ import annotations

import pytest
from hearth.batching import MAX_SERVICE_S, batch_sizes, update_service_time
from hypothesis import given
from hypothesis import strategies as st


def test_unknown_or_slow_functions_go_one_by_one() -> None:
    assert batch_sizes(5, None, 30.0, 2, 32) == [1] * 5
    assert batch_sizes(5, MAX_SERVICE_S * 2, 30.0, 2, 32) == [1] * 5


def test_trigger_cap_of_one_disables_batching() -> None:
    assert batch_sizes(4, 1e-5, 30.0, 2, 1) == [1, 1, 1, 1]


def test_events_are_spread_over_ready_instances() -> None:
    assert batch_sizes(64, 1e-5, 30.0, 2, 64) == [32, 32]
    assert batch_sizes(64, 1e-5, 30.0, 4, 64) == [16, 16, 16, 16]
    assert batch_sizes(10, 1e-5, 30.0, 0, 64) == [10]  # none ready yet: one batch waits


def test_trigger_cap_bounds_the_batch() -> None:
    assert batch_sizes(64, 1e-5, 30.0, 1, 16) == [16, 16, 16, 16]
    assert batch_sizes(50, 1e-5, 30.0, 1, 16) == [16, 16, 16, 2]


def test_batch_stays_a_small_share_of_the_timeout() -> None:
    # 1 ms per event and a 0.05 s timeout: at most 5 events (0.1 x 0.05 s / 1 ms) per batch
    assert batch_sizes(20, 0.001, 0.05, 1, 64) == [5, 5, 5, 5]


@given(
    n=st.integers(0, 2000),
    service=st.one_of(st.none(), st.floats(1e-7, 0.01)),
    timeout=st.floats(0.01, 900),
    ready=st.integers(0, 16),
    cap=st.integers(1, 256),
)
def test_sizes_cover_every_event_and_respect_the_cap(n, service, timeout, ready, cap) -> None:
    sizes = batch_sizes(n, service, timeout, ready, cap)
    assert sum(sizes) == n
    assert all(1 <= s <= cap for s in sizes)
    if service is not None and len(sizes) and max(sizes) > 1:
        assert max(sizes) * service <= timeout * 0.1 + 1e-12


def test_service_time_average() -> None:
    assert update_service_time(None, 0.032, 32) == pytest.approx(0.001)
    assert update_service_time(0.001, 0.002, 1) == pytest.approx(0.8 * 0.001 + 0.2 * 0.002)
