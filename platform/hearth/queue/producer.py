"""Producing events: `publish` (async and sync), the gateway's `handle_publish`, and `emit_sync`
which the function runtime binds to `Context.emit`. All write the same wire format (wire.py)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

from hearth.queue.wire import (
    MAX_EVENT_BYTES,
    InvalidPayload,
    InvalidStreamName,
    PayloadTooLarge,
    PublishError,
    check_body,
    encode_entry,
    encode_payload,
    validate_stream_name,
)

__all__ = [
    "publish",
    "publish_sync",
    "handle_publish",
    "emit_sync",
    "build_fields",
    "PublishError",
    "InvalidStreamName",
    "InvalidPayload",
    "PayloadTooLarge",
]


def build_fields(
    stream: str,
    data: Any,
    content_type: str | None = None,
    meta: dict[str, Any] | None = None,
    *,
    max_bytes: int = MAX_EVENT_BYTES,
    allow_internal: bool = False,
) -> dict[bytes, bytes]:
    """Validate and encode one event. `meta` may hold ``headers`` (dict), ``invocation_id`` and
    ``reply``; any other key becomes a header (value turned into a string)."""
    validate_stream_name(stream, allow_internal=allow_internal)
    body, ct = encode_payload(data, content_type)
    check_body(body, ct, max_bytes)
    meta = dict(meta or {})
    headers = dict(meta.pop("headers", None) or {})
    invocation_id = meta.pop("invocation_id", None)
    reply = meta.pop("reply", None)
    for k, v in meta.items():
        headers[str(k)] = str(v)
    return encode_entry(body, ct, headers=headers, invocation_id=invocation_id, reply=reply)


def _id(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


async def publish(
    r: aioredis.Redis,
    stream: str,
    data: Any,
    content_type: str | None = None,
    meta: dict[str, Any] | None = None,
    *,
    max_bytes: int = MAX_EVENT_BYTES,
) -> str:
    """Append one event to `stream`; returns the entry id. bytes go as-is, objects as msgpack."""
    fields = build_fields(stream, data, content_type, meta, max_bytes=max_bytes)
    return _id(await r.xadd(stream, fields))


def publish_sync(
    r: redis.Redis,
    stream: str,
    data: Any,
    content_type: str | None = None,
    meta: dict[str, Any] | None = None,
    *,
    max_bytes: int = MAX_EVENT_BYTES,
) -> str:
    fields = build_fields(stream, data, content_type, meta, max_bytes=max_bytes)
    return _id(r.xadd(stream, fields))


async def handle_publish(
    r: aioredis.Redis,
    stream: str,
    body: bytes,
    content_type: str | None,
    headers: dict[str, str] | None = None,
    *,
    max_bytes: int = MAX_EVENT_BYTES,
) -> str:
    """The gateway's `POST /v1/streams/{stream}:publish`: the request body becomes the event
    payload unchanged, with its content type (default application/octet-stream). Raises
    PublishError subclasses (`.status` 400/413, `.error` code, message = detail)."""
    ct = (content_type or "").strip() or "application/octet-stream"
    return await publish(
        r, stream, bytes(body), ct, {"headers": headers or {}}, max_bytes=max_bytes
    )


def emit_sync(r: redis.Redis, stream: str, data: Any, meta: dict[str, Any] | None = None) -> str:
    """What `Context.emit(stream, data, **meta)` calls: `content_type` in meta picks the content
    type, `headers` and other keys become event headers."""
    meta = dict(meta or {})
    ct = meta.pop("content_type", None)
    return publish_sync(r, stream, data, ct, meta)
