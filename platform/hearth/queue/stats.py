"""Queue observations: per trigger length, pending, lag, dead letters, delivery rate.

`hearth queues` prints them and the Prometheus collector exports them; the node agents publish
lag and pending for the controller, which scales on lag (pending entries already run, or wait
for a retry: `hearth.agent.loadpub`). The arithmetic is pure (`summarize`, `group_backlog`);
the Redis reads are thin shells."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hearth.queue.keys import ACKED_KEY, RATE_WINDOW_S, TRIGGERS_KEY, rate_key, trigger_field
from hearth.queue.wire import DLQ_SUFFIX, default_group, dlq_name

REGISTRY_KEY = "hearth:functions"  # hearth.registry.KEY: name -> FunctionSpec JSON


@dataclass
class TriggerRef:
    stream: str
    group: str
    function: str | None = None
    dlq: str | None = None


@dataclass
class TriggerStats:
    stream: str
    group: str
    length: int  # entries in the stream
    pending: int  # delivered, not yet acked (in flight or awaiting retry)
    lag: int  # entries not yet delivered to the group
    dead_letters: int  # entries in the dead-letter stream
    delivery_rate: float  # successful deliveries per second over the last RATE_WINDOW_S seconds
    processed: int = 0  # successful deliveries ever recorded
    consumers: int = 0
    function: str | None = None
    dlq: str | None = None

    @property
    def backlog(self) -> int:
        """Work not yet done: what the autoscaler sizes instances by (0 means idle)."""
        return self.lag + self.pending

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "backlog": self.backlog}


def _s(x: Any) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _rate_keys(stream: str, group: str, now: float) -> list[str]:
    last_full = int(now) - 1  # the current second is still filling up
    return [rate_key(stream, group, s) for s in range(last_full - RATE_WINDOW_S + 1, last_full + 1)]


def summarize(
    ref: TriggerRef,
    length: int,
    group_info: dict[str, Any] | None,
    dlq_len: int,
    rate_counts: list[Any],
    processed: Any,
) -> TriggerStats:
    """Combine raw Redis answers into TriggerStats (pure)."""
    lag, pending = group_backlog(length, group_info)
    counts = [int(c) for c in rate_counts if c is not None]
    return TriggerStats(
        stream=ref.stream,
        group=ref.group,
        length=int(length),
        pending=pending,
        lag=lag,
        dead_letters=int(dlq_len),
        delivery_rate=sum(counts) / RATE_WINDOW_S,
        processed=int(processed or 0),
        consumers=int(group_info.get("consumers", 0)) if group_info else 0,
        function=ref.function,
        dlq=ref.dlq or dlq_name(ref.stream),
    )


def group_backlog(length: int, group_info: dict[str, Any] | None) -> tuple[int, int]:
    """(lag, pending) of a consumer group from XLEN and its XINFO GROUPS entry (None: no group
    yet, everything is lag)."""
    pending = int(group_info.get("pending", 0)) if group_info else 0
    lag = group_info.get("lag") if group_info else length
    if lag is None:  # Redis cannot tell after XDEL/XTRIM: bound it by what the stream holds
        entries_read = group_info.get("entries-read") if group_info else None
        lag = max(0, length - int(entries_read)) if entries_read is not None else length
    return int(lag), pending


def find_group(groups: list[dict[str, Any]], group: str) -> dict[str, Any] | None:
    for g in groups:
        if _s(g.get("name")) == group:
            return {_s(k): v for k, v in g.items()}
    return None


async def trigger_stats(
    r: aioredis.Redis, stream: str, group: str, dlq: str | None = None, function: str | None = None
) -> TriggerStats:
    ref = TriggerRef(stream, group, function, dlq or dlq_name(stream))
    async with r.pipeline(transaction=False) as p:
        p.xlen(stream)
        p.xlen(ref.dlq)
        p.mget(_rate_keys(stream, group, time.time()))
        p.hget(ACKED_KEY, trigger_field(stream, group))
        length, dlq_len, rates, processed = await p.execute()
    try:
        groups = await r.xinfo_groups(stream) if length or await r.exists(stream) else []
    except ResponseError:
        groups = []
    return summarize(ref, length, find_group(groups, group), dlq_len, rates, processed)


def trigger_stats_sync(
    r: redis.Redis, stream: str, group: str, dlq: str | None = None, function: str | None = None
) -> TriggerStats:
    ref = TriggerRef(stream, group, function, dlq or dlq_name(stream))
    p = r.pipeline(transaction=False)
    p.xlen(stream)
    p.xlen(ref.dlq)
    p.mget(_rate_keys(stream, group, time.time()))
    p.hget(ACKED_KEY, trigger_field(stream, group))
    length, dlq_len, rates, processed = p.execute()
    try:
        groups = r.xinfo_groups(stream) if length or r.exists(stream) else []
    except ResponseError:
        groups = []
    return summarize(ref, length, find_group(groups, group), dlq_len, rates, processed)


def _spec_refs(name: str, raw: Any) -> list[TriggerRef]:
    """The stream triggers a registered FunctionSpec (JSON) declares."""
    try:
        spec = json.loads(raw)
        fn = spec.get("name") or name
        out = []
        for t in spec.get("triggers", []):
            if t.get("type") == "redis-stream" and t.get("stream"):
                group = t.get("group") or default_group(fn)
                out.append(
                    TriggerRef(t["stream"], group, fn, dlq_name(t["stream"], t.get("dead_letter")))
                )
        return out
    except (ValueError, TypeError, AttributeError):
        return []


def _known_refs(triggers: dict | None, registry: dict | None) -> dict[tuple[str, str], TriggerRef]:
    """The triggers runners registered (the TRIGGERS_KEY hash), then those the deployed
    functions' specs declare (the REGISTRY_KEY hash), by (stream, group)."""
    refs: dict[tuple[str, str], TriggerRef] = {}
    for v in (triggers or {}).values():
        try:
            d = json.loads(v)
            refs[(d["stream"], d["group"])] = TriggerRef(
                d["stream"], d["group"], d.get("function"), d.get("dlq")
            )
        except (ValueError, KeyError, TypeError):
            continue
    for name, raw in (registry or {}).items():
        for ref in _spec_refs(_s(name), raw):
            refs.setdefault((ref.stream, ref.group), ref)
    return refs


def _add_groups(refs: dict[tuple[str, str], TriggerRef], stream: str, groups: list) -> None:
    """A scanned stream's consumer groups (XINFO GROUPS) not known otherwise."""
    for g in groups:
        refs.setdefault((stream, _s(g["name"])), TriggerRef(stream, _s(g["name"])))


def discover_triggers(r: redis.Redis, scan: bool = True) -> list[TriggerRef]:
    """Triggers known to Redis: those registered by runners (TRIGGERS_KEY), those declared by
    deployed functions (the registry), then — unless scan=False — every other stream with a
    consumer group (DLQ streams excluded)."""
    refs = _known_refs(r.hgetall(TRIGGERS_KEY), r.hgetall(REGISTRY_KEY))
    if scan:
        for key in r.scan_iter(_type="STREAM", count=1000):
            stream = _s(key)
            if stream.endswith(DLQ_SUFFIX):
                continue
            try:
                groups = r.xinfo_groups(stream)
            except ResponseError:
                continue
            _add_groups(refs, stream, groups)
    return sorted(refs.values(), key=lambda t: (t.stream, t.group))


async def all_stats_async(r: aioredis.Redis, scan: bool = False) -> list[TriggerStats]:
    """Every known trigger's stats from an asyncio client (the controller's observation loop).
    Discovery reads the registries; pass scan=True to also SCAN for foreign consumer groups."""
    refs = _known_refs(await r.hgetall(TRIGGERS_KEY), await r.hgetall(REGISTRY_KEY))
    if scan:
        async for key in r.scan_iter(_type="STREAM", count=1000):
            stream = _s(key)
            if stream.endswith(DLQ_SUFFIX):
                continue
            try:
                groups = await r.xinfo_groups(stream)
            except ResponseError:
                continue
            _add_groups(refs, stream, groups)
    return [
        await trigger_stats(r, t.stream, t.group, t.dlq, t.function)
        for t in sorted(refs.values(), key=lambda t: (t.stream, t.group))
    ]


async def forget_trigger(r: aioredis.Redis, stream: str, group: str) -> None:
    """Drop a trigger's registration (call when its function is deleted everywhere); the
    stream, group and DLQ stay for `hearth dlq` and replays."""
    await r.hdel(TRIGGERS_KEY, trigger_field(stream, group))


def all_stats(r: redis.Redis, scan: bool = True) -> list[TriggerStats]:
    return [
        trigger_stats_sync(r, t.stream, t.group, t.dlq, t.function)
        for t in discover_triggers(r, scan)
    ]


class QueueCollector:
    """Prometheus collector: `registry.register(QueueCollector(redis_client))`, read at scrape."""

    def __init__(self, r: redis.Redis, scan: bool = True, min_interval_s: float = 0.0):
        self.r = r
        self.scan = scan
        # scrapes closer together than this reuse the last figures: a scrape storm cannot turn
        # into a Redis storm
        self.min_interval_s = min_interval_s
        self._last: tuple[float, list[TriggerStats]] | None = None

    def describe(self) -> list[Any]:
        return []  # metrics are dynamic (one series per trigger); describe lazily

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["stream", "group", "function"]
        fams = {
            "length": GaugeMetricFamily(
                "hearth_queue_length", "Entries in the trigger's stream", labels=labels
            ),
            "pending": GaugeMetricFamily(
                "hearth_queue_pending", "Entries delivered but not yet acked", labels=labels
            ),
            "lag": GaugeMetricFamily(
                "hearth_queue_lag", "Entries not yet delivered to the consumer group", labels=labels
            ),
            "dead_letters": GaugeMetricFamily(
                "hearth_queue_dead_letters", "Entries in the dead-letter stream", labels=labels
            ),
            "delivery_rate": GaugeMetricFamily(
                "hearth_queue_delivery_rate",
                f"Successful deliveries per second (last {RATE_WINDOW_S}s)",
                labels=labels,
            ),
            "consumers": GaugeMetricFamily(
                "hearth_queue_consumers", "Consumers in the group", labels=labels
            ),
        }
        processed = CounterMetricFamily(
            "hearth_queue_processed", "Entries processed successfully and acked", labels=labels
        )
        import time

        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.min_interval_s:
            stats = self._last[1]
        else:
            try:
                stats = all_stats(self.r, self.scan)
            except redis.RedisError:
                stats = []
            self._last = (now, stats)
        for s in stats:
            lv = [s.stream, s.group, s.function or ""]
            for k, fam in fams.items():
                fam.add_metric(lv, float(getattr(s, k)))
            processed.add_metric(lv, float(s.processed))
        yield from fams.values()
        yield processed


def register_queue_metrics(
    registry: Any, r: redis.Redis, scan: bool = True, min_interval_s: float = 0.0
) -> QueueCollector:
    """Mount the queue figures on a prometheus_client registry (the gateway's /metrics)."""
    c = QueueCollector(r, scan, min_interval_s)
    registry.register(c)
    return c
