"""Offline keep-alive simulator: replay per-function arrival times against each policy.

The only simulator in the project (`hearth coldstarts simulate` calls `simulate`). Event driven:
each arrival finds an idle loaded instance of its function (warm) or starts one (cold: busy for
cold_start_s + exec_s). When an instance goes idle the policy's window says when it is released
(and, if prewarm_s > 0, unloaded now and loaded again at idle + prewarm_s). Idle memory-time is
memory held by loaded, idle instances (pre-warmed ones included). With `capacity_mb` set, a cold
start or pre-warm that does not fit evicts idle instances in the policy's eviction order
(busy instances are never evicted; a cold start that still does not fit runs anyway and is
counted in `over_capacity`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
from hearth.controller.keepalive import Candidate, KeepAlivePolicy, Profile, policy_for


@dataclass
class PolicyResult:
    policy: str
    invocations: int
    cold_starts: int
    cold_start_pct: float
    idle_memory_gb_s: float
    per_function: dict[str, dict[str, float]] = field(default_factory=dict)
    prewarms: int = 0
    evictions: int = 0
    over_capacity: int = 0
    cold_start_seconds: float = 0.0  # user-visible cold-start latency summed over cold starts

    def row(self) -> dict[str, float | str | int]:
        return {
            "policy": self.policy,
            "invocations": self.invocations,
            "cold_starts": self.cold_starts,
            "cold_start_pct": round(self.cold_start_pct, 3),
            "idle_memory_gb_s": round(self.idle_memory_gb_s, 1),
            "prewarms": self.prewarms,
            "evictions": self.evictions,
            "cold_start_seconds": round(self.cold_start_seconds, 1),
        }


_FINISH, _WARM, _EXPIRE = 0, 1, 2


class _Inst:
    __slots__ = ("id", "fn", "mem", "state", "since", "ver")

    def __init__(self, iid: int, fn: str, mem: float) -> None:
        self.id, self.fn, self.mem = iid, fn, mem
        self.state = "busy"  # busy | idle (loaded) | pending (unloaded, waiting for pre-warm)
        self.since = 0.0
        self.ver = 0


def _per_fn(value: float | dict[str, float], fn: str, what: str) -> float:
    if isinstance(value, dict):
        if fn not in value:
            raise ValueError(f"{what}: no value for function {fn!r}")
        return float(value[fn])
    return float(value)


def simulate_policy(
    arrivals: dict[str, np.ndarray],
    policy: KeepAlivePolicy,
    memory_mb: float | dict[str, float] = 256,
    cold_start_s: float | dict[str, float] = 1.0,
    exec_s: float | dict[str, float] = 0.1,
    ttl_s: float = 60.0,
    capacity_mb: float | None = None,
    label: str | None = None,
) -> PolicyResult:
    profiles = {
        fn: Profile(
            _per_fn(memory_mb, fn, "memory_mb"), _per_fn(cold_start_s, fn, "cold_start_s"), ttl_s
        )
        for fn in arrivals
    }
    execs = {fn: _per_fn(exec_s, fn, "exec_s") for fn in arrivals}
    fns, all_t, all_f = _merged(arrivals)
    sim = _Sim(fns, policy, profiles, execs, capacity_mb)
    for t, fi in zip(all_t.tolist(), all_f.tolist(), strict=True):
        sim.run_until(t)
        sim.arrive(t, fns[fi])
    sim.drain(float(all_t[-1]) if len(all_t) else 0.0)
    return sim.result(label or policy.name)


def _merged(arrivals: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The functions (sorted) and one arrival stream: times, and each one's function index."""
    fns = sorted(arrivals)
    times = [np.asarray(arrivals[f], dtype=np.float64) for f in fns]
    for f, t in zip(fns, times, strict=True):
        if t.ndim != 1:
            raise ValueError(f"arrivals[{f!r}] must be a 1-D array of times")
        if len(t) > 1 and np.any(np.diff(t) < 0):
            raise ValueError(f"arrivals[{f!r}] must be sorted")
    all_t = np.concatenate(times) if times else np.zeros(0)
    all_f = (
        np.concatenate([np.full(len(t), i, dtype=np.int32) for i, t in enumerate(times)])
        if times
        else np.zeros(0, np.int32)
    )
    order = np.argsort(all_t, kind="stable")
    return fns, all_t[order], all_f[order]


class _Sim:
    """The simulation's state: instances by state, the event heap, memory held, counters."""

    def __init__(
        self,
        fns: list[str],
        policy: KeepAlivePolicy,
        profiles: dict[str, Profile],
        execs: dict[str, float],
        capacity_mb: float | None,
    ) -> None:
        self.policy, self.profiles, self.execs, self.capacity_mb = (
            policy,
            profiles,
            execs,
            capacity_mb,
        )
        self.heap: list[tuple[float, int, int, int, _Inst]] = []
        self.seq = 0
        self.idle: dict[str, list[_Inst]] = {f: [] for f in fns}  # loaded idle instances (stack)
        self.pending: dict[str, list[_Inst]] = {f: [] for f in fns}
        self.loaded: dict[int, _Inst] = {}  # every idle loaded instance, for eviction
        self.busy: dict[str, int] = dict.fromkeys(fns, 0)
        self.last_end: dict[str, float] = {}
        self.stats = {
            f: {
                "invocations": 0,
                "cold_starts": 0,
                "cold_start_seconds": 0.0,
                "idle_memory_gb_s": 0.0,
                "prewarms": 0,
            }
            for f in fns
        }
        self.resident = 0.0
        self.prewarms = self.evictions = self.over = 0
        self.next_id = 0

    def push(self, t: float, kind: int, inst: _Inst) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, inst.ver, inst))

    def charge(self, inst: _Inst, until: float) -> None:
        self.stats[inst.fn]["idle_memory_gb_s"] += inst.mem / 1024.0 * max(until - inst.since, 0.0)

    def make_room(self, need: float, now: float, exclude: _Inst | None = None) -> bool:
        """Evict idle instances in the policy's order until ``need`` MB fit; False if they
        still do not."""
        capacity_mb = self.capacity_mb
        if capacity_mb is None or self.resident + need <= capacity_mb:
            return True
        cands = [
            Candidate(str(i.id), i.fn, i.since, i.mem)
            for i in self.loaded.values()
            if i is not exclude
        ]
        for c in self.policy.eviction_order(cands, now):
            if self.resident + need <= capacity_mb:
                break
            inst = self.loaded.pop(int(c.instance_id))
            self.charge(inst, now)
            self.idle[inst.fn].remove(inst)
            inst.ver += 1
            inst.state = "gone"
            self.resident -= inst.mem
            self.evictions += 1
            self.policy.evicted(inst.fn, now)
        return self.resident + need <= capacity_mb

    def run_until(self, t: float) -> None:
        """Process the events due at or before ``t`` (stale ones are skipped)."""
        heap = self.heap
        while heap and heap[0][0] <= t:
            et, kind, _, ver, inst = heapq.heappop(heap)
            if ver == inst.ver:
                self.process(et, kind, inst)

    def process(self, inst_t: float, kind: int, inst: _Inst) -> None:
        if kind == _FINISH:
            self.finished(inst_t, inst)
        elif kind == _WARM:
            self.prewarmed(inst_t, inst)
        elif kind == _EXPIRE:
            self.expired(inst_t, inst)

    def finished(self, inst_t: float, inst: _Inst) -> None:
        """``inst`` went idle: the policy's window says whether it stays loaded, is unloaded
        until a pre-warm, or goes; its expiry is scheduled."""
        fn = inst.fn
        self.busy[fn] -= 1
        self.last_end[fn] = max(self.last_end.get(fn, 0.0), inst_t)
        w = self.policy.window(fn, inst_t, self.profiles[fn])
        keep = w.keep_s
        if keep <= 0 or keep <= w.prewarm_s:
            inst.state = "gone"
            self.resident -= inst.mem
            return
        if w.prewarm_s > 0:
            inst.state = "pending"
            self.resident -= inst.mem
            self.pending[fn].append(inst)
            self.push(inst_t + w.prewarm_s, _WARM, inst)
        else:
            inst.state = "idle"
            inst.since = inst_t
            self.idle[fn].append(inst)
            self.loaded[inst.id] = inst
        if math.isfinite(keep):
            self.push(inst_t + keep, _EXPIRE, inst)

    def prewarmed(self, inst_t: float, inst: _Inst) -> None:
        """A pending instance is loaded again, if memory allows."""
        if inst.state != "pending":
            return
        fn = inst.fn
        self.pending[fn].remove(inst)
        if not self.make_room(inst.mem, inst_t):
            inst.state = "gone"
            inst.ver += 1
            return
        inst.state = "idle"
        inst.since = inst_t
        self.resident += inst.mem
        self.idle[fn].append(inst)
        self.loaded[inst.id] = inst
        self.stats[fn]["prewarms"] += 1
        self.prewarms += 1

    def expired(self, inst_t: float, inst: _Inst) -> None:
        fn = inst.fn
        if inst.state == "idle":
            self.charge(inst, inst_t)
            self.idle[fn].remove(inst)
            del self.loaded[inst.id]
            self.resident -= inst.mem
        elif inst.state == "pending":
            self.pending[fn].remove(inst)
        inst.state = "gone"

    def arrive(self, t: float, fn: str) -> None:
        """An invocation of ``fn`` at ``t``: an idle instance serves it (warm), else one starts."""
        prof = self.profiles[fn]
        st = self.stats[fn]
        st["invocations"] += 1
        idle_s = None if self.busy[fn] > 0 or fn not in self.last_end else t - self.last_end[fn]
        self.policy.record(fn, t, idle_s, prof)
        stack = self.idle[fn]
        if stack:
            inst = stack.pop()
            del self.loaded[inst.id]
            self.charge(inst, t)
            inst.ver += 1  # cancels its pending expiry
            inst.state = "busy"
            self.busy[fn] += 1
            self.push(t + self.execs[fn], _FINISH, inst)
            return
        st["cold_starts"] += 1
        st["cold_start_seconds"] += prof.cold_start_s
        if self.pending[fn]:  # the pre-warm came too late: this cold start replaces it
            p = self.pending[fn].pop(0)
            p.ver += 1
            p.state = "gone"
        if not self.make_room(prof.memory_mb, t):
            self.over += 1
        inst = _Inst(self.next_id, fn, prof.memory_mb)
        self.next_id += 1
        self.resident += inst.mem
        self.busy[fn] += 1
        self.push(t + prof.cold_start_s + self.execs[fn], _FINISH, inst)

    def drain(self, end: float) -> None:
        """Account idle memory up to each instance's expiry, or the end of the trace."""
        heap = self.heap
        while heap:
            et, kind, _, ver, inst = heapq.heappop(heap)
            if ver == inst.ver and et <= end:
                self.process(et, kind, inst)
        for stack in self.idle.values():
            for inst in stack:
                self.charge(inst, max(end, inst.since))

    def result(self, label: str) -> PolicyResult:
        stats = self.stats
        inv = int(sum(s["invocations"] for s in stats.values()))
        cold = int(sum(s["cold_starts"] for s in stats.values()))
        return PolicyResult(
            policy=label,
            invocations=inv,
            cold_starts=cold,
            cold_start_pct=100.0 * cold / inv if inv else 0.0,
            idle_memory_gb_s=float(sum(s["idle_memory_gb_s"] for s in stats.values())),
            per_function=stats,
            prewarms=self.prewarms,
            evictions=self.evictions,
            over_capacity=self.over,
            cold_start_seconds=float(sum(s["cold_start_seconds"] for s in stats.values())),
        )


def simulate(
    arrivals: dict[str, np.ndarray],
    policies: list[str],
    memory_mb: float | dict[str, float] = 256,
    cold_start_s: float | dict[str, float] = 1.0,
    exec_s: float | dict[str, float] = 0.1,
    **policy_kwargs: float,
) -> list[PolicyResult]:
    """Run each named policy ('fixed', 'fixed:600', 'histogram', 'greedy-dual',
    'coldstart-aware', 'name:key=value,...') on the same arrivals.

    Simulator options in policy_kwargs: `ttl_s` (the functions' own TTL: the fixed policy's
    window and the fallback of the others, default 60) and `capacity_mb` (memory shared by all
    instances; unlimited by default -- then greedy-dual, which only evicts under memory pressure,
    never releases anything). Other keys go to every policy constructor that accepts them.
    """
    import inspect

    opts = dict(policy_kwargs)
    ttl_s = float(opts.pop("ttl_s", 60.0))
    capacity = opts.pop("capacity_mb", None)
    results = []
    for name in policies:
        from hearth.controller.keepalive import POLICIES, parse_policy_name

        base, _ = parse_policy_name(name)
        accepted = inspect.signature(POLICIES[base]).parameters
        kw = {k: v for k, v in opts.items() if k in accepted}
        pol = policy_for(name, **kw)
        results.append(
            simulate_policy(
                arrivals,
                pol,
                memory_mb=memory_mb,
                cold_start_s=cold_start_s,
                exec_s=exec_s,
                ttl_s=ttl_s,
                capacity_mb=None if capacity is None else float(capacity),
                label=name,
            )
        )
    return results
