import math

import numpy as np
import pytest
from hearth.controller.keepalive import (
    Candidate,
    ColdStartAware,
    FixedTTL,
    GreedyDual,
    HybridHistogram,
    PolicySet,
    Profile,
    Window,
    parse_policy_name,
    policy_for,
)

P = Profile(memory_mb=256, cold_start_s=1.0, ttl_s=60)


def test_fixed_ttl_window_is_exact():
    assert FixedTTL(120).window("f", 0.0, P) == Window(0.0, 120.0)
    assert FixedTTL().window("f", 0.0, P) == Window(0.0, 60.0)  # the function's own TTL


def test_histogram_prewarms_just_before_periodic_arrival():
    pol = HybridHistogram()
    for k in range(20):
        pol.record("timer", k * 600.0, 599.5, P)  # 10-minute timer, ~599.5 s idle
    w = pol.window("timer", 0.0, P)
    # unload after execution, load again shortly before the next arrival, keep until after it
    assert 0 < w.prewarm_s < 599.5 < w.keep_s
    assert 599.5 - w.prewarm_s <= 120  # within two 1-minute bins (+10% margin)
    assert w.prewarm_s == pytest.approx(540 * 0.9)
    assert w.keep_s == pytest.approx(600 * 1.1)


def test_histogram_falls_back_when_unrepresentative():
    pol = HybridHistogram(fallback_ttl_s=300)
    assert pol.window("new", 0.0, P) == Window(0.0, 300)  # no samples
    rng = np.random.default_rng(0)
    for x in rng.uniform(0, 4 * 3600, 500):  # flat histogram: CV < 2
        pol.record("flat", 0.0, float(x), P)
    assert pol.window("flat", 0.0, P) == Window(0.0, 300)
    for _ in range(10):
        pol.record("rare", 0.0, 10 * 3600.0, P)  # all out of range
    assert pol.window("rare", 0.0, P) == Window(0.0, 300)


def test_greedy_dual_evicts_lowest_priority():
    pol = GreedyDual()
    cheap = Profile(memory_mb=1024, cold_start_s=0.1)
    dear = Profile(memory_mb=128, cold_start_s=2.0)
    for _ in range(3):
        pol.record("cheap", 0.0, None, cheap)
        pol.record("dear", 0.0, None, dear)
    cands = [Candidate("1", "dear", 5.0, 128), Candidate("2", "cheap", 9.0, 1024)]
    assert [c.instance_id for c in pol.eviction_order(cands, 10.0)] == ["2", "1"]
    # priority = clock + freq * cost / mem
    assert pol.prio["cheap"] == pytest.approx(3 * 0.1 / 1024)
    pol.evicted("cheap", 10.0)
    assert pol.clock == pytest.approx(3 * 0.1 / 1024)
    pol.record("cheap", 11.0, None, cheap)  # re-inserted after the clock advanced
    assert pol.prio["cheap"] == pytest.approx(pol.clock + 0.1 / 1024)
    assert pol.window("x", 0, P).keep_s == math.inf


def test_coldstart_aware_periodic_function_gets_tight_window():
    pol = ColdStartAware(gb_s_per_cold_s=30)
    for _ in range(10):
        pol.record("timer", 0.0, 300.0, P)
    w = pol.window("timer", 0.0, P)
    assert 290 < w.prewarm_s < 300 < w.keep_s < 310


def test_coldstart_aware_weighs_cold_cost_against_memory():
    rng = np.random.default_rng(1)
    idle = rng.exponential(30.0, 100)
    cheap = ColdStartAware(gb_s_per_cold_s=1.0).optimal_window(idle, mem_gb=4.0, cold_s=0.05)
    assert cheap == Window(0.0, 0.0)  # a 50 ms cold start is not worth holding 4 GB
    dear = ColdStartAware(gb_s_per_cold_s=1.0).optimal_window(idle, mem_gb=0.125, cold_s=10.0)
    assert (
        dear.prewarm_s == 0.0 and dear.keep_s > 60
    )  # expensive cold start, small memory: keep long


def test_coldstart_aware_optimum_matches_brute_force():
    rng = np.random.default_rng(2)
    idle = np.concatenate([rng.normal(60, 2, 30), rng.exponential(400, 10)]).clip(0.1)
    pol = ColdStartAware(gb_s_per_cold_s=5.0)
    mem, cold = 0.5, 2.0
    w = pol.optimal_window(idle, mem, cold)

    def cost(a, b):
        c = 0.0
        for t in idle:
            if a <= t <= b:
                c += mem * (t - a)
            else:
                c += 5.0 * cold + (mem * (b - a) if t > b else 0.0)
        return c / len(idle)

    best = cost(w.prewarm_s, w.keep_s) if w.keep_s > 0 else 5.0 * cold
    grid = np.linspace(0, idle.max() * 1.05, 150)
    brute = min(cost(a, b) for a in grid for b in grid if b > a)
    assert best <= brute + 1e-6


def test_coldstart_aware_fallback_without_history():
    assert ColdStartAware().window("new", 0.0, P) == Window(0.0, 60.0)


def test_policy_names_and_errors():
    assert parse_policy_name("fixed:600") == ("fixed", {"ttl_s": 600.0})
    assert isinstance(policy_for("coldstart-aware:gb_s_per_cold_s=3"), ColdStartAware)
    with pytest.raises(ValueError, match="unknown keep-alive policy 'lru'"):
        policy_for("lru")
    with pytest.raises(ValueError, match="ttl_s must be a number"):
        policy_for("fixed:ttl_s=abc")


def test_policy_set_per_function_and_global():
    ps = PolicySet(default="histogram")
    ps.set("a", "greedy-dual")
    assert isinstance(ps.get("a"), GreedyDual)
    assert isinstance(ps.get("b"), HybridHistogram)
    assert ps.get("b") is ps.get("c")  # one policy object per name
