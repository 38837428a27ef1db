"""Prometheus metrics of one Hearth node (own registry, so tests can run several nodes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PHASES = ("scheduling", "pod_allocation", "deploy_code", "deploy_dependency", "total")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.invocations = Counter(
            "hearth_invocations",
            "Invocations by function and status code",
            ["function", "status"],
            registry=r,
        )
        self.errors = Counter(
            "hearth_invocation_errors",
            "Invocations that failed (status >= 400)",
            ["function", "error"],
            registry=r,
        )
        self.latency = Histogram(
            "hearth_invocation_duration_seconds",
            "End-to-end invocation latency at the node agent",
            ["function"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cold_starts = Counter(
            "hearth_cold_starts",
            "Cold starts by function and origin (fresh process or warm pool)",
            ["function", "origin"],
            registry=r,
        )
        self.cold_phase = Histogram(
            "hearth_cold_start_phase_seconds",
            "Cold-start phases (Huawei trace columns)",
            ["function", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.instances = Gauge(
            "hearth_instances", "Instances by function and state", ["function", "state"], registry=r
        )
        self.dataplane_mode = Gauge(
            "hearth_dataplane_mode", "1 for the data-plane mode in use", ["mode"], registry=r
        )
        self.rejected = Counter(
            "hearth_gateway_rejected",
            "Requests rejected by the gateway before invocation",
            ["reason"],
            registry=r,
        )
