"""The agent's bounded busy-poll for a lone call's reply (issue #19): the pure decision
(`hearth.agent.spin_policy`) and its shell (`hearth.agent.spin`) on a real selector and a real
socket pair. The spin through a real node is tested in test_start_call.py."""

from __future__ import annotations

import selectors
import socket
import threading

import pytest
from hearth.agent.spin import ReplySpin, SpinSelector, install, uninstall
from hearth.agent.spin_policy import (
    NEVER_SEEN,
    FunctionSpin,
    SpinConfig,
    settle,
    should_spin,
    spin_wins,
)
from hearth.config import Settings
from hearth.metrics import Metrics

US = 1e-6
CFG = SpinConfig()  # cap 150 us, 5 round trips per book, margin 5 us, every 16th call probes,
# at most 1 of the last 5 spins ran out


def _run(state: FunctionSpin, calls: int, spun_rtt, slept_rtt: float):
    """`calls` lone calls of a function whose round trip is `spun_rtt` (or `spun_rtt(i)`) when
    the agent spins (a miss past the cap) and `slept_rtt` when it sleeps; returns the end state
    and which calls spun."""
    spun = []
    for i in range(calls):
        s = should_spin(state, 1, CFG) > 0
        spun.append(s)
        rtt = (spun_rtt(i) if callable(spun_rtt) else spun_rtt) if s else slept_rtt
        state = settle(state, s, rtt, CFG, missed=s and rtt > CFG.cap_s)
    return state, spun


def _books(spun: float, slept: float) -> FunctionSpin:
    return FunctionSpin((spun,) * CFG.window, (slept,) * CFG.window)


def test_a_function_never_seen_spins_then_sleeps_to_learn_both_ways():
    assert should_spin(NEVER_SEEN, 1) == pytest.approx(150 * US)
    _, spun = _run(NEVER_SEEN, 2 * CFG.window, 40 * US, 90 * US)
    assert spun == [True] * CFG.window + [False] * CFG.window


def test_a_fast_function_spins_when_that_saves_the_wake_up():
    state, spun = _run(NEVER_SEEN, 200, 40 * US, 90 * US)
    assert spin_wins(state)
    tail = spun[50:]  # all spin but the probes of the sleeping way (1 of `probe`)
    assert tail.count(False) == pytest.approx(len(tail) / CFG.probe, abs=1)


def test_the_old_rules_stuck_state_converges_to_spinning():
    # the old rule's trap: sleeping round trips (with the agent's wake-up) over the 150 us cap,
    # so it never spun again. Here the spin's book is stale and bad (a loaded past), the sleep's
    # over the cap; the replies are fast now: the probes refresh the spin's book and it wins
    stuck = _books(spun=400 * US, slept=190 * US)
    assert not spin_wins(stuck)
    state, spun = _run(stuck, 8 * CFG.probe, 60 * US, 190 * US)
    assert spin_wins(state)
    assert spun[-2 * CFG.probe :].count(False) == 2  # the sleeping way's probes only


def test_a_slow_function_sleeps_and_spins_only_to_probe():
    # slower than the cap: a spin runs out and the call sleeps anyway (same round trip)
    state, spun = _run(NEVER_SEEN, 1000, 400 * US, 400 * US)
    assert not spin_wins(state)
    assert sum(spun[100:]) <= 900 // CFG.probe + 1  # CPU: at most cap / probe per call


def test_a_function_spinning_stops_when_the_spin_slows_its_reply():
    # a loaded machine: the spin holds the CPU the instance needs; sleeping is faster
    state, spun = _run(_books(spun=40 * US, slept=90 * US), 100, 120 * US, 90 * US)
    assert not spin_wins(state)
    assert sum(spun[20:]) <= 80 // CFG.probe + 1


def test_spins_that_run_out_back_off_though_their_median_is_fast():
    # 2 of 5 spins run out (the reply needed the CPU the spin held): a good median is not enough
    state = FunctionSpin((40 * US,) * 5, (90 * US,) * 5, 0, (False,) * 5)
    assert spin_wins(state)
    state = settle(state, True, 400 * US, CFG, missed=True)
    assert spin_wins(state)  # 1 miss of 5: still spins
    state = settle(state, True, 400 * US, CFG, missed=True)
    assert not spin_wins(state)  # 2 of 5: sleeps
    # the machine calms down: the probes' hits push the misses out of the window, spin again
    state, spun = _run(state, 6 * CFG.probe, lambda i: 40 * US, 90 * US)
    assert spin_wins(state)
    # a machine where 2 in 5 spins run out: it mostly sleeps (probes only)
    state, spun = _run(state, 400, lambda i: 400 * US if i % 5 < 2 else 40 * US, 90 * US)
    assert sum(spun[100:]) <= 300 // CFG.probe + 3


def test_a_tie_sleeps_and_the_cap_bounds_what_may_win():
    assert not spin_wins(_books(spun=80 * US, slept=84 * US))  # within the 5 us margin
    assert spin_wins(_books(spun=80 * US, slept=86 * US))
    assert not spin_wins(_books(spun=151 * US, slept=900 * US))  # a spin that runs out
    assert spin_wins(FunctionSpin((150 * US,) * 3 + (1.0,) * 2, (1.0,) * 5))  # the median


def test_settle_keeps_the_last_window_of_each_book_and_counts_to_the_probe():
    state = NEVER_SEEN
    for i in range(7):
        state = settle(state, True, i * US)
    assert state.spun == tuple(i * US for i in range(2, 7)) and state.slept == ()
    assert settle(state, None, 1.0) == state  # no evidence: nothing changes
    full = FunctionSpin(state.spun, (1.0,) * 5, since_probe=CFG.probe - 1)
    assert should_spin(full, 1) == 0.0  # spin wins, but this call probes the sleeping way
    assert settle(full, False, 0.5).since_probe == 0
    assert settle(full, False, 0.5).slept == (1.0,) * 4 + (0.5,)
    assert settle(full, True, 0.5, CFG, missed=True).missed == (True,)
    assert settle(FunctionSpin(state.spun, (1.0,) * 5, 3), True, 0.0).since_probe == 4


@pytest.mark.parametrize("in_flight", [0, 2, 3, 64])
def test_no_spin_while_other_calls_are_in_flight(in_flight):
    for state in (NEVER_SEEN, _books(40 * US, 90 * US)):
        assert should_spin(state, in_flight) == 0.0


def test_no_spin_when_switched_off():
    for state in (NEVER_SEEN, _books(40 * US, 90 * US)):
        assert should_spin(state, 1, SpinConfig(cap_s=0)) == 0.0


def test_the_spin_is_off_unless_opted_in(monkeypatch):
    monkeypatch.delenv("HEARTH_SPIN_US", raising=False)
    assert Settings.from_env().spin_config().cap_s == 0  # off: no gain shown (docs/platform.md)
    assert Settings.from_env(spin_us=150.0).spin_config().cap_s == pytest.approx(150 * US)


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


def test_a_spin_returns_the_reply_as_soon_as_it_is_readable_and_counts_a_hit():
    loop = Loop()
    spin, m = _spin(SpinConfig(cap_s=5.0), [1])  # a budget of 5 s: never reached
    assert install(loop, spin)
    a, b = socket.socketpair()
    try:
        loop._selector.register(a, selectors.EVENT_READ)
        spin.sent(b"call", "f", 1)  # never seen: its first lone calls spin
        assert spin.deadline > 0
        threading.Timer(0.05, b.send, (b"reply",)).start()
        ready = loop._selector.select(None)  # would block for good without the spin's poll...
        assert [k.fileobj for k, _ in ready] == [a]  # ...returns the event...
        assert spin.deadline > 0  # ...while still spinning (not a miss)
        spin.replied(b"call")
        assert (_count(m, "hit"), _count(m, "miss")) == (1, 0)
        assert m.spin_seconds._value.get() > 0
        (rtt,) = spin.books["f"].spun
        assert spin.books["f"].missed == (False,)
        assert 0.04 < rtt < 5.0 and spin.books["f"].slept == ()
    finally:
        uninstall(loop, spin)
        a.close()
        b.close()
    assert not isinstance(loop._selector, SpinSelector)  # the loop's own selector is back


def _call(loop: Loop, spin: ReplySpin, key: bytes, a: socket.socket, b: socket.socket) -> bool:
    """One lone call through the real selector, its reply readable 20 ms after the loop
    would sleep (a sleep's wait, or a spin's: a miss of the 5 ms cap, then a sleep); returns
    whether it spun."""
    spin.sent(key, "f", 1)
    armed = spin.deadline > 0
    threading.Timer(0.02, b.send, (b"r",)).start()
    while not loop._selector.select(1.0):
        pass
    a.recv(16)
    spin.replied(key)
    return armed


def test_the_shell_learns_both_ways_and_sleeps_when_a_spin_does_not_help():
    loop = Loop()
    cfg = SpinConfig(cap_s=5e-3, window=3, probe=4)
    spin, m = _spin(cfg, [1])
    install(loop, spin)
    a, b = socket.socketpair()
    try:
        loop._selector.register(a, selectors.EVENT_READ)
        spun = [_call(loop, spin, b"s%d" % i, a, b) for i in range(14)]
        # 3 spins and 3 sleeps to learn, then the spin's round trips are over its cap: sleep,
        # but every 4th call probes a spin
        assert spun == [True] * 3 + [False] * 6 + [True] + [False] * 3 + [True]
        assert _count(m, "miss") == 5 and _count(m, "hit") == 0
        assert min(spin.books["f"].slept) > 0.015 and min(spin.books["f"].spun) > 0.015
        assert spin.books["f"].missed == (True,) * 3  # each spin ran out
    finally:
        uninstall(loop, spin)
        a.close()
        b.close()


def test_a_reply_before_the_loop_would_sleep_is_no_evidence():
    loop = Loop()
    spin, m = _spin(SpinConfig(cap_s=5.0), [1])
    install(loop, spin)
    a, b = socket.socketpair()
    try:
        loop._selector.register(a, selectors.EVENT_READ)
        spin.sent(b"call", "f", 1)
        b.send(b"r")
        assert loop._selector.select(0)  # callbacks ready: no wait, no spin
        spin.replied(b"call")
        assert spin.books == {} and (_count(m, "hit"), _count(m, "miss")) == (0, 0)
    finally:
        uninstall(loop, spin)
        a.close()
        b.close()


def test_no_spin_when_the_loop_has_callbacks_ready_or_another_call_joined():
    loop = Loop()
    in_flight = [1]
    spin, m = _spin(SpinConfig(cap_s=5.0), in_flight)
    install(loop, spin)
    spin.sent(b"call", "f", 1)
    assert loop._selector.select(0) == []  # timeout 0: callbacks ready, no spin
    in_flight[0] = 2  # a chained call joined after the send
    assert loop._selector.select(0.001) == []  # returns at once (a 5 s spin otherwise)
    assert (_count(m, "hit"), _count(m, "miss")) == (0, 0)
    spin.replied(b"call")
    assert spin.books == {}  # not a lone call after all: nothing learnt
    spin.sent(b"first", "f", 1)
    spin.sent(b"second", "f", 2)  # a second call sent: the first is no longer watched
    assert spin.deadline == 0.0 and spin.key is None
    spin.replied(b"first")
    assert spin.books == {}


def test_concurrent_calls_leave_every_function_inert():
    loop = Loop()
    spin, m = _spin(SpinConfig(cap_s=5.0), [3])
    install(loop, spin)
    books = FunctionSpin((40 * US,) * 5, (90 * US,) * 5, 3)
    spin.books["g"] = books
    for i in range(50):
        spin.sent(b"c%d" % i, "f" if i % 2 else "g", 2 + i % 3)
        assert spin.deadline == 0.0
        assert loop._selector.select(0.0005) == []
        spin.replied(b"c%d" % i)
    assert spin.books == {"g": books}
    assert (_count(m, "hit"), _count(m, "miss")) == (0, 0)


def test_past_the_limit_the_least_recently_settled_function_is_evicted(monkeypatch):
    import hearth.agent.spin as spin_mod

    monkeypatch.setattr(spin_mod, "FUNCTIONS", 3)
    loop = Loop()
    spin, _ = _spin(SpinConfig(cap_s=5e-3), [1])
    install(loop, spin)
    a, b = socket.socketpair()
    try:
        loop._selector.register(a, selectors.EVENT_READ)

        def call(function: str) -> None:
            spin.sent(function.encode(), function, 1)
            b.send(b"r")
            spin.waited = True  # (as if the loop had reached a select that would sleep)
            loop._selector.select(1.0)
            a.recv(16)
            spin.replied(function.encode())

        for f in ("f1", "f2", "f3", "f1"):  # f1 settled again: f2 is now the oldest
            call(f)
        assert len(spin.books["f1"].spun) == 2
        call("f4")
        assert list(spin.books) == ["f3", "f1", "f4"]  # only f2 went; f1 kept its books
        assert len(spin.books["f1"].spun) == 2
    finally:
        uninstall(loop, spin)
        a.close()
        b.close()


def test_a_spin_stops_at_the_loops_next_timer_without_a_miss():
    loop = Loop()
    spin, m = _spin(SpinConfig(cap_s=1.0), [1])  # a budget far past the timer below
    install(loop, spin)
    a, b = socket.socketpair()
    try:
        loop._selector.register(a, selectors.EVENT_READ)
        spin.sent(b"call", "f", 1)
        assert loop._selector.select(0.01) == []  # a timer due in 10 ms: the spin yields to it
        assert spin.deadline > 0 and _count(m, "miss") == 0  # still armed, not a miss
        b.send(b"r")
        assert loop._selector.select(0.5)  # spinning again: the reply ends it
        spin.replied(b"call")
        assert _count(m, "hit") == 1 and spin.books["f"].missed == (False,)
    finally:
        uninstall(loop, spin)
        a.close()
        b.close()
