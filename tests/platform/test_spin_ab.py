"""The spin A/B harness's pure parts (benchmarks/spin_ab.py): the alternating order and the
summary of its rounds."""

from __future__ import annotations

from benchmark_module import load_benchmark

ab = load_benchmark("spin_ab")


def test_the_order_alternates_round_by_round():
    assert [ab.order(k) for k in range(4)] == [("on", "off"), ("off", "on")] * 2


def test_the_summary_counts_the_rounds_each_way():
    rounds = {
        "on": {"serial": [0.3, 0.2, 0.4], "open": [0.5, 0.5, 0.5], "closed": [900, 1100, 1000]},
        "off": {"serial": [0.2, 0.4, 0.2], "open": [0.5, 0.4, 0.6], "closed": [1000, 1000, 1000]},
    }
    s = ab.summary(rounds)
    assert (s["serial"]["on"], s["serial"]["off"]) == (0.3, 0.2)
    assert s["serial"]["on_better_rounds"] == 1  # lower latency wins
    assert s["serial"]["ratio_median"] == 1.5  # (1.5, 0.5, 2.0)
    assert s["open"]["on_better_rounds"] == 1  # a tie is not a win
    assert s["closed"]["on_better_rounds"] == 1  # higher throughput wins
    assert s["closed"]["ratio_median"] == 1.0
