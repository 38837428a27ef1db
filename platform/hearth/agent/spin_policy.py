"""When the agent busy-polls for a reply instead of sleeping (issue #19): the pure decision.

Why: on a quiet node a warm call wakes the agent's process twice (the request, then the
instance's reply). Waking an idle CPU is expensive on a virtual machine (tens of µs after a
few hundred µs idle), so an agent that keeps polling for the reply for a short, bounded time
answers sooner. The same spin is harmful whenever its CPU is wanted: by the instance that must
run to reply (on a loaded or small machine they share a CPU), or by other calls. So the agent
spins only when all of this holds (`should_spin`):

- the call just sent is the only call in flight on the node (never while others are);
- the function's recent reply round trips are known and short: the budget is
  `factor` × their median, and a function whose median exceeds the hard cap gets no spin (a
  sleep is cheaper than spinning past the cap);
- the node is not backing off: when several of the recent spins ended without the reply
  (`backoff_after`), spinning stops for `backoff_s` (the reply needed a CPU the spin held, or
  the machine is loaded; both show as misses).

That the event loop has nothing else ready is the shell's check (`hearth.agent.spin`: it
spins only where the loop would otherwise sleep, and stops at any event).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SpinConfig:
    cap_s: float = 150e-6  # hard cap on one spin (HEARTH_SPIN_US; 0: never spin)
    factor: float = 1.5  # budget = factor x the median recent round trip
    min_samples: int = 4  # round trips known before a function's calls spin
    window: int = 8  # recent spin outcomes judged by `backoff_after`...
    max_misses: int = 3  # ...back off when more of them than this ended without the reply
    backoff_s: float = 1.0  # and stay off this long (then try again with a clean slate)


@dataclass(frozen=True)
class SpinObservation:
    """What one decision sees: the node's calls in flight (this one included), the recent
    reply round trips of the function called (seconds), and whether it is backing off."""

    in_flight: int
    round_trips: Sequence[float]
    backing_off: bool = False


def should_spin(obs: SpinObservation, cfg: SpinConfig = SpinConfig()) -> float:
    """The spin budget in seconds for a call just sent (0.0: sleep as usual)."""
    if cfg.cap_s <= 0 or obs.backing_off or obs.in_flight != 1:
        return 0.0
    if len(obs.round_trips) < cfg.min_samples:
        return 0.0
    rtts = sorted(obs.round_trips)
    mid = len(rtts) // 2
    median = rtts[mid] if len(rtts) % 2 else (rtts[mid - 1] + rtts[mid]) / 2
    if median > cfg.cap_s:
        return 0.0
    return min(cfg.cap_s, cfg.factor * median)


def backoff_after(outcomes: Sequence[bool], cfg: SpinConfig = SpinConfig()) -> bool:
    """Whether to stop spinning, given the recent spins' outcomes, oldest first (True: the
    reply came while spinning): more than `max_misses` misses among the last `window`."""
    recent = list(outcomes)[-cfg.window :]
    return recent.count(False) > cfg.max_misses
