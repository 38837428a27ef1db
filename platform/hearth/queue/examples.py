"""Small handlers for queue-triggered functions: used by the end-to-end tests, the throughput and
chaos benchmarks, and as examples (`handler: hearth.queue.examples:record`).

`record` writes to the Redis named by $RECORD_REDIS_URL (the spec's `env` gives it: function code
never inherits the platform's own Redis credentials), else $HEARTH_REDIS_URL (a queue worker
started by hand)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from hearth.sdk import Event

_r: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _r
    if _r is None:
        url = os.environ.get("RECORD_REDIS_URL") or os.environ["HEARTH_REDIS_URL"]
        _r = redis.Redis.from_url(url)
    return _r


def record_key(stream: str) -> str:
    return f"hearth:queue:record:{stream}"


def noop(event: Event) -> None:
    return None


def record(event: Event) -> dict[str, Any]:
    """Append '<entry id> <pid> <delivery>' to the list record_key(stream) once the work is done.

    Payload (msgpack map, all optional): ``sleep_s`` work time; ``hang_first``: on the first
    delivery, note '<entry id> <pid>' in '<key>:started' and hang (to be killed); ``fail``:
    raise on every delivery."""
    data = event.data() if event.content_type.startswith("application/msgpack") else {}
    data = data if isinstance(data, dict) else {}
    stream = event.headers.get("x-hearth-stream", "default")
    delivery = int(event.headers.get("x-hearth-delivery", "1"))
    key, eid, pid = record_key(stream), event.context.idempotency_key, os.getpid()
    if data.get("hang_first") and delivery == 1:
        _redis().rpush(key + ":started", f"{eid} {pid}")
        time.sleep(3600)
    if data.get("sleep_s"):
        time.sleep(float(data["sleep_s"]))
    if data.get("fail"):
        raise ValueError(f"asked to fail: {eid}")
    _redis().rpush(key, f"{eid} {pid} {delivery}")
    return {"id": eid, "pid": pid, "delivery": delivery}


def relay(event: Event) -> str:
    """Emit the payload's ``payload`` to the stream named by ``to`` (Context.emit); returns the
    new entry id. Shows a function producing events for the next one."""
    data = event.data()
    return event.context.emit(data["to"], data["payload"], source=event.context.function)
