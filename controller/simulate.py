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
    # merged arrival stream (time, fn)
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
    all_t, all_f = all_t[order], all_f[order]

    heap: list[tuple[float, int, int, int, _Inst]] = []
    seq = 0
    idle: dict[str, list[_Inst]] = {f: [] for f in fns}  # loaded idle instances (stack)
    pending: dict[str, list[_Inst]] = {f: [] for f in fns}
    loaded: dict[int, _Inst] = {}  # every idle loaded instance, for eviction
    busy: dict[str, int] = dict.fromkeys(fns, 0)
    last_end: dict[str, float] = {}
    stats = {
        f: {
            "invocations": 0,
            "cold_starts": 0,
            "cold_start_seconds": 0.0,
            "idle_memory_gb_s": 0.0,
            "prewarms": 0,
        }
        for f in fns
    }
    resident = 0.0
    prewarms = evictions = over = 0
    next_id = 0

    def push(t: float, kind: int, inst: _Inst) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, kind, seq, inst.ver, inst))

    def charge(inst: _Inst, until: float) -> None:
        stats[inst.fn]["idle_memory_gb_s"] += inst.mem / 1024.0 * max(until - inst.since, 0.0)

    def make_room(need: float, now: float, exclude: _Inst | None = None) -> bool:
        nonlocal resident, evictions
        if capacity_mb is None or resident + need <= capacity_mb:
            return True
        cands = [
            Candidate(str(i.id), i.fn, i.since, i.mem) for i in loaded.values() if i is not exclude
        ]
        for c in policy.eviction_order(cands, now):
            if resident + need <= capacity_mb:
                break
            inst = loaded.pop(int(c.instance_id))
            charge(inst, now)
            idle[inst.fn].remove(inst)
            inst.ver += 1
            inst.state = "gone"
            resident -= inst.mem
            evictions += 1
            policy.evicted(inst.fn, now)
        return resident + need <= capacity_mb

    def process(inst_t: float, kind: int, inst: _Inst) -> None:
        nonlocal resident, prewarms
        fn = inst.fn
        if kind == _FINISH:
            busy[fn] -= 1
            last_end[fn] = max(last_end.get(fn, 0.0), inst_t)
            w = policy.window(fn, inst_t, profiles[fn])
            keep = w.keep_s
            if keep <= 0 or keep <= w.prewarm_s:
                inst.state = "gone"
                resident -= inst.mem
                return
            if w.prewarm_s > 0:
                inst.state = "pending"
                resident -= inst.mem
                pending[fn].append(inst)
                push(inst_t + w.prewarm_s, _WARM, inst)
            else:
                inst.state = "idle"
                inst.since = inst_t
                idle[fn].append(inst)
                loaded[inst.id] = inst
            if math.isfinite(keep):
                push(inst_t + keep, _EXPIRE, inst)
        elif kind == _WARM:
            if inst.state != "pending":
                return
            pending[fn].remove(inst)
            if not make_room(inst.mem, inst_t):
                inst.state = "gone"
                inst.ver += 1
                return
            inst.state = "idle"
            inst.since = inst_t
            resident += inst.mem
            idle[fn].append(inst)
            loaded[inst.id] = inst
            stats[fn]["prewarms"] += 1
            prewarms += 1
        elif kind == _EXPIRE:
            if inst.state == "idle":
                charge(inst, inst_t)
                idle[fn].remove(inst)
                del loaded[inst.id]
                resident -= inst.mem
            elif inst.state == "pending":
                pending[fn].remove(inst)
            inst.state = "gone"

    for t, fi in zip(all_t.tolist(), all_f.tolist(), strict=True):
        while heap and heap[0][0] <= t:
            et, kind, _, ver, inst = heapq.heappop(heap)
            if ver == inst.ver:
                process(et, kind, inst)
        fn = fns[fi]
        prof = profiles[fn]
        st = stats[fn]
        st["invocations"] += 1
        idle_s = None if busy[fn] > 0 or fn not in last_end else t - last_end[fn]
        policy.record(fn, t, idle_s, prof)
        stack = idle[fn]
        if stack:
            inst = stack.pop()
            del loaded[inst.id]
            charge(inst, t)
            inst.ver += 1  # cancels its pending expiry
            inst.state = "busy"
            busy[fn] += 1
            push(t + execs[fn], _FINISH, inst)
            continue
        st["cold_starts"] += 1
        st["cold_start_seconds"] += prof.cold_start_s
        if pending[fn]:  # the pre-warm came too late: this cold start replaces it
            p = pending[fn].pop(0)
            p.ver += 1
            p.state = "gone"
        if not make_room(prof.memory_mb, t):
            over += 1
        inst = _Inst(next_id, fn, prof.memory_mb)
        next_id += 1
        resident += inst.mem
        busy[fn] += 1
        push(t + prof.cold_start_s + execs[fn], _FINISH, inst)

    # drain: account idle memory up to each instance's expiry, or the end of the trace
    end = float(all_t[-1]) if len(all_t) else 0.0
    while heap:
        et, kind, _, ver, inst = heapq.heappop(heap)
        if ver == inst.ver and et <= end:
            process(et, kind, inst)
    for f in fns:
        for inst in idle[f]:
            charge(inst, max(end, inst.since))

    inv = int(sum(s["invocations"] for s in stats.values()))
    cold = int(sum(s["cold_starts"] for s in stats.values()))
    return PolicyResult(
        policy=label or policy.name,
        invocations=inv,
        cold_starts=cold,
        cold_start_pct=100.0 * cold / inv if inv else 0.0,
        idle_memory_gb_s=float(sum(s["idle_memory_gb_s"] for s in stats.values())),
        per_function=stats,
        prewarms=prewarms,
        evictions=evictions,
        over_capacity=over,
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
