"""Generic warm pools per runtime, Fission-style.

A pool instance has the interpreter up and the common dependencies imported but no function
code; a cold start that takes one skips the process-spawn and dependency phases (the recorded
phases show it: podAllocationCost and deployDependencyCost near zero, `fromPool` true).
Pure decisions: the pool target per node, which pool instance to take, and what to refill.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hearth.controller.model import Instance, Node
from hearth.spec import FunctionSpec


@dataclass(frozen=True)
class PoolConfig:
    min_per_node: int = 0
    max_per_node: int = 4
    headroom: float = 1.5  # multiply the Little's-law estimate by this


def pool_target(
    cold_starts_per_s: float, refill_s: float, nodes: int, cfg: PoolConfig = PoolConfig()
) -> int:
    """Idle pool instances wanted per node: the cold starts expected while one pool instance is
    being refilled (Little's law, λ × refill time), with headroom, spread over the nodes."""
    if nodes <= 0:
        return 0
    expected = cold_starts_per_s * max(refill_s, 0.0) * cfg.headroom
    per_node = math.ceil(expected / nodes - 1e-9)
    return max(cfg.min_per_node, min(cfg.max_per_node, per_node))


def idle_pool(
    instances: Iterable[Instance], runtime: str, node: str | None = None
) -> list[Instance]:
    """Generic (unspecialised) idle pool instances of `runtime`, oldest first (deterministic)."""
    out = [
        i
        for i in instances
        if i.function is None
        and i.runtime == runtime
        and i.state == "idle"
        and (node is None or i.node == node)
    ]
    return sorted(out, key=lambda i: (i.started_at, i.id))


def pool_can_serve(spec: FunctionSpec) -> bool:
    """Whether a generic pool instance can become one of `spec`'s. A pool instance exists before
    the function, so it lacks env that the kubelet sets from Secrets/ConfigMaps when it creates a
    pod (`env_value_from`), and the node agent never holds those values to hand over."""
    return not spec.env_value_from


def take_from_pool(
    instances: Sequence[Instance], spec: FunctionSpec, node: str, taken: set[str] | None = None
) -> Instance | None:
    """The pool instance a start of `spec` on `node` should specialise, or None (start from
    nothing)."""
    if not pool_can_serve(spec):
        return None
    runtime = spec.runtime
    taken = taken or set()
    for inst in idle_pool(instances, runtime, node):
        if inst.id not in taken:
            return inst
    return None


def refill(
    instances: Sequence[Instance],
    nodes: Sequence[Node],
    targets: dict[str, int],
    taken: set[str] | None = None,
) -> list[tuple[str, str]]:
    """(runtime, node) pairs to pre-start so each node holds `targets[runtime]` idle pool
    instances (starting ones count, instances being taken now do not)."""
    taken = taken or set()
    out = []
    for runtime, target in sorted(targets.items()):
        for n in nodes:
            have = sum(
                1
                for i in instances
                if i.function is None
                and i.runtime == runtime
                and i.node == n.name
                and i.state in ("idle", "starting")
                and i.id not in taken
            )
            out.extend([(runtime, n.name)] * max(target - have, 0))
    return out
