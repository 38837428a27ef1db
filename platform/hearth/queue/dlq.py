"""Dead-letter streams: list, replay (re-publish the original fields to the source stream), purge.

A DLQ entry holds: error, kind (failed | malformed | exhausted), deliveries, function,
source_stream, source_group, source_id, failed_at, fields (msgpack map of the original fields)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

from hearth.queue.keys import TRIGGERS_KEY
from hearth.queue.wire import DLQ_SUFFIX, MalformedEntry, decode_entry


class DLQError(ValueError):
    """A DLQ operation was refused (unknown stream, unknown ids); the message says why."""


@dataclass
class DeadLetter:
    id: str
    error: str
    kind: str
    deliveries: int
    function: str
    source_stream: str
    source_group: str
    source_id: str
    failed_at: float
    fields: dict[bytes, bytes]

    def preview(self, limit: int = 80) -> str:
        """A short, printable view of the original payload."""
        try:
            dec = decode_entry(self.fields)
            data: Any = dec.data
            if dec.content_type.startswith("application/msgpack"):
                data = msgpack.unpackb(data, raw=False)
                text = json.dumps(data, default=repr)
            else:
                text = bytes(data).decode("utf-8", errors="replace")
        except (MalformedEntry, ValueError, TypeError):
            text = repr(self.fields)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "error": self.error,
            "kind": self.kind,
            "deliveries": self.deliveries,
            "function": self.function,
            "source_stream": self.source_stream,
            "source_group": self.source_group,
            "source_id": self.source_id,
            "failed_at": self.failed_at,
            "payload": self.preview(200),
        }


def _s(x: Any) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _num(x: Any, cast: Any) -> Any:
    """A number field of a dead letter; written by hand or by another tool it may be anything."""
    try:
        return cast(x or 0)
    except (TypeError, ValueError):
        return cast(0)


def parse_dead_letter(eid: Any, f: dict[bytes, bytes]) -> DeadLetter:
    try:
        fields = msgpack.unpackb(f.get(b"fields", b"\x80"), raw=True)
        if not isinstance(fields, dict):
            fields = {}
    except Exception:
        fields = {}
    return DeadLetter(
        id=_s(eid),
        error=_s(f.get(b"error", b"")),
        kind=_s(f.get(b"kind", b"failed")),
        deliveries=_num(f.get(b"deliveries"), int),
        function=_s(f.get(b"function", b"")),
        source_stream=_s(f.get(b"source_stream", b"")),
        source_group=_s(f.get(b"source_group", b"")),
        source_id=_s(f.get(b"source_id", b"")),
        failed_at=_num(f.get(b"failed_at"), float),
        fields=fields,
    )


def resolve_dlq(r: redis.Redis, name: str) -> str:
    """NAME may be the DLQ stream itself, the source stream, or a function with a trigger."""
    if name.endswith(DLQ_SUFFIX) and r.exists(name):
        return name
    for v in (r.hgetall(TRIGGERS_KEY) or {}).values():
        try:
            d = json.loads(v)
        except ValueError:
            continue
        if name in (d.get("stream"), d.get("function"), d.get("dlq")) and d.get("dlq"):
            return d["dlq"]
    return name if name.endswith(DLQ_SUFFIX) else name + DLQ_SUFFIX


def list_dead(r: redis.Redis, dlq: str, limit: int = 100) -> list[DeadLetter]:
    return [parse_dead_letter(eid, f) for eid, f in r.xrange(dlq, count=limit)]


def replay(
    r: redis.Redis, dlq: str, ids: list[str] | None = None, limit: int | None = None
) -> list[tuple[str, str]]:
    """Re-publish dead letters (all, or `ids`) to their source stream with their original
    fields, and delete them from the DLQ in the same MULTI/EXEC. Returns (dlq id, new id)."""
    if ids:
        entries = []
        for i in ids:
            got = r.xrange(dlq, min=i, max=i, count=1)
            if not got:
                raise DLQError(f"no entry {i!r} in dead-letter stream {dlq!r}")
            entries.append(got[0])
    else:
        entries = r.xrange(dlq, count=limit) if limit else r.xrange(dlq)
    out = []
    for eid, f in entries:
        dl = parse_dead_letter(eid, f)
        if not dl.source_stream or not dl.fields:
            raise DLQError(
                f"dead letter {dl.id} has no source stream or original fields; cannot replay"
            )
        p = r.pipeline(transaction=True)
        p.xadd(dl.source_stream, dl.fields)
        p.xdel(dlq, dl.id)
        new_id, _ = p.execute()
        out.append((dl.id, _s(new_id)))
    return out


def purge(r: redis.Redis, dlq: str, ids: list[str] | None = None) -> int:
    """Delete dead letters (all, or `ids`); returns how many were deleted."""
    if ids:
        return int(r.xdel(dlq, *ids))
    n = int(r.xlen(dlq))
    r.delete(dlq)
    return n
