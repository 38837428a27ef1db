"""The agent's bounded busy-poll for a lone call's reply (issue #19): the pure decision
(`hearth.agent.spin_policy`) and its shell (`hearth.agent.spin`) on a real selector and a real
socket pair. The spin through a real node is tested in test_start_call.py."""

from __future__ import annotations

import selectors
import socket
import threading

import pytest
from hearth.agent.spin import ReplySpin, SpinSelector, install, uninstall
from hearth.agent.spin_policy import SpinConfig, SpinObservation, backoff_after, should_spin
from hearth.config import Settings
from hearth.metrics import Metrics

US = 1e-6
FAST = [60 * US, 70 * US, 80 * US, 90 * US]  # median 75 us


def test_a_lone_call_of_a_fast_function_spins_for_a_multiple_of_its_median():
    assert should_spin(SpinObservation(1, FAST)) == pytest.approx(1.5 * 75 * US)
    cfg = SpinConfig(factor=1.8)  # one slow outlier moves the median, not the budget's scale
    assert should_spin(SpinObservation(1, FAST + [1.0]), cfg) == pytest.approx(1.8 * 80 * US)


def test_the_budget_never_passes_the_cap():
    near = [140 * US] * 5  # 1.5 x 140 = 210 us > the 150 us cap
    assert should_spin(SpinObservation(1, near)) == pytest.approx(150 * US)


@pytest.mark.parametrize("in_flight", [0, 2, 3, 64])
def test_no_spin_while_other_calls_are_in_flight(in_flight):
    assert should_spin(SpinObservation(in_flight, FAST)) == 0.0


def test_no_spin_without_enough_round_trips_known():
    assert should_spin(SpinObservation(1, FAST[:3])) == 0.0
    assert should_spin(SpinObservation(1, ())) == 0.0


def test_a_function_slower_than_the_cap_sleeps():
    assert should_spin(SpinObservation(1, [151 * US] * 8)) == 0.0
    assert should_spin(SpinObservation(1, [1e-3] * 8)) == 0.0


def test_no_spin_while_backing_off_or_when_switched_off():
    assert should_spin(SpinObservation(1, FAST, backing_off=True)) == 0.0
    assert should_spin(SpinObservation(1, FAST), SpinConfig(cap_s=0)) == 0.0


def test_back_off_once_more_than_max_misses_of_the_recent_spins_missed():
    cfg = SpinConfig(window=8, max_misses=3)
    assert not backoff_after([], cfg)
    assert not backoff_after([False] * 3, cfg)
    assert backoff_after([False] * 4, cfg)  # no need to wait for a full window
    assert not backoff_after([True, False] * 3 + [True, True], cfg)  # 3 of 8 missed
    assert backoff_after([True, False] * 4, cfg)  # 4 of 8 missed
    # only the last `window` count: old misses are forgotten
    assert not backoff_after([False] * 10 + [True] * 8, cfg)


def test_the_setting_is_checked_at_start(monkeypatch):
    monkeypatch.setenv("HEARTH_SPIN_US", "80")
    assert Settings.from_env().spin_config().cap_s == pytest.approx(80 * US)
    for bad in ("-1", "1001", "nan", "fast"):
        monkeypatch.setenv("HEARTH_SPIN_US", bad)
        with pytest.raises(ValueError, match="HEARTH_SPIN_US"):
            Settings.from_env()


# -- the shell, on a real selector ---------------------------------------------------------------


class Loop:
    """What `install` needs of a selector event loop: its `_selector`."""

    def __init__(self) -> None:
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()


def _spin(cfg: SpinConfig, in_flight: list[int]) -> tuple[ReplySpin, Metrics]:
    m = Metrics()
    return ReplySpin(cfg, lambda: in_flight[0], m), m


def _count(m: Metrics, outcome: str) -> float:
    return m.spins.labels(outcome)._value.get()


def _learn(spin: ReplySpin, function: str, n: int) -> None:
    for i in range(n):  # calls whose replies come before the loop would sleep: no spin
        spin.sent(b"k%d" % i, function, 1)
        spin.replied(b"k%d" % i)


def test_a_spin_returns_the_reply_as_soon_as_it_is_readable_and_counts_a_hit():
    loop = Loop()
    spin, m = _spin(SpinConfig(cap_s=5.0, factor=1e9), [1])  # a budget of 5 s: never reached
    assert install(loop, spin)
    a, b = socket.socketpair()
    try:
        loop._selector.register(a, selectors.EVENT_READ)
        _learn(spin, "f", 4)
        spin.sent(b"call", "f", 1)
        assert spin.deadline > 0
        threading.Timer(0.05, b.send, (b"reply",)).start()
        ready = loop._selector.select(None)  # would block for good without the spin's poll...
        assert [k.fileobj for k, _ in ready] == [a]  # ...returns the event...
        assert spin.spinning and spin.deadline > 0  # ...while still spinning (not a miss)
        spin.replied(b"call")
        assert (_count(m, "hit"), _count(m, "miss")) == (1, 0)
        assert m.spin_seconds._value.get() > 0
        assert len(spin.round_trips["f"]) == 5
    finally:
        uninstall(loop, spin)
        a.close()
        b.close()
    assert not isinstance(loop._selector, SpinSelector)  # the loop's own selector is back


def test_a_spin_that_sees_nothing_ends_at_its_budget_and_repeated_misses_back_off():
    loop = Loop()
    spin, m = _spin(SpinConfig(cap_s=1e-3, factor=1e9, max_misses=3, backoff_s=60), [1])
    install(loop, spin)
    _learn(spin, "f", 4)
    for i in range(4):  # nothing ever replies: each spin runs out (then the loop sleeps)
        spin.sent(b"m%d" % i, "f", 1)
        assert spin.deadline > 0, i
        assert loop._selector.select(0.001) == []
        assert spin.deadline == 0.0
    assert (_count(m, "hit"), _count(m, "miss")) == (0, 4)
    spin.sent(b"after", "f", 1)  # the fourth miss of eight: backing off now
    assert spin.deadline == 0.0
    assert loop._selector.select(0) == [] and _count(m, "miss") == 4


def test_no_spin_when_the_loop_has_callbacks_ready_or_another_call_joined():
    loop = Loop()
    in_flight = [1]
    spin, m = _spin(SpinConfig(cap_s=5.0, factor=1e9), in_flight)
    install(loop, spin)
    _learn(spin, "f", 4)
    spin.sent(b"call", "f", 1)
    assert loop._selector.select(0) == []  # timeout 0: callbacks ready, no spin
    in_flight[0] = 2  # a chained call joined after the send
    assert loop._selector.select(0.001) == []  # returns at once (a 5 s spin otherwise)
    assert (_count(m, "hit"), _count(m, "miss")) == (0, 0)
    spin.sent(b"second", "f", 2)  # a second call sent: the first is no longer watched
    assert spin.deadline == 0.0 and spin.key is None
