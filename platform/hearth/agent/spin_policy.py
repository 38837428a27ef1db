"""When the agent busy-polls for a reply instead of sleeping (issue #19): the pure decision.

Why: on a quiet node a warm call wakes the agent's process twice (the request, then the
instance's reply). Waking an idle CPU is expensive on a virtual machine (tens of µs after a
few hundred µs idle), so an agent that keeps polling for the reply for a short, bounded time
answers sooner. The same spin is harmful whenever its CPU is wanted: by the instance that must
run to reply (on a loaded or small machine they share a CPU), or by other calls.

A function is judged only by the outcomes of its calls that did spin (hit: the reply came
while polling; miss: the budget ran out first). Round trips of calls that did not spin include
the agent's own wake-up, the very cost the spin removes, so judging by them is bistable: once
a function's sleeping round trips were above the cap it never spun again, however fast its
replies. Here each function is in one of two modes (`FunctionSpin`):

- **on**: each of its lone calls spins (budget `cap_s`; a hit ends the spin at once, so the
  budget only bounds a miss). When more than `max_misses` of its last `window` spins missed
  (the reply needed a CPU the spin held, the machine is loaded, or the function is slower than
  the cap), it goes off.
- **off**: its lone calls sleep, but every `probe`-th one spins as a probe (the interval starts
  at `probe_min` and doubles after each missed probe up to `probe_max`, so a slow function
  costs at most ``cap_s / probe_max`` of CPU per call). A probe that hits turns it on.

A function starts off with its first probe due, so a fast one is on after its first lone
call. Whatever the mode, a call spins only when it is the only call in flight on the node
(calls in flight together neither spin nor change any function's books). That the event loop
has nothing else ready is the shell's check (`hearth.agent.spin`: it spins only where the
loop would otherwise sleep, and stops at any event).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SpinConfig:
    cap_s: float = 150e-6  # the longest spin (HEARTH_SPIN_US; 0: never spin)
    window: int = 8  # recent spin outcomes judged while on...
    max_misses: int = 3  # ...off when more of them than this missed
    probe_min: int = 8  # lone calls between probes while off: at first...
    probe_max: int = 128  # ...doubling after each missed probe up to this


@dataclass(frozen=True)
class FunctionSpin:
    """One function's spin books: its mode, its recent spin outcomes while on (oldest first),
    and while off the lone calls slept since the last probe and the interval between probes."""

    on: bool = False
    outcomes: tuple[bool, ...] = ()
    slept: int = 0
    probe: int = 0  # 0: a probe is due at the next lone call (a function never seen)


NEVER_SEEN = FunctionSpin()


def should_spin(state: FunctionSpin, in_flight: int, cfg: SpinConfig = SpinConfig()) -> float:
    """The spin budget in seconds for a call just sent (0.0: sleep as usual); `in_flight`
    counts the node's calls in flight, this one included."""
    if cfg.cap_s <= 0 or in_flight != 1:
        return 0.0
    if state.on or state.slept >= state.probe:
        return cfg.cap_s
    return 0.0


def settle(
    state: FunctionSpin, outcome: bool | None, cfg: SpinConfig = SpinConfig()
) -> FunctionSpin:
    """The books after a lone call: `outcome` True (it spun and the reply came while
    spinning), False (it spun until the budget ran out), None (it did not spin: none was due,
    or its reply came before the loop would have slept). Not called for calls that were not
    alone in flight."""
    if outcome is None:
        if state.on or state.slept >= state.probe:
            return state  # a spin was due but not needed: still due
        return replace(state, slept=state.slept + 1)
    if not state.on:  # a probe
        if outcome:
            return FunctionSpin(on=True, outcomes=(True,))
        return FunctionSpin(probe=min(cfg.probe_max, max(cfg.probe_min, 2 * state.probe)))
    outcomes = (*state.outcomes, outcome)[-cfg.window :]
    if outcomes.count(False) > cfg.max_misses:
        return FunctionSpin(probe=cfg.probe_min)
    return replace(state, outcomes=outcomes)
