"""Concurrency-based autoscaling in the manner of Knative's KPA, as a deterministic state machine.

Each tick the controller feeds the observed concurrency (in-flight + queued invocations) and the
number of ready instances; the autoscaler answers how many instances are wanted, whether it is
in panic mode, and -- while scaling from zero -- how many requests the activator should buffer.
  stable window (60 s): desired = ceil(mean concurrency / target)
  panic window  (6 s):  if mean concurrency over the panic window ≥ panic_threshold (200%) of
                        what the ready instances serve at target, enter panic: scale to the panic
                        estimate at once and never scale down until a full stable window passes
                        without the panic condition
  scale to zero: only after the stable average has been 0 for `scale_to_zero_grace_s`
`keep_floor` turns the desired count into the floor idle-instance stops respect (scale to zero is
the keep-alive policy's call); `admit` is the request-path rule (start, queue or reject).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class AutoscalerConfig:
    target_concurrency: float = 1.0  # per instance (spec.concurrency × target_utilization)
    target_utilization: float = 1.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_to_zero_grace_s: float = 30.0
    max_scale_down_rate: float = 2.0  # at most halve per decision (Knative default)
    min_instances: int = 0
    max_instances: int = 10


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    panic: bool
    buffer: int  # requests the activator holds while no instance is ready
    start: int  # instances to start now (desired - current, never negative)
    stable_avg: float
    panic_avg: float
    # instances an idle-instance scale-down must leave (see `keep_floor`); min_instances aside
    floor: int = 0


@dataclass
class _State:
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0  # sum of the concurrencies in `samples` (ticked often: no re-summing)
    panic_until: float | None = None
    panic_peak: int = 0
    nonzero_at: float | None = None
    last_desired: int = 0


class Autoscaler:
    def __init__(self) -> None:
        self._s: dict[str, _State] = {}

    def observe(self, function: str, now: float, concurrency: float) -> None:
        s = self._s.setdefault(function, _State())
        s.samples.append((now, float(concurrency)))
        s.total += float(concurrency)
        if concurrency > 0:
            s.nonzero_at = now

    @staticmethod
    def _recent_avg(s: _State, now: float, window: float) -> float:
        """Mean of the samples newer than `now - window` (a suffix: samples come in time order)."""
        total, n = 0.0, 0
        for t, c in reversed(s.samples):
            if t <= now - window:
                break
            total += c
            n += 1
        return total / n if n else 0.0

    def decide(
        self,
        function: str,
        now: float,
        ready: int,
        current: int,
        cfg: AutoscalerConfig,
        queued: int = 0,
        work: float | None = None,
    ) -> ScaleDecision:
        """`ready`: instances able to serve; `current`: ready + starting (what exists); `work`:
        invocations in flight or queued now (default: the newest observed sample)."""
        s = self._s.setdefault(function, _State())
        while s.samples and s.samples[0][0] <= now - cfg.stable_window_s:
            s.total -= s.samples.popleft()[1]
        if not s.samples:
            s.total = 0.0  # no drift from float subtraction survives an empty window
        target = max(cfg.target_concurrency * cfg.target_utilization, 1e-9)
        stable = s.total / len(s.samples) if s.samples else 0.0
        panic_avg = self._recent_avg(s, now, cfg.panic_window_s)
        want_stable = math.ceil(stable / target - 1e-9)
        want_panic = math.ceil(panic_avg / target - 1e-9)
        capacity = max(ready, 1) * target
        if panic_avg / capacity >= cfg.panic_threshold and want_panic > ready:
            s.panic_until = now + cfg.stable_window_s
            s.panic_peak = max(s.panic_peak, want_panic)
        in_panic = s.panic_until is not None and now < s.panic_until
        if in_panic:
            desired = max(want_panic, s.panic_peak, current)
            s.panic_peak = desired
        else:
            s.panic_until, s.panic_peak = None, 0
            desired = want_stable
            if desired < current:  # bounded scale-down rate
                desired = max(desired, math.floor(current / cfg.max_scale_down_rate))
        if work is None:
            work = s.samples[-1][1] if s.samples else 0.0
        floor = keep_floor(
            desired if in_panic else want_stable,
            0 if in_panic else math.floor(current / cfg.max_scale_down_rate),
            work,
        )
        if desired == 0 and (stable > 0 or panic_avg > 0 or queued > 0):
            desired = 1
        if desired == 0 and current > 0:
            # scale to zero only after the grace period with no traffic at all
            if s.nonzero_at is not None and now - s.nonzero_at < cfg.scale_to_zero_grace_s:
                desired = 1
        desired = max(cfg.min_instances, min(cfg.max_instances, desired))
        buffer = queued if ready == 0 and queued > 0 else 0
        if buffer and desired == 0:
            desired = max(1, min(cfg.max_instances, math.ceil(queued / target)))
        s.last_desired = desired
        floor = max(cfg.min_instances, min(cfg.max_instances, floor))
        start = max(desired - current, 0)
        if current == 0 and floor == 0 and work <= 0 and queued == 0:
            # scaled to zero by the keep-alive policy (the same rule as `keep_floor`): an average
            # of past load alone does not start it again, or every release (and every unload
            # before a pre-warm) would be undone on the next decision
            start = 0
        return ScaleDecision(desired, in_panic, buffer, start, stable, panic_avg, floor)


def keep_floor(want: int, rate_floor: int, work: float) -> int:
    """How many instances a scale-down of idle instances must leave: the one rule for stopping
    idle instances, on the node agent and on Kubernetes alike (min_instances comes on top).

    An idle instance stops when its keep-alive window is over (or its policy unloads it now to
    pre-warm later) AND the function keeps at least this many instances:
      - `want`, the instances the averaged load needs (the panic estimate in panic mode);
      - `rate_floor`, the bounded scale-down rate (at most half the instances per decision);
      - but scale to zero is the keep-alive policy's call: with no invocation in flight or
        queued (`work` = 0), a load estimate of one (any non-zero average rounds up to one)
        does not hold a last instance whose keep-alive window has ended."""
    held = want if want > 1 or work > 0 else 0
    return max(held, rate_floor)


Admission = Literal["start", "wait", "reject"]


def admit(
    live: int, starting: int, queued: int, concurrency: int, max_instances: int, queue_size: int
) -> Admission:
    """What an invocation that finds no free instance does (the node agent's activator):
    `start` one more instance (and wait for it), `wait` in the function's queue, or `reject`
    (429). From zero, start as many as the queue needs; while instances serve, one start at a
    time: on a small node several interpreters starting at once take the CPU the serving
    instances need (a cold-start storm). `queued` counts the invocations already waiting."""
    may_start = starting == 0 if live else starting * concurrency <= queued
    if live + starting < max_instances and may_start:
        return "start"
    if queued >= queue_size + starting * concurrency:
        return "reject"
    return "wait"
