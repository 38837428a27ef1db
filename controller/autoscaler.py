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
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


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


@dataclass
class _State:
    samples: deque[tuple[float, float]] = field(default_factory=deque)
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
        if concurrency > 0:
            s.nonzero_at = now

    def _avg(self, s: _State, now: float, window: float) -> float:
        vals = [c for t, c in s.samples if t > now - window]
        return sum(vals) / len(vals) if vals else 0.0

    def decide(
        self,
        function: str,
        now: float,
        ready: int,
        current: int,
        cfg: AutoscalerConfig,
        queued: int = 0,
    ) -> ScaleDecision:
        """`ready`: instances able to serve; `current`: ready + starting (what exists)."""
        s = self._s.setdefault(function, _State())
        while s.samples and s.samples[0][0] <= now - cfg.stable_window_s:
            s.samples.popleft()
        target = max(cfg.target_concurrency * cfg.target_utilization, 1e-9)
        stable = self._avg(s, now, cfg.stable_window_s)
        panic_avg = self._avg(s, now, cfg.panic_window_s)
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
        return ScaleDecision(
            desired, in_panic, buffer, max(desired - current, 0), stable, panic_avg
        )
