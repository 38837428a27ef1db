"""When the agent busy-polls for a reply instead of sleeping (issue #19): the pure decision.

Why: on a quiet node a warm call wakes the agent's process twice (the request, then the
instance's reply). Waking an idle CPU is expensive on a virtual machine (tens of µs after a
few hundred µs idle), so an agent that keeps polling for the reply for a short, bounded time
answers sooner. The same spin is harmful whenever its CPU is wanted: by the instance that must
run to reply (on a loaded or small machine they share a CPU), or by other calls.

So the spin is judged by what it is for: each function's recent round trips (call sent to
reply read, for lone calls whose loop reached the point where it would sleep) are kept in two
books, those that spun and those that slept, and a lone call spins when the spun ones are
faster (`spin_wins`): their median within the cap (a spin that runs out saves nothing),
below the slept ones' median by more than `margin_s` (a tie sleeps: no CPU), and no more than
`max_misses` of them ran out before their reply (back off after misses: the reply needed the
CPU the spin held, or the machine is loaded). Every `probe`-th lone call goes the other way,
so the book not chosen stays current and the choice converges from either side. (Until 7 Dec 2026 the slept round trips alone were judged against the cap;
they include the agent's own wake-up, the cost the spin removes, so a function whose sleeping
median was over the cap never spun again however fast its replies: the decision was bistable.)
A function never seen spins for its first `window` lone calls, then sleeps for as many, then
chooses. A spin never runs past `cap_s`, so a slow function costs at most ``cap_s / probe`` of
CPU per call once it has chosen to sleep.

Whatever the books say, a call spins only when it is the only call in flight on the node, and
calls in flight together neither spin nor change any book. That the event loop has nothing
else ready is the shell's check (`hearth.agent.spin`: it spins only where the loop would
otherwise sleep, and stops at any event).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SpinConfig:
    cap_s: float = 150e-6  # the longest spin (HEARTH_SPIN_US, which is 0 by default: never spin)
    window: int = 5  # round trips kept per book (spun, slept): the median of these
    margin_s: float = 5e-6  # spinning must beat sleeping by more than this
    probe: int = 16  # every probe-th lone call goes the way not chosen
    max_misses: int = 1  # spins of the window that ran out before the reply, at most


@dataclass(frozen=True)
class FunctionSpin:
    """One function's books: recent round trips (seconds) of lone calls that spun and that
    slept, oldest first, whether each of those spins ran out before its reply (`missed`, as
    `spun`), and the lone calls since the last one that went the way not chosen."""

    spun: tuple[float, ...] = ()
    slept: tuple[float, ...] = ()
    since_probe: int = 0
    missed: tuple[bool, ...] = ()


NEVER_SEEN = FunctionSpin()


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def spin_wins(state: FunctionSpin, cfg: SpinConfig = SpinConfig()) -> bool:
    """The way chosen for this function's lone calls, probes aside: True to spin."""
    if len(state.spun) < cfg.window:
        return True  # learn what a spin gives first
    if len(state.slept) < cfg.window:
        return False
    if state.missed.count(True) > cfg.max_misses:
        return False  # back off: its spins run out (the reply needs the CPU, or is slow)
    spun = _median(state.spun)
    return spun <= cfg.cap_s and spun + cfg.margin_s < _median(state.slept)


def _full(state: FunctionSpin, cfg: SpinConfig) -> bool:
    return len(state.spun) >= cfg.window and len(state.slept) >= cfg.window


def _probing(state: FunctionSpin, cfg: SpinConfig) -> bool:
    """Whether this lone call goes the way not chosen (counted once the books are full)."""
    return _full(state, cfg) and state.since_probe >= cfg.probe - 1


def should_spin(state: FunctionSpin, in_flight: int, cfg: SpinConfig = SpinConfig()) -> float:
    """The spin budget in seconds for a call just sent (0.0: sleep as usual); `in_flight`
    counts the node's calls in flight, this one included."""
    if cfg.cap_s <= 0 or in_flight != 1:
        return 0.0
    return cfg.cap_s if spin_wins(state, cfg) != _probing(state, cfg) else 0.0


def settle(
    state: FunctionSpin,
    spun: bool | None,
    round_trip: float = 0.0,
    cfg: SpinConfig = SpinConfig(),
    missed: bool = False,
) -> FunctionSpin:
    """The books after a lone call that `should_spin` judged with `state`: `spun` True (it
    spun; `missed` if the spin ran out first; `round_trip` counts to its reply either way),
    False (it slept), None (its reply came before the loop would have slept: it says nothing
    of either way)."""
    if spun is None:
        return state
    since = state.since_probe + 1 if _full(state, cfg) and not _probing(state, cfg) else 0
    w = cfg.window
    if spun:
        rtts, misses = (*state.spun, round_trip)[-w:], (*state.missed, missed)[-w:]
        return FunctionSpin(rtts, state.slept, since, misses)
    return FunctionSpin(state.spun, (*state.slept, round_trip)[-w:], since, state.missed)
