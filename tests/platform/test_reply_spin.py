"""The agent's bounded busy-poll for a lone call's reply (issue #19): the pure decision
(`hearth.agent.spin_policy`) and its shell (`hearth.agent.spin`) on a real selector and a real
socket pair. The spin through a real node is tested in test_start_call.py."""

from __future__ import annotations

import selectors
import socket
import threading

import pytest
from hearth.agent.spin import ReplySpin, SpinSelector, install, uninstall
from hearth.agent.spin_policy import NEVER_SEEN, FunctionSpin, SpinConfig, settle, should_spin
from hearth.config import Settings
from hearth.metrics import Metrics

US = 1e-6
CFG = SpinConfig()  # cap 150 us, off after > 3 misses of 8, probes every 8 .. 128 lone calls
# the state the old rule (1.5 x the median round trip, none past the cap) got stuck in: the
# sleeping round trips (with the agent's wake-up) above the cap, so it never spun again; here
# the nearest is off with the longest probe interval, freshly reset
STUCK = FunctionSpin(on=False, probe=CFG.probe_max)


def _run(state: FunctionSpin, calls: int, reply_in, cfg: SpinConfig = CFG):
    """`calls` lone calls of a function whose reply takes `reply_in(i)` seconds: each spins
    as the policy says; returns the end state and which calls spun."""
    spun = []
    for i in range(calls):
        budget = should_spin(state, 1, cfg)
        spun.append(budget > 0)
        state = settle(state, (reply_in(i) <= budget) if budget else None, cfg)
    return state, spun


def test_a_fast_function_never_seen_spins_from_its_first_lone_call():
    assert should_spin(NEVER_SEEN, 1) == pytest.approx(150 * US)
    state, spun = _run(NEVER_SEEN, 50, lambda i: 40 * US)
    assert state.on and all(spun)


def test_a_fast_function_stuck_sleeping_ends_up_spinning():
    state, spun = _run(STUCK, CFG.probe_max + 20, lambda i: 40 * US)
    assert state.on
    first = spun.index(True)
    assert first == CFG.probe_max  # the first probe: after probe_max sleeping calls...
    assert all(spun[first:])  # ...it hit, and from then on every lone call spins


def test_a_fast_function_turned_off_by_a_bad_patch_comes_back():
    # its replies were slow for 40 calls (a loaded machine), then fast again
    state, spun = _run(NEVER_SEEN, 40, lambda i: 1e-3)
    assert not state.on
    state, spun = _run(state, 200, lambda i: 40 * US)
    assert state.on and all(spun[-50:])


def test_a_slow_function_stops_spinning_and_probes_ever_more_rarely():
    state, spun = _run(NEVER_SEEN, 2000, lambda i: 400 * US)  # longer than the cap: all miss
    assert not state.on
    assert state.probe == CFG.probe_max
    # one probe at first, then at most one per probe_max lone calls once the interval is long
    assert sum(spun) <= 1 + 2000 // CFG.probe_min
    assert sum(spun[1000:]) <= 1000 // CFG.probe_max + 1


def test_a_function_spinning_goes_off_after_more_than_max_misses_of_the_window():
    on = FunctionSpin(on=True, outcomes=(True,) * 8)
    state = on
    for _ in range(3):
        state = settle(state, False)
        assert state.on  # 3 of the last 8 missed: still on
    state = settle(state, False)
    assert not state.on and should_spin(state, 1) == 0.0  # the 4th: off
    assert state.probe == CFG.probe_min and state.slept == 0
    # only the last `window` outcomes count: old misses are forgotten
    state = on
    for outcome in [False] * 3 + [True] * 8 + [False] * 3:
        state = settle(state, outcome)
    assert state.on


def test_a_hit_while_off_turns_it_on_and_a_missed_probe_doubles_the_interval():
    off = FunctionSpin(probe=16, slept=16)
    assert should_spin(off, 1) == pytest.approx(150 * US)  # the probe is due
    assert settle(off, True) == FunctionSpin(on=True, outcomes=(True,))
    assert settle(off, False) == FunctionSpin(probe=32)
    assert settle(FunctionSpin(probe=128, slept=128), False) == FunctionSpin(probe=128)
    assert settle(off, None) == off  # a due probe not needed (reply before the loop slept)
    assert settle(FunctionSpin(probe=16, slept=3), None) == FunctionSpin(probe=16, slept=4)


@pytest.mark.parametrize("in_flight", [0, 2, 3, 64])
def test_no_spin_while_other_calls_are_in_flight(in_flight):
    for state in (NEVER_SEEN, FunctionSpin(on=True), FunctionSpin(probe=8, slept=8)):
        assert should_spin(state, in_flight) == 0.0


def test_no_spin_when_switched_off():
    for state in (NEVER_SEEN, FunctionSpin(on=True)):
        assert should_spin(state, 1, SpinConfig(cap_s=0)) == 0.0


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
        spin.sent(b"call", "f", 1)  # never seen: its first lone call probes
        assert spin.deadline > 0
        threading.Timer(0.05, b.send, (b"reply",)).start()
        ready = loop._selector.select(None)  # would block for good without the spin's poll...
        assert [k.fileobj for k, _ in ready] == [a]  # ...returns the event...
        assert spin.spinning and spin.deadline > 0  # ...while still spinning (not a miss)
        spin.replied(b"call")
        assert (_count(m, "hit"), _count(m, "miss")) == (1, 0)
        assert m.spin_seconds._value.get() > 0
        assert spin.books["f"].on
    finally:
        uninstall(loop, spin)
        a.close()
        b.close()
    assert not isinstance(loop._selector, SpinSelector)  # the loop's own selector is back


def _call(loop: Loop, spin: ReplySpin, key: bytes, a: socket.socket, b: socket.socket, fast: bool):
    """One lone call through the real selector: its reply is readable at once (`fast`) or
    never within the budget; returns whether it spun."""
    spin.sent(key, "f", 1)
    armed = spin.deadline > 0
    if fast:
        b.send(b"r")
        assert loop._selector.select(None if armed else 0)
        a.recv(16)
    else:
        assert loop._selector.select(0.002) == []
    spin.replied(key)
    return armed


def test_the_shell_turns_a_stuck_fast_function_on_and_a_slow_one_off():
    loop = Loop()
    cfg = SpinConfig(cap_s=1e-3, probe_min=2, probe_max=4)
    spin, m = _spin(cfg, [1])
    install(loop, spin)
    a, b = socket.socketpair()
    try:
        loop._selector.register(a, selectors.EVENT_READ)
        spin.books["f"] = FunctionSpin(probe=4)  # sleeping, its next probe 4 calls away
        spun = [_call(loop, spin, b"f%d" % i, a, b, fast=True) for i in range(8)]
        assert spun == [False] * 4 + [True] * 4 and spin.books["f"].on
        assert (_count(m, "hit"), _count(m, "miss")) == (4, 0)
        spun = [_call(loop, spin, b"s%d" % i, a, b, fast=False) for i in range(12)]
        # on: 4 misses turn it off; then probes after 2 and 4 sleeping calls
        assert spun == [True] * 4 + [False] * 2 + [True] + [False] * 4 + [True]
        assert not spin.books["f"].on and _count(m, "miss") == 6
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
    spin.books["g"] = FunctionSpin(on=True)
    for i in range(50):
        spin.sent(b"c%d" % i, "f" if i % 2 else "g", 2 + i % 3)
        assert spin.deadline == 0.0
        assert loop._selector.select(0) == []
        spin.replied(b"c%d" % i)
    assert spin.books == {"g": FunctionSpin(on=True)}
    assert (_count(m, "hit"), _count(m, "miss")) == (0, 0)
