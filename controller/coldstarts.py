"""Cold-start records in the columns of the public Huawei cold-start trace (EuroSys'25),
built from real phase timestamps, so the trace analyser reads Hearth's own traces like the
public ones. Plus Prometheus histograms of the same phases.

Local backend phases (epoch seconds, reported by the runtime):
  requested → spawned → process_started → code_imported → deps_ready → ready
  schedulingCost       = spawned - requested          (placement, queueing)
  podAllocationCost    = process_started - spawned    (process/interpreter start)
  deployCodeCost       = code_imported - process_started
  deployDependencyCost = ready - code_imported        (deps + init until ready)
Kubernetes phases: pod created → scheduled (schedulingCost) → containers started
(podAllocationCost) → runtime ready (code/dependency costs from the runtime's own report).
totalCost_cold_start is the sum of the four, as in the public trace.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from pathlib import Path

HUAWEI_COLUMNS = [
    "day",
    "time",
    "clusterName",
    "funcName",
    "userID",
    "requestID",
    "totalCost_cold_start",
    "podAllocationCost",
    "deployCodeCost",
    "deployDependencyCost",
    "schedulingCost",
    "podID",
]
COLUMNS = [*HUAWEI_COLUMNS, "fromPool"]
LOCAL_PHASES = ("requested", "spawned", "process_started", "code_imported", "deps_ready", "ready")
COST_PHASES = ("schedulingCost", "podAllocationCost", "deployCodeCost", "deployDependencyCost")


class ColdStartError(ValueError):
    """Phase timestamps missing or out of order; the message names the phase."""


@dataclass
class ColdStartRecord:
    day: int
    time: float
    clusterName: str
    funcName: str
    userID: str
    requestID: str
    totalCost_cold_start: float
    podAllocationCost: float
    deployCodeCost: float
    deployDependencyCost: float
    schedulingCost: float
    podID: str
    fromPool: bool = False

    def costs(self) -> dict[str, float]:
        return {p: getattr(self, p) for p in COST_PHASES}


def pod_id(cpu_millicores: int, memory_mb: int, n: int, pool: int = 0) -> str:
    """`poolNN-<cpu mcores>-<mem MB>-<n>` as in the public trace (n zero-padded to 10)."""
    return f"pool{pool:02d}-{int(cpu_millicores)}-{int(memory_mb)}-{int(n):010d}"


def _day_time(t: float, origin: float | None) -> tuple[int, float]:
    if origin is None:
        origin = math.floor(t / 86400.0) * 86400.0  # midnight UTC of the request
    rel = t - origin
    return int(rel // 86400), round(rel, 3)


def _check(phases: Mapping[str, float], order: Iterable[str]) -> list[float]:
    vals = []
    prev_name = None
    for name in order:
        if name not in phases or phases[name] is None:
            raise ColdStartError(f"cold-start phases: missing {name!r}")
        try:
            v = float(phases[name])
        except (TypeError, ValueError):
            raise ColdStartError(
                f"cold-start phases: {name!r} is not a number: {phases[name]!r}"
            ) from None
        if not math.isfinite(v):
            raise ColdStartError(f"cold-start phases: {name!r} is not finite")
        if vals and v < vals[-1]:
            raise ColdStartError(
                f"cold-start phases: {name!r} ({v}) is before {prev_name!r} ({vals[-1]})"
            )
        vals.append(v)
        prev_name = name
    return vals


def _record(
    stamps: Sequence[float],
    *,
    function: str,
    pod: str,
    from_pool: bool,
    cluster: str,
    user: str,
    request_id: str,
    origin: float | None,
) -> ColdStartRecord:
    """`stamps` are the five checked boundaries of the COST_PHASES, in order: each cost is the gap
    between two neighbours, whichever backend reported them."""
    costs = dict(zip(COST_PHASES, (b - a for a, b in pairwise(stamps)), strict=True))
    day, time = _day_time(stamps[0], origin)
    return ColdStartRecord(
        day=day,
        time=time,
        clusterName=cluster,
        funcName=function,
        userID=user,
        requestID=request_id,
        totalCost_cold_start=sum(costs.values()),
        **costs,
        podID=pod,
        fromPool=from_pool,
    )


def from_local_phases(
    phases: Mapping[str, float],
    *,
    function: str,
    pod: str,
    from_pool: bool = False,
    cluster: str = "local",
    user: str = "default",
    request_id: str = "",
    origin: float | None = None,
) -> ColdStartRecord:
    """Build a record from the local runtime's phase timestamps (see module docstring). A pool
    start reports `spawned`/`process_started` at the moment the pool instance was taken, so
    its podAllocationCost is ~0."""
    req, spawned, started, imported, _deps, ready = _check(phases, LOCAL_PHASES)
    return _record(
        (req, spawned, started, imported, ready),
        function=function,
        pod=pod,
        from_pool=from_pool,
        cluster=cluster,
        user=user,
        request_id=request_id,
        origin=origin,
    )


def from_k8s_phases(
    *,
    created: float,
    scheduled: float,
    containers_started: float,
    runtime: Mapping[str, float],
    function: str,
    pod: str,
    from_pool: bool = False,
    cluster: str = "kubernetes",
    user: str = "default",
    request_id: str = "",
    origin: float | None = None,
) -> ColdStartRecord:
    """Pod created → PodScheduled → ContainersReady-start → runtime ready. `runtime` is the
    runtime's own report (`code_imported`, `ready`, epoch seconds); its process start is the
    container start."""
    merged = {
        "created": created,
        "scheduled": scheduled,
        "containers_started": containers_started,
        **{k: runtime.get(k) for k in ("code_imported", "ready")},
    }
    return _record(
        _check(merged, ("created", "scheduled", "containers_started", "code_imported", "ready")),
        function=function,
        pod=pod,
        from_pool=from_pool,
        cluster=cluster,
        user=user,
        request_id=request_id,
        origin=origin,
    )


def to_huawei_csv(records: Iterable[ColdStartRecord], path: str | Path) -> int:
    """Write records with the public trace's header (plus `fromPool`); returns rows written."""
    n = 0
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in records:
            row = asdict(r)
            w.writerow(
                [
                    row["day"],
                    f"{row['time']:.3f}",
                    *(row[c] for c in ("clusterName", "funcName", "userID", "requestID")),
                    *(
                        f"{row[c]:.6f}"
                        for c in (
                            "totalCost_cold_start",
                            "podAllocationCost",
                            "deployCodeCost",
                            "deployDependencyCost",
                            "schedulingCost",
                        )
                    ),
                    row["podID"],
                    "true" if row["fromPool"] else "false",
                ]
            )
            n += 1
    return n


def read_huawei_csv(path: str | Path) -> list[ColdStartRecord]:
    """Read Hearth's export (or a public cold-start CSV: extra columns are ignored)."""
    out = []
    types = {f.name: f.type for f in fields(ColdStartRecord)}
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            kw = {}
            for c in COLUMNS:
                v = row.get(c)
                if v is None:
                    if c == "fromPool":
                        continue
                    raise ColdStartError(f"{path}:{lineno}: missing column {c!r}")
                t = types[c]
                try:
                    kw[c] = (
                        int(v)
                        if t == "int"
                        else float(v)
                        if t == "float"
                        else (v.lower() == "true")
                        if t == "bool"
                        else v
                    )
                except ValueError:
                    raise ColdStartError(f"{path}:{lineno}: {c}: not a number: {v!r}") from None
            out.append(ColdStartRecord(**kw))
    return out


def append_jsonl(record: ColdStartRecord, path: str | Path) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(asdict(record)) + "\n")


def read_jsonl(path: str | Path) -> list[ColdStartRecord]:
    out = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(ColdStartRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise ColdStartError(f"{path}:{lineno}: not a cold-start record: {e}") from None
    return out


class ColdStartMetrics:
    """Prometheus families for the gateway's /metrics: one histogram per phase (label `phase`,
    plus `total`), labelled by function and whether the start came from a warm pool."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

    def __init__(self, registry=None) -> None:  # registry: prometheus_client.CollectorRegistry
        from prometheus_client import REGISTRY, Counter, Histogram

        reg = REGISTRY if registry is None else registry
        self.phases = Histogram(
            "hearth_cold_start_phase_seconds",
            "Cold-start time per phase (Huawei trace columns) and total",
            ["function", "phase", "from_pool"],
            buckets=self.BUCKETS,
            registry=reg,
        )
        self.count = Counter(
            "hearth_cold_starts", "Cold starts", ["function", "from_pool"], registry=reg
        )

    def observe(self, r: ColdStartRecord) -> None:
        fp = "true" if r.fromPool else "false"
        for p, v in r.costs().items():
            self.phases.labels(r.funcName, p, fp).observe(v)
        self.phases.labels(r.funcName, "totalCost_cold_start", fp).observe(r.totalCost_cold_start)
        self.count.labels(r.funcName, fp).inc()
