"""Prometheus metrics of one Hearth node (own registry, so tests can run several nodes)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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
#: event-loop lag and collector pauses: a few ms already shows in a 2,000/s run's p99
PAUSE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
PHASES = ("scheduling", "pod_allocation", "deploy_code", "deploy_dependency", "total")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        #: hearth_invocations_total{function,status} and hearth_invocation_duration_seconds
        self.calls = Calls(r)
        self.errors = Counter(
            "hearth_invocation_errors",
            "Invocations that failed (status >= 400)",
            ["function", "error"],
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
        self.batches = Counter(
            "hearth_invoke_batches",
            "Round trips that carried several queued events to one instance",
            ["function"],
            registry=r,
        )
        self.batched_events = Counter(
            "hearth_invoke_batched_events",
            "Events carried in those batches",
            ["function"],
            registry=r,
        )
        self.rejected = Counter(
            "hearth_gateway_rejected",
            "Requests rejected by the gateway before invocation",
            ["reason"],
            registry=r,
        )
        self.fast_path = Tally(
            "hearth_gateway_fast_path",
            "Invoke requests answered on the gateway's lean HTTP path (the rest go through aiohttp)",
            r,
        )
        self.fast_path_direct = Tally(
            "hearth_gateway_fast_path_direct",
            "Of those, warm calls started from the read itself, with no task (a free instance)",
            r,
        )
        self.spins = Counter(
            "hearth_agent_spins",
            "Busy-polls for a lone call's reply (hearth.agent.spin): hit = the reply came",
            ["outcome"],
            registry=r,
        )
        self.spin_seconds = Counter(
            "hearth_agent_spin_seconds",
            "CPU time the agent spent busy-polling for replies",
            registry=r,
        )
        self.loop_lag = Histogram(
            "hearth_loop_lag_seconds",
            "How late the gateway's lag timer ran, each tick (runs while shedding is on; a "
            "stall shows in the ticks due during it)",
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "hearth_gc_pause_seconds",
            "Garbage collections of the serving process by generation, and how long each paused it",
            ["generation"],
            buckets=PAUSE_BUCKETS,
            registry=r,
        )


#: scraped (never registered) to learn whether this process's counters expose `_created`
_PROBE = Counter("hearth_created_probe", "whether counters expose _created", registry=None)


def use_created() -> bool:
    """Whether prometheus_client's own Counters and Histograms expose `_created` series now
    (the `PROMETHEUS_DISABLE_CREATED_SERIES` environment variable at its import, then
    `disable_created_metrics()` / `enable_created_metrics()`): read from a Counter's samples
    at each scrape, so `Tally` and `Calls` follow the library's one switch, however it decides
    (a private flag of the library's, read here, could move between versions)."""
    (family,) = _PROBE.collect()
    return len(family.samples) > 1  # `_total`, and `_created` unless disabled


class Tally:
    """A counter without labels that its one writer, the serving loop, bumps with `n += 1`,
    exposed as a Prometheus counter (`<name>_total`) when scraped. Why: a `Counter.inc()` is four
    Python calls and a lock, per request on the warm path (#19); this is none."""

    __slots__ = ("name", "doc", "n", "created")

    def __init__(self, name: str, doc: str, registry: CollectorRegistry) -> None:
        self.name, self.doc, self.n = name, doc, 0
        self.created = time.time()  # `<name>_created`, as a Counter exposes it
        registry.register(self)

    def _family(self) -> CounterMetricFamily:
        c = CounterMetricFamily(self.name, self.doc)
        c.add_metric([], self.n, created=self.created if use_created() else None)
        return c

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        yield self._family()


class Calls:
    """Invocations by function and status, and their latency by function, counted by the serving
    loop (their one writer) in plain numbers and exposed when scraped as the Counter
    `hearth_invocations` and the Histogram `hearth_invocation_duration_seconds` they replaced,
    series for series. Why: a child's `inc` and `observe` were nine Python calls and three lock
    round trips on every warm call (#19); `count` is one call and no lock."""

    def __init__(self, registry: CollectorRegistry, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = buckets  # (+Inf after them)
        self._n: dict[tuple[str, int], list[float]] = {}  # (function, status): [count, created]
        #: function: [count in each bucket (not cumulative; +Inf last), sum, created]
        self._t: dict[str, list[float]] = {}
        registry.register(self)

    def count(self, function: str, status: int, seconds: float) -> None:
        n = self._n.get((function, status))
        if n is None:
            n = self._n[(function, status)] = [0, time.time()]
        n[0] += 1
        h = self._t.get(function)
        if h is None:
            h = self._t[function] = [0] * (len(self.bounds) + 1) + [0.0, time.time()]
        h[bisect_left(self.bounds, seconds)] += 1  # the first bucket whose bound is >= seconds
        h[-2] += seconds

    def invocations(self, function: str, status: int) -> int:
        n = self._n.get((function, status))
        return 0 if n is None else int(n[0])

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("hearth_invocations", _CALLS_DOC, labels=["function", "status"])
        yield HistogramMetricFamily(
            "hearth_invocation_duration_seconds", _LATENCY_DOC, labels=["function"]
        )

    def collect(self) -> Iterator[Metric]:
        created = use_created()  # (as prometheus_client's own Counter and Histogram decide)
        c = CounterMetricFamily("hearth_invocations", _CALLS_DOC, labels=["function", "status"])
        # copies, not list(d.items()): that walk can be cut by a collection whose callback
        # lets the loop add a key (a scrape failing "changed size"); dict.copy() is not
        for (function, status), (n, t0) in self._n.copy().items():
            c.add_metric([function, str(status)], n, created=t0 if created else None)
        yield c
        h = HistogramMetricFamily(
            "hearth_invocation_duration_seconds", _LATENCY_DOC, labels=["function"]
        )
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for function, row in self._t.copy().items():
            row = list(row)
            total, buckets = 0.0, []
            for le, k in zip(les, row[:-2], strict=True):
                total += k
                buckets.append((le, total))
            h.add_metric([function], buckets, row[-2])
            if created:
                h.add_sample(
                    "hearth_invocation_duration_seconds_created", {"function": function}, row[-1]
                )
        yield h


_CALLS_DOC = "Invocations by function and status code"
_LATENCY_DOC = "End-to-end invocation latency at the node agent"


class DataplaneCollector:
    """The eBPF program's per-destination counters (the "sidecar" metrics SPRIGHT uses instead of
    a queue proxy), read from the proxy daemon at scrape time and labelled by function."""

    def __init__(self, proxy_socket: str, function_of: Callable[[int], str | None]):
        self.proxy_socket = proxy_socket
        self.function_of = function_of

    def collect(self) -> Iterator[Metric]:
        from hearth.dataplane.endpoint import proxy_stats

        try:
            st = proxy_stats(self.proxy_socket, timeout=2.0)
        except Exception:
            return
        msgs = CounterMetricFamily(
            "hearth_dataplane_messages",
            "Descriptors delivered per destination endpoint (BPF map in eBPF mode)",
            labels=["endpoint", "function", "mode"],
        )
        nbytes = CounterMetricFamily(
            "hearth_dataplane_bytes",
            "Descriptor bytes delivered per destination endpoint",
            labels=["endpoint", "function", "mode"],
        )
        for dst, c in (st.get("per_dst") or {}).items():
            fn = self.function_of(int(dst)) or "-"
            msgs.add_metric([str(dst), fn, st.get("mode", "?")], float(c.get("msgs", 0)))
            nbytes.add_metric([str(dst), fn, st.get("mode", "?")], float(c.get("bytes", 0)))
        yield msgs
        yield nbytes
