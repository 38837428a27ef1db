"""Observations the controller sees and actions it returns.

Plain dataclasses, no I/O: the decision core is a function of these, so it can be unit-tested
on hand-built scenarios and driven by either backend (local processes or Kubernetes pods).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hearth.spec import FunctionSpec

InstanceState = Literal["starting", "idle", "busy", "stopping"]


@dataclass(frozen=True)
class Node:
    """A place instances run: a local simulated node or a Kubernetes node (allocatable capacity)."""

    name: str
    cpu_millicores: int
    memory_mb: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Instance:
    """One running (or starting) instance. `function is None` marks a generic warm-pool
    instance of `runtime` that has not been specialised to a function yet."""

    id: str
    function: str | None
    node: str
    state: InstanceState
    runtime: str = "python3.11"
    memory_mb: int = 256
    cpu_millicores: int = 500
    started_at: float = 0.0
    last_used_at: float = 0.0
    inflight: int = 0
    from_pool: bool = False


@dataclass
class FunctionLoad:
    """Per-function load: in-flight invocations (eBPF counters / gateway), queued ones (queue lag
    or gateway backlog), and recent arrival times (seconds) for the keep-alive policies."""

    function: str
    inflight: int = 0
    queued: int = 0
    arrivals: tuple[float, ...] = ()
    cold_start_s: float | None = None  # measured mean cold-start cost, if known
    stream_lag: int = 0  # stream-trigger entries not yet delivered to the consumer group
    stream_pending: int = 0  # delivered, not acked (running or awaiting retry): not added


@dataclass
class Observation:
    now: float
    nodes: list[Node]
    instances: list[Instance]
    functions: dict[str, FunctionSpec]
    loads: dict[str, FunctionLoad] = field(default_factory=dict)
    pool_targets: dict[str, int] = field(
        default_factory=dict
    )  # runtime -> idle pool instances per node


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Start an instance of `function` on `node`; `from_pool` names the pool instance to specialise."""

    function: str
    node: str
    instance_id: str
    from_pool: str | None = None
    reason: str = "scale-up"


@dataclass(frozen=True)
class Stop:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Prewarm:
    """Start a generic pool instance of `runtime` on `node` (interpreter up, deps imported)."""

    runtime: str
    node: str
    instance_id: str


@dataclass(frozen=True)
class Keep:
    """Keep an idle instance until `until` (absolute seconds); informational for the backends."""

    instance_id: str
    until: float
    reason: str


@dataclass(frozen=True)
class Buffer:
    """Activator-style: hold `requests` invocations of `function` until an instance is ready."""

    function: str
    requests: int


Action = Start | Stop | Prewarm | Keep | Buffer
