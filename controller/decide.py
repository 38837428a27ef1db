"""The decision core: one entry, `DecisionCore.decide(observation) -> list[Action]`.

Combines the autoscaler (how many), placement (where), warm pools (start from a pool
instance when one is on the chosen node; refill pools) and keep-alive policies (which idle
instances stop, which are kept, when a function is pre-warmed). No I/O: backends execute the
actions. State (autoscaler windows, keep-alive histories) lives in the DecisionCore object and
changes only through `decide`, so a replayed sequence of observations gives the same actions.

One core serves the Kubernetes controller and every node agent (hearth.agent.lifecycle ticks it),
so both stop idle instances by the same rule (`autoscaler.keep_floor`): an idle instance stops
when its keep-alive window is over and the function keeps the autoscaler's floor (what the load
needs, at most halving per decision, min_instances), where with nothing in flight or queued the
last instance is the keep-alive policy's call alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from hearth.controller.autoscaler import Autoscaler, AutoscalerConfig
from hearth.controller.keepalive import KeepAlivePolicy, PolicySet, Profile
from hearth.controller.model import (
    Action,
    Buffer,
    Instance,
    Keep,
    Observation,
    Prewarm,
    Start,
    Stop,
)
from hearth.controller.placement import Cluster, Request, Weights
from hearth.controller.pools import refill, take_from_pool
from hearth.spec import FunctionSpec


class DecisionCore:
    def __init__(
        self,
        policies: PolicySet | None = None,
        weights: Weights | None = None,
        stable_window_s: float = 60.0,
        panic_window_s: float = 6.0,
        scale_to_zero_grace_s: float = 30.0,
        default_cold_start_s: float = 1.0,
    ) -> None:
        self.policies = policies or PolicySet()
        self.weights = weights
        self.autoscaler = Autoscaler()
        self.windows = (stable_window_s, panic_window_s, scale_to_zero_grace_s)
        self.default_cold_start_s = default_cold_start_s
        self._seq = 0
        self._seen_arrival: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}
        self._prewarm: dict[str, tuple[float, float]] = {}
        # a pre-warmed function: until when its instance waits for the predicted arrival (its
        # policy would otherwise see a fresh idle instance and unload it again at once)
        self._prewarmed: dict[str, float] = {}

    def _id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq:06d}"

    def config_for(self, spec: FunctionSpec) -> AutoscalerConfig:
        stable, panic, grace = self.windows
        return AutoscalerConfig(
            target_concurrency=float(spec.concurrency),
            stable_window_s=stable,
            panic_window_s=panic,
            scale_to_zero_grace_s=grace,
            min_instances=spec.min_instances,
            max_instances=spec.max_instances,
        )

    def policy_name(self, spec: FunctionSpec) -> str:
        """The spec's policy if the user set it explicitly, else the global default."""
        if "policy" in spec.keep_alive.model_fields_set:
            return spec.keep_alive.policy
        return self.policies.default

    def decide(self, obs: Observation) -> list[Action]:
        actions: list[Action] = []
        cluster = Cluster.from_observation(obs.nodes, obs.instances, obs.functions, self.weights)
        taken: set[str] = set()  # pool instances already given to a Start
        for fn in sorted(obs.functions):
            actions += self._decide_function(fn, obs, cluster, taken)
        # refill the generic pools
        if obs.pool_targets:
            for runtime, node in refill(obs.instances, obs.nodes, obs.pool_targets, taken):
                actions.append(Prewarm(runtime, node, self._id(f"pool-{runtime.replace('.', '')}")))
        return actions

    def _decide_function(
        self, fn: str, obs: Observation, cluster: Cluster, taken: set[str]
    ) -> list[Action]:
        """One function's actions: how many to start (autoscaler, or a due pre-warm), where
        (placement, warm pools), and which idle instances stop or are kept (keep-alive)."""
        now = obs.now
        actions: list[Action] = []
        spec = obs.functions[fn]
        mine = [i for i in obs.instances if i.function == fn and i.state != "stopping"]
        load = obs.loads.get(fn)
        inflight = load.inflight if load else sum(i.inflight for i in mine)
        # held requests and stream entries no consumer has taken yet: work waiting for an
        # instance (stream lag scales like queued requests, KEDA's lag threshold = target)
        queued = (load.queued + load.stream_lag) if load else 0
        cold_s = load.cold_start_s if load and load.cold_start_s else self.default_cold_start_s
        profile = Profile(spec.resources.memory_mb, cold_s, spec.keep_alive.ttl_s)
        pname = self.policy_name(spec)
        self.policies.set(fn, pname)
        policy = self.policies.get(fn)
        self._record_arrivals(fn, load.arrivals if load else (), policy, profile)
        busy = inflight > 0 or queued > 0 or any(i.state == "busy" for i in mine)
        if not busy and fn not in self._idle_since and mine:
            self._idle_since[fn] = max(i.last_used_at for i in mine)

        # how many
        ready = sum(1 for i in mine if i.state in ("idle", "busy"))
        self.autoscaler.observe(fn, now, inflight + queued)
        d = self.autoscaler.decide(
            fn,
            now,
            ready,
            len(mine),
            self.config_for(spec),
            queued=queued,
            work=inflight + queued,
        )
        if d.buffer:
            actions.append(Buffer(fn, d.buffer))
        start_n, reason = self._with_prewarm(fn, now, d.start, bool(mine))

        # where
        req = Request.for_spec(spec)
        for _ in range(start_n):
            i = cluster.best(req)
            if i is None:
                break  # no capacity: the backend reports Pending/unschedulable
            node = cluster.names[i]
            pool_inst = take_from_pool(obs.instances, spec, node, taken)
            if pool_inst is not None:
                taken.add(pool_inst.id)
            cluster.commit(i, req, from_pool=pool_inst is not None)
            actions.append(
                Start(fn, node, self._id(fn), pool_inst.id if pool_inst else None, reason)
            )
        actions += self._stop_or_keep(fn, now, mine, len(mine) - d.floor, policy, pname, profile)
        return actions

    def _record_arrivals(
        self, fn: str, arrivals: Iterable[float], policy: KeepAlivePolicy, profile: Profile
    ) -> None:
        """Feed the keep-alive policy the arrivals it has not seen (idle time = since the
        function went idle)."""
        last_seen = self._seen_arrival.get(fn, float("-inf"))
        for t in sorted(arrivals):
            if t <= last_seen:
                continue
            since = self._idle_since.pop(fn, None)
            policy.record(fn, t, None if since is None or t < since else t - since, profile)
            self._seen_arrival[fn] = t
            self._prewarmed.pop(fn, None)  # the arrival came: the policy decides again

    def _with_prewarm(self, fn: str, now: float, start_n: int, has: bool) -> tuple[int, str]:
        """Instances to start and why: one pre-warm when the function's keep-alive window says
        it is due and nothing else starts or runs; else the autoscaler's count."""
        pw = self._prewarm.get(fn)
        if pw is not None and not has and start_n == 0 and pw[0] <= now < pw[1]:
            start_n = 1
            reason = "prewarm"
            self._prewarmed[fn] = pw[1]
            del self._prewarm[fn]
        else:
            reason = "scale-up"
        if has:
            self._prewarm.pop(fn, None)
        return start_n, reason

    def _stop_or_keep(
        self,
        fn: str,
        now: float,
        mine: list[Instance],
        excess: int,
        policy: KeepAlivePolicy,
        pname: str,
        profile: Profile,
    ) -> list[Action]:
        """Which idle instances stop (never a busy one: no work is killed on scale-down): those
        whose keep-alive window is over, at most ``excess`` (above the autoscaler's floor,
        keep_floor); the others are kept until their window ends."""
        actions: list[Action] = []
        idle = sorted(
            (i for i in mine if i.state == "idle" and i.inflight == 0),
            key=lambda i: (i.last_used_at, i.id),
        )
        held = self._prewarmed.get(fn)
        for inst in idle:
            if held is not None:  # pre-warmed: kept for the arrival, or stopped once its
                if now < held:  # window is over (the next arrival records a new idle time)
                    actions.append(Keep(inst.id, held, pname))
                    continue
                if excess > 0:
                    actions.append(Stop(inst.id, f"{pname}: pre-warm window over"))
                    excess -= 1
                    self._prewarmed.pop(fn, None)
                    continue
            w = policy.window(fn, inst.last_used_at, profile)
            until = inst.last_used_at + w.keep_s
            if excess > 0 and (w.unload_now or now >= until):
                why = "keep-alive expired" if now >= until else "unload until pre-warm"
                actions.append(Stop(inst.id, f"{pname}: {why}"))
                if w.prewarm_s > 0 and now < until:
                    self._prewarm[fn] = (inst.last_used_at + w.prewarm_s, until)
                excess -= 1
            else:
                actions.append(Keep(inst.id, until, pname))
        return actions


def decide(observation: Observation, core: DecisionCore | None = None) -> list[Action]:
    """Single-shot convenience; pass a long-lived `core` to keep autoscaler/keep-alive history."""
    return (core or DecisionCore()).decide(observation)


__all__ = ["DecisionCore", "decide", "Instance"]
