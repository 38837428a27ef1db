"""Where the queue machinery keeps its bookkeeping in Redis: the registry of running triggers,
the count of entries acked after success, and per-second delivery counters. The consumers write
them; `hearth queues`, the metrics collector and the DLQ commands read them."""

from __future__ import annotations

TRIGGERS_KEY = (
    "hearth:queue:triggers"  # hash "<stream> <group>" -> JSON {function, stream, group, dlq}
)
ACKED_KEY = "hearth:queue:acked"  # hash "<stream> <group>" -> total acked after success
RATE_WINDOW_S = 10


def trigger_field(stream: str, group: str) -> str:
    return f"{stream} {group}"


def rate_key(stream: str, group: str, second: int) -> str:
    return f"hearth:queue:rate:{group}:{stream}:{second}"
