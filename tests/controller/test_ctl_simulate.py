import numpy as np
import pytest
from hearth.controller.simulate import PolicyResult, simulate


def test_fixed_ttl_expiry_is_exact():
    # arrivals 50 s apart with exec 0 and cold 0: gaps of 50 s stay warm under TTL 60, not under 40
    arr = {"f": np.array([0.0, 50.0, 100.0, 200.0])}
    r60, r40 = simulate(arr, ["fixed:60", "fixed:40"], cold_start_s=0.0, exec_s=0.0)
    assert isinstance(r60, PolicyResult)
    assert r60.invocations == 4
    assert r60.cold_starts == 2  # t=0 and t=200 (gap 100 > 60)
    assert r40.cold_starts == 4
    # idle memory: 50 + 50 + 60 (expired at 160) seconds × 0.25 GB; then idle ends at trace end
    assert r60.idle_memory_gb_s == pytest.approx((50 + 50 + 60) * 0.25)
    assert r40.idle_memory_gb_s == pytest.approx((40 + 40 + 40) * 0.25)


def test_concurrent_arrivals_need_more_instances():
    arr = {"f": np.array([0.0, 0.05, 0.1, 10.0, 10.05, 10.1])}
    (r,) = simulate(arr, ["fixed:60"], cold_start_s=1.0, exec_s=1.0)
    assert r.cold_starts == 3 and r.per_function["f"]["cold_starts"] == 3


def test_histogram_prewarm_avoids_cold_starts_on_a_timer_with_little_idle_memory():
    arr = {"timer": np.arange(0, 6 * 3600, 600.0)}
    fixed, hist = simulate(arr, ["fixed:60", "histogram"], cold_start_s=0.5, exec_s=0.1)
    assert fixed.cold_starts == fixed.invocations  # 10-minute gaps beat a 1-minute TTL
    assert hist.cold_starts <= 6  # learning phase only
    assert hist.prewarms > 20
    assert hist.idle_memory_gb_s < 0.25 * 3600 * 6 / 2  # unloaded between timer ticks


def test_greedy_dual_under_pressure_evicts_and_keeps_the_valuable():
    rng = np.random.default_rng(0)
    arr = {
        "hot": np.sort(rng.uniform(0, 3600, 400)),
        "cold1": np.sort(rng.uniform(0, 3600, 20)),
        "cold2": np.sort(rng.uniform(0, 3600, 20)),
    }
    (r,) = simulate(
        arr, ["greedy-dual"], memory_mb=256, capacity_mb=512, cold_start_s=1.0, exec_s=0.01
    )
    assert r.evictions > 0
    assert r.per_function["hot"]["cold_starts"] <= 3
    assert r.over_capacity == 0


def test_coldstart_aware_beats_fixed_on_timers():
    arr = {f"t{k}": np.arange(k * 7.0, 4 * 3600, 120.0 + 30 * k) for k in range(5)}
    fixed, csa = simulate(arr, ["fixed:600", "coldstart-aware"], cold_start_s=1.0, exec_s=0.1)
    assert csa.cold_starts <= fixed.cold_starts + 5 * 4
    assert csa.idle_memory_gb_s < fixed.idle_memory_gb_s / 5


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="sorted"):
        simulate({"f": np.array([2.0, 1.0])}, ["fixed"])
    with pytest.raises(ValueError, match="unknown keep-alive policy"):
        simulate({"f": np.array([1.0])}, ["nope"])
    with pytest.raises(ValueError, match="memory_mb: no value for function 'f'"):
        simulate({"f": np.array([1.0])}, ["fixed"], memory_mb={"g": 1.0})
