"""Pluggable keep-alive policies: when should an idle instance be released, and pre-warmed again?

One small interface serves both the online controller and the offline simulator:
  record(fn, now, idle_s, profile)   every invocation arrival (idle_s = time since the function
                                     last went idle, None if it was busy or never ran)
  window(fn, now, profile) -> Window when an instance goes idle at `now`: it should be loaded
                                     during [now + prewarm_s, now + keep_s] (prewarm_s = 0: stay
                                     loaded; keep_s = inf: until evicted under memory pressure)
  eviction_order(candidates, now)    which idle instances to drop first under memory pressure
  evicted(fn, now)                   notification (greedy-dual advances its clock)
Policies are deterministic and keep only per-function state, so one object serves all functions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

INF = math.inf


@dataclass(frozen=True)
class Profile:
    """What a policy may know about a function: memory held per instance, measured cold-start cost
    and the user's TTL (the fixed policy's window; the fallback window of the others)."""

    memory_mb: float = 256.0
    cold_start_s: float = 1.0
    ttl_s: float = 60.0


@dataclass(frozen=True)
class Window:
    prewarm_s: float
    keep_s: float

    @property
    def unload_now(self) -> bool:
        return self.prewarm_s > 0 or self.keep_s <= 0


@dataclass(frozen=True)
class Candidate:
    """An idle, loaded instance that could be evicted."""

    instance_id: str
    function: str
    idle_since: float
    memory_mb: float


class KeepAlivePolicy:
    name = "base"

    def record(self, function: str, now: float, idle_s: float | None, profile: Profile) -> None:
        """Observe an invocation arrival."""

    def window(self, function: str, now: float, profile: Profile) -> Window:
        raise NotImplementedError

    def eviction_order(self, candidates: Sequence[Candidate], now: float) -> list[Candidate]:
        """Default: least recently used first."""
        return sorted(candidates, key=lambda c: (c.idle_since, c.instance_id))

    def evicted(self, function: str, now: float) -> None:
        """Observe an eviction under memory pressure."""


class FixedTTL(KeepAlivePolicy):
    """Keep every idle instance for a fixed time (Huawei 60 s, OpenWhisk/AWS about 10 min)."""

    name = "fixed"

    def __init__(self, ttl_s: float | None = None) -> None:
        self.ttl_s = ttl_s  # None: each function's own profile.ttl_s

    def window(self, function: str, now: float, profile: Profile) -> Window:
        return Window(0.0, profile.ttl_s if self.ttl_s is None else float(self.ttl_s))


class HybridHistogram(KeepAlivePolicy):
    """Azure's hybrid histogram policy (Shahrad et al., ATC'20).

    Per-function idle-time histogram, 1-minute bins over 4 hours. When representative, unload
    after execution, pre-warm at the 5th percentile (minus a 10% margin) and keep alive to the
    99th percentile (plus 10%). Fallback to a fixed keep-alive (prewarm 0, keep = the histogram
    range, as in the paper) when there are too few samples, too many idle times beyond the range,
    or the bin counts' coefficient of variation is below the threshold (flat, unpredictable).
    ARIMA for out-of-range functions is not implemented (they get the fallback).
    """

    name = "histogram"

    def __init__(
        self,
        bin_s: float = 60.0,
        range_s: float = 4 * 3600.0,
        head_pct: float = 5.0,
        tail_pct: float = 99.0,
        margin: float = 0.10,
        cv_threshold: float = 2.0,
        min_samples: int = 5,
        oob_max_fraction: float = 0.5,
        fallback_ttl_s: float | None = None,
    ) -> None:
        self.bin_s = bin_s
        self.nbins = int(math.ceil(range_s / bin_s))
        self.head_pct, self.tail_pct, self.margin = head_pct, tail_pct, margin
        self.cv_threshold, self.min_samples, self.oob_max = (
            cv_threshold,
            min_samples,
            oob_max_fraction,
        )
        self.fallback = range_s if fallback_ttl_s is None else fallback_ttl_s
        self.hist: dict[str, np.ndarray] = {}
        self.oob: dict[str, int] = {}
        self._cache: dict[str, Window] = {}

    def record(self, function: str, now: float, idle_s: float | None, profile: Profile) -> None:
        if idle_s is None or idle_s < 0:
            return
        h = self.hist.get(function)
        if h is None:
            h = self.hist[function] = np.zeros(self.nbins, dtype=np.int64)
        b = int(idle_s // self.bin_s)
        if b >= self.nbins:
            self.oob[function] = self.oob.get(function, 0) + 1
        else:
            h[b] += 1
        self._cache.pop(function, None)

    def window(self, function: str, now: float, profile: Profile) -> Window:
        w = self._cache.get(function)
        if w is None:
            w = self._cache[function] = self._compute(function)
        return w

    def _compute(self, function: str) -> Window:
        fallback = Window(0.0, self.fallback)
        h = self.hist.get(function)
        if h is None:
            return fallback
        n_in = int(h.sum())
        n_oob = self.oob.get(function, 0)
        if n_in < self.min_samples or n_oob > self.oob_max * (n_in + n_oob):
            return fallback
        mean = h.mean()
        cv = float(h.std() / mean) if mean > 0 else 0.0
        if cv < self.cv_threshold:
            return fallback
        cum = np.cumsum(h)
        head_bin = int(np.searchsorted(cum, self.head_pct / 100.0 * n_in, side="left"))
        tail_bin = int(np.searchsorted(cum, self.tail_pct / 100.0 * n_in, side="left"))
        prewarm = head_bin * self.bin_s * (1.0 - self.margin)  # lower edge of the head bin
        keep = (tail_bin + 1) * self.bin_s * (1.0 + self.margin)  # upper edge of the tail bin
        return Window(prewarm, keep)


class GreedyDual(KeepAlivePolicy):
    """FaaSCache's greedy-dual keep-alive (Fuerst & Sharma, ASPLOS'21).

    Keep everything while memory allows; under pressure evict the lowest priority,
    priority = clock + frequency × cold_cost / memory, where clock advances to the priority of
    each evicted entry (so long-unused functions age out).
    """

    name = "greedy-dual"

    def __init__(self, max_keep_s: float = INF) -> None:
        self.max_keep_s = max_keep_s
        self.clock = 0.0
        self.freq: dict[str, int] = {}
        self.prio: dict[str, float] = {}

    def record(self, function: str, now: float, idle_s: float | None, profile: Profile) -> None:
        f = self.freq[function] = self.freq.get(function, 0) + 1
        self.prio[function] = self.clock + f * profile.cold_start_s / max(profile.memory_mb, 1e-9)

    def window(self, function: str, now: float, profile: Profile) -> Window:
        return Window(0.0, self.max_keep_s)

    def eviction_order(self, candidates: Sequence[Candidate], now: float) -> list[Candidate]:
        return sorted(
            candidates,
            key=lambda c: (self.prio.get(c.function, self.clock), c.idle_since, c.instance_id),
        )

    def evicted(self, function: str, now: float) -> None:
        self.clock = max(self.clock, self.prio.get(function, self.clock))
        self.freq[function] = 0  # FaaSCache resets frequency when the container leaves the cache


class ColdStartAware(KeepAlivePolicy):
    """Hearth's policy: choose each function's warm window to minimise expected cost.

    From the function's recent idle times T (exact seconds, last `history` samples) pick the
    window [a, b] (relative to going idle) minimising, per idle period,
        memory_gb × E[time loaded while idle]  +  gb_s_per_cold_s × cold_start_s × P(T ∉ [a, b])
    over candidate edges taken from the samples themselves (a ∈ {0} ∪ {T_i·(1-margin) ≥ 30 s},
    b ∈ {T_i·(1+margin)}), or no window at all. So a function with an expensive cold start or
    little memory is kept longer, a periodic function is pre-warmed just before its next arrival
    and released right after, and a function whose next arrival is unpredictable within any
    affordable window is not kept. With fewer than `min_samples` idle times it keeps
    `fallback_ttl_s` (the user's TTL if None). The one knob, `gb_s_per_cold_s`, prices a second of
    cold start in idle GB-seconds.
    """

    name = "coldstart-aware"

    def __init__(
        self,
        gb_s_per_cold_s: float = 100.0,
        history: int = 128,
        margin: float = 0.02,
        min_margin_s: float = 0.5,
        min_samples: int = 3,
        fallback_ttl_s: float | None = None,
        recompute_every: int = 4,
        min_prewarm_s: float = 30.0,
    ) -> None:
        self.price = gb_s_per_cold_s
        self.min_prewarm_s = min_prewarm_s
        self.history, self.margin, self.min_margin_s = history, margin, min_margin_s
        self.min_samples, self.fallback, self.every = min_samples, fallback_ttl_s, recompute_every
        self.samples: dict[str, deque[float]] = {}
        self._cache: dict[str, tuple[int, Window]] = {}
        self._seen: dict[str, int] = {}

    def record(self, function: str, now: float, idle_s: float | None, profile: Profile) -> None:
        if idle_s is None or idle_s < 0:
            return
        d = self.samples.get(function)
        if d is None:
            d = self.samples[function] = deque(maxlen=self.history)
        d.append(float(idle_s))
        self._seen[function] = self._seen.get(function, 0) + 1

    def window(self, function: str, now: float, profile: Profile) -> Window:
        d = self.samples.get(function)
        if d is None or len(d) < self.min_samples:
            return Window(0.0, profile.ttl_s if self.fallback is None else self.fallback)
        seen = self._seen[function]
        c = self._cache.get(function)
        if c is not None and seen - c[0] < self.every:
            return c[1]
        w = self.optimal_window(
            np.fromiter(d, dtype=np.float64), profile.memory_mb / 1024.0, profile.cold_start_s
        )
        self._cache[function] = (seen, w)
        return w

    def optimal_window(self, idle: np.ndarray, mem_gb: float, cold_s: float) -> Window:
        s = np.sort(idle)
        n = len(s)
        cold_cost = self.price * cold_s
        a = np.maximum(s - np.maximum(s * self.margin, self.min_margin_s), 0.0)
        # unloading for a few seconds saves little and risks a cold start on the next arrival
        a = np.concatenate(([0.0], a[a >= self.min_prewarm_s]))
        b = s + np.maximum(s * self.margin, self.min_margin_s)
        ia = np.searchsorted(s, a, side="left")  # first sample >= a
        jb = np.searchsorted(s, b, side="right")  # samples <= b are s[:jb]
        pre = np.concatenate(([0.0], np.cumsum(s)))
        A, B = a[:, None], b[None, :]
        IA, JB = ia[:, None], jb[None, :]
        valid = B > A
        hits = np.clip(JB - IA, 0, None)
        # loaded-idle time: samples in [a, b] hold (T - a); samples beyond b hold (b - a)
        idle_in = np.where(hits > 0, pre[np.maximum(JB, IA)] - pre[IA] - A * hits, 0.0)
        idle_out = (n - JB) * (B - A)
        cost = mem_gb * (idle_in + idle_out) + cold_cost * (n - hits)
        cost = np.where(valid, cost, np.inf) / n
        k = int(np.argmin(cost))
        i, j = divmod(k, len(b))
        if cost.flat[k] >= cold_cost:  # not keeping at all is as good
            return Window(0.0, 0.0)
        return Window(float(a[i]), float(b[j]))

    def eviction_order(self, candidates: Sequence[Candidate], now: float) -> list[Candidate]:
        """Drop first what is cheapest to lose: cold-start seconds saved per MB, discounted by how
        far the predicted next arrival (median idle time) is."""

        def value(c: Candidate) -> float:
            d = self.samples.get(c.function)
            med = float(np.median(d)) if d else 60.0
            wait = max(med - (now - c.idle_since), 1.0)
            return 1.0 / (wait * max(c.memory_mb, 1e-9))

        return sorted(candidates, key=lambda c: (value(c), c.idle_since, c.instance_id))


POLICIES: dict[str, type[KeepAlivePolicy]] = {
    "fixed": FixedTTL,
    "histogram": HybridHistogram,
    "greedy-dual": GreedyDual,
    "coldstart-aware": ColdStartAware,
}


def parse_policy_name(spec: str) -> tuple[str, dict[str, float]]:
    """'fixed', 'fixed:600' (shorthand for ttl_s) or 'name:key=value,key=value'."""
    name, _, args = spec.partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown keep-alive policy {name!r} (known: {', '.join(POLICIES)})")
    kwargs: dict[str, float] = {}
    if args:
        for part in args.split(","):
            k, eq, v = part.partition("=")
            if not eq:
                if name != "fixed":
                    raise ValueError(f"policy {spec!r}: expected key=value, got {part!r}")
                k, v = "ttl_s", k
            try:
                kwargs[k.strip()] = float(v)
            except ValueError:
                raise ValueError(
                    f"policy {spec!r}: {k.strip()} must be a number, got {v!r}"
                ) from None
    return name, kwargs


def policy_for(name: str, **kwargs: float) -> KeepAlivePolicy:
    """Build a policy by name ('fixed', 'fixed:600', 'coldstart-aware:gb_s_per_cold_s=10', ...)."""
    base, parsed = parse_policy_name(name)
    try:
        return POLICIES[base](**{**kwargs, **parsed})
    except TypeError as e:
        raise ValueError(f"policy {name!r}: {e}") from None


def parse_tuning(text: str | None) -> dict[str, str]:
    """Operator tuning of the policies' parameters, one entry per policy separated by ';':
    'histogram:bin_s=10,range_s=3600;coldstart-aware:gb_s_per_cold_s=20' -> {name: spec}.
    Every entry is built once here, so a bad name or parameter fails at start-up."""
    out: dict[str, str] = {}
    for i, part in enumerate(p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        name = part.partition(":")[0]
        try:
            policy_for(part)
        except ValueError as e:
            raise ValueError(f"keep-alive tuning entry {i + 1} ({part!r}): {e}") from None
        if name in out:
            raise ValueError(f"keep-alive tuning: policy {name!r} is tuned twice")
        out[name] = part
    return out


class PolicySet:
    """Per-function policy selection with a global default (online use): one policy object per
    policy name, shared by the functions that chose it. `tuning` maps a policy name to the
    parameters it is built with on this node (see parse_tuning)."""

    def __init__(
        self, default: str = "fixed", tuning: dict[str, str] | None = None, **kwargs: float
    ) -> None:
        self.default = default
        self.tuning = dict(tuning or {})
        self.kwargs = kwargs
        self._by_name: dict[str, KeepAlivePolicy] = {}
        self.overrides: dict[str, str] = {}

    def set(self, function: str, name: str) -> None:
        parse_policy_name(name)
        self.overrides[function] = name

    def get(self, function: str) -> KeepAlivePolicy:
        name = self.overrides.get(function, self.default)
        p = self._by_name.get(name)
        if p is None:
            built = self.tuning.get(name, name)
            p = self._by_name[name] = (
                policy_for(built, **self.kwargs) if name != "fixed" else policy_for(built)
            )
        return p
