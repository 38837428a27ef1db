"""Cold-start records: each new or specialised instance's phases, in the columns of the
public Huawei cold-start trace (scheduling, pod allocation, code, dependencies, total)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from hearth.agent.instance import Instance
from hearth.agent.table import FunctionState
from hearth.metrics import Metrics
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.node")

KEEP = 10_000  # records kept in memory (the recorder callback keeps the rest)


def phases_of(
    inst: Instance, requested: float, spawned: float, reported: dict[str, float]
) -> dict[str, float]:
    """Absolute phase timestamps from what the agent saw and what the instance reported."""
    if inst.from_pool:
        # The process was already up: allocation is only the hand-over to the pooled instance.
        started = reported.get("code_import_start", spawned)
    else:
        started = reported.get("process_started", spawned)
    p = {"requested": requested, "spawned": spawned, "process_started": started}
    p["code_imported"] = reported.get("code_imported", p["process_started"])
    p["deps_ready"] = reported.get("deps_ready", p["code_imported"])
    p["ready"] = reported.get("ready", time.time())
    return p


def costs_of(p: dict[str, float]) -> dict[str, float]:
    costs = {
        "scheduling": p["spawned"] - p["requested"],
        "pod_allocation": p["process_started"] - p["spawned"],
        "deploy_code": p["code_imported"] - p["process_started"],
        "deploy_dependency": p["ready"] - p["code_imported"],
    }
    costs["total"] = sum(costs.values())
    return costs


class ColdStartLog:
    def __init__(
        self, metrics: Metrics, on_record: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.metrics = metrics
        self.on_record = on_record
        self.records: list[dict[str, Any]] = []

    def record(
        self,
        spec: FunctionSpec,
        inst: Instance,
        requested: float,
        spawned: float,
        reported: dict[str, float],
        fs: FunctionState | None,
        kind: str = "process",
        note: dict[str, Any] | None = None,
    ) -> None:
        """`note`: what else the record says (a wait for a zygote, why a start fell back)."""
        p = inst.phases = phases_of(inst, requested, spawned, reported)
        rec = {
            "function": spec.name,
            "instance": inst.id,
            "node": inst.node,
            "from_pool": inst.from_pool,
            "memory_mb": spec.resources.memory_mb,
            "cpu_millicores": spec.resources.cpu_millicores,
            "phases": p,
            **(note or {}),
        }
        self.records.append(rec)
        del self.records[:-KEEP]
        costs = costs_of(p)
        if fs is not None:  # moving average: what a cold start of this function costs now
            fs.cold_start_s = (
                costs["total"]
                if fs.cold_start_s is None
                else 0.7 * fs.cold_start_s + 0.3 * costs["total"]
            )
        self.metrics.cold_starts.labels(spec.name, "pool" if inst.from_pool else kind).inc()
        for ph, v in costs.items():
            self.metrics.cold_phase.labels(spec.name, ph).observe(max(0.0, v))
        if self.on_record:
            try:
                self.on_record(rec)
            except Exception:  # recording must never break serving
                log.exception("cold-start recorder failed")
