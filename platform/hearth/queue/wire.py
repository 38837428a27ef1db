"""The event wire format of Hearth streams and the pure rules around it (no I/O).

A stream entry is a flat field map (see docs/queues.md):

- ``v``  format version, ``b"1"`` (optional on read; other values are rejected)
- ``d``  the payload bytes exactly as the handler will see them (required). Python objects
         published through Hearth are msgpack-encoded, with ``ct = application/msgpack``.
- ``ct`` content type of ``d`` (optional, default ``application/msgpack``). When it is msgpack
         or JSON, ``d`` must decode, otherwise the entry is malformed.
- ``m``  msgpack map of metadata (optional): ``headers`` (str->str), ``invocation_id``,
         ``reply`` ({``ttl``: seconds, ``callback``: url} for async invocations), ``ts``
         (publish time, epoch seconds).

Keeping decoding here, as plain functions, lets the consumer dead-letter a bad entry with a
precise reason instead of crashing, and lets the tests cover every rule without Redis.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hearth.invoke import InvokeError, InvokeResult
from hearth.sdk import JSON, MSGPACK

VERSION = b"1"
DEFAULT_CONTENT_TYPE = MSGPACK
DLQ_SUFFIX = ":dlq"
INTERNAL_PREFIX = "hearth:"
MAX_EVENT_BYTES = 1 << 20  # payload bytes accepted by publish(); Redis streams are not a blob store
MAX_META_BYTES = 64 << 10
STREAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,255}$")


class PublishError(ValueError):
    """A publish request was rejected; `status` is the HTTP status the gateway should answer."""

    status = 400
    error = "invalid_request"


class InvalidStreamName(PublishError):
    error = "invalid_stream"


class InvalidPayload(PublishError):
    error = "invalid_payload"


class PayloadTooLarge(PublishError):
    status = 413
    error = "payload_too_large"


class MalformedEntry(ValueError):
    """A stream entry that cannot be turned into an invocation; the message is the DLQ reason."""


@dataclass
class Decoded:
    """A stream entry ready to be invoked."""

    data: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    invocation_id: str | None = None
    reply: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def validate_stream_name(stream: str, *, allow_internal: bool = False) -> str:
    """Stream names: 1-256 chars of letters, digits and ``. _ : / @ -``, starting with a letter or
    digit. ``hearth:`` is the platform's namespace and ``:dlq`` names dead-letter streams."""
    if not isinstance(stream, str) or not STREAM_NAME_RE.match(stream):
        raise InvalidStreamName(
            f"stream name {stream!r} is invalid: use 1-256 characters from letters, digits and "
            "'._:/@-', starting with a letter or digit"
        )
    if not allow_internal and stream.startswith(INTERNAL_PREFIX):
        raise InvalidStreamName(
            f"stream name {stream!r} is invalid: the prefix 'hearth:' is reserved for the platform"
        )
    if not allow_internal and stream.endswith(DLQ_SUFFIX):
        raise InvalidStreamName(
            f"stream name {stream!r} is invalid: names ending in ':dlq' are dead-letter streams "
            "(use `hearth dlq replay` to re-publish dead letters)"
        )
    return stream


def base_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def encode_payload(data: Any, content_type: str | None) -> tuple[bytes, str]:
    """bytes-like payloads go as they are (default content type octet-stream); anything else is
    msgpack-encoded. Raises InvalidPayload when the object cannot be msgpack-encoded."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), content_type or "application/octet-stream"
    if isinstance(data, str) and content_type and not base_type(content_type) == MSGPACK:
        return data.encode(), content_type
    try:
        return msgpack.packb(data, use_bin_type=True), content_type or MSGPACK
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidPayload(f"payload cannot be encoded as msgpack: {e}") from None


def _undecodable(data: bytes, bt: str) -> Exception | None:
    """What decoding `data` as its base type `bt` raised (msgpack and JSON are checked; other
    types are opaque bytes), or None."""
    if bt == MSGPACK:
        try:
            msgpack.unpackb(data, raw=False)
        except Exception as e:  # msgpack raises several unrelated types
            return e
    elif bt == JSON:
        try:
            json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            return e
    return None


def check_body(data: bytes, content_type: str, max_bytes: int = MAX_EVENT_BYTES) -> None:
    """The publish-side checks: size, and that msgpack/JSON bodies really are msgpack/JSON."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"event payload is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not content_type or len(content_type) > 255 or not content_type.isascii():
        raise InvalidPayload(f"content type {content_type!r} is invalid")
    bt = base_type(content_type)
    e = _undecodable(data, bt)
    if e is not None:
        name = "msgpack" if bt == MSGPACK else "JSON"
        raise InvalidPayload(f"body is declared {bt} but is not valid {name}: {e}") from None


def encode_entry(
    data: bytes,
    content_type: str,
    *,
    headers: dict[str, str] | None = None,
    invocation_id: str | None = None,
    reply: dict[str, Any] | None = None,
    now: float | None = None,
) -> dict[bytes, bytes]:
    meta: dict[str, Any] = {"ts": round(time.time() if now is None else now, 6)}
    if headers:
        meta["headers"] = {str(k): str(v) for k, v in headers.items()}
    if invocation_id:
        meta["invocation_id"] = invocation_id
    if reply:
        meta["reply"] = reply
    m = msgpack.packb(meta, use_bin_type=True)
    if len(m) > MAX_META_BYTES:
        raise InvalidPayload(
            f"event metadata is {len(m)} bytes; the limit is {MAX_META_BYTES} bytes"
        )
    return {b"v": VERSION, b"d": data, b"ct": content_type.encode(), b"m": m}


def decode_entry(fields: dict[bytes, bytes]) -> Decoded:
    """Turn the raw fields of an entry into a Decoded, or raise MalformedEntry with the reason."""
    if not isinstance(fields, dict) or not fields:
        raise MalformedEntry("malformed entry: no fields")
    v = fields.get(b"v")
    if v is not None and v != VERSION:
        raise MalformedEntry(
            f"malformed entry: unsupported format version v={v[:16]!r} (expected {VERSION!r})"
        )
    if b"d" not in fields:
        names = ", ".join(sorted(k.decode(errors="replace") for k in fields))[:200]
        raise MalformedEntry(
            f"malformed entry: missing field 'd' (payload); fields present: {names}"
        )
    data = fields[b"d"]
    raw_ct = fields.get(b"ct")
    try:
        ct = raw_ct.decode("ascii") if raw_ct is not None else DEFAULT_CONTENT_TYPE
    except UnicodeDecodeError:
        raise MalformedEntry("malformed entry: field 'ct' (content type) is not ASCII") from None
    if not ct:
        raise MalformedEntry("malformed entry: field 'ct' (content type) is empty")
    bt = base_type(ct)
    e = _undecodable(data, bt)
    if e is not None:
        why = f"msgpack ({type(e).__name__}: {e})" if bt == MSGPACK else f"JSON ({e})"
        raise MalformedEntry(f"malformed entry: field 'd' is not valid {why}") from None
    meta: dict[str, Any] = {}
    if b"m" in fields:
        try:
            meta = msgpack.unpackb(fields[b"m"], raw=False)
        except Exception as e:
            raise MalformedEntry(
                f"malformed entry: field 'm' (metadata) is not valid msgpack ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(meta, dict):
            raise MalformedEntry(
                f"malformed entry: field 'm' (metadata) must be a msgpack map, got {type(meta).__name__}"
            )
    headers = meta.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in headers.items()
    ):
        raise MalformedEntry(
            "malformed entry: metadata 'headers' must be a map of strings to strings"
        )
    inv = meta.get("invocation_id")
    if inv is not None and not isinstance(inv, str):
        raise MalformedEntry("malformed entry: metadata 'invocation_id' must be a string")
    reply = meta.get("reply")
    if reply is not None and not (isinstance(reply, dict) and isinstance(inv, str)):
        raise MalformedEntry(
            "malformed entry: metadata 'reply' must be a map and needs an 'invocation_id'"
        )
    return Decoded(
        data=data, content_type=ct, headers=headers, invocation_id=inv, reply=reply, meta=meta
    )


def backoff_delay(deliveries: int, base_s: float, max_s: float) -> float:
    """Delay before delivery `deliveries + 1`: base, 2*base, 4*base, ... capped at max."""
    if deliveries < 1 or base_s <= 0:
        return 0.0
    return min(max_s, base_s * (2 ** min(deliveries - 1, 62)))


NOT_DELIVERED_ERRORS = frozenset({"overloaded", "no_capacity", "cold_start_failed"})


def not_delivered(status: int, error: str = "") -> bool:
    """True when the platform never handed the event to a handler: overload (429), unavailable
    (503) or an instance that failed to start. Such attempts are retried with backoff but do not
    count towards max_deliveries, so a platform outage does not dead-letter good events."""
    return status in (429, 503) or error in NOT_DELIVERED_ERRORS


def resource_exhausted(e: BaseException) -> bool:
    """The invoker ran out of a platform resource (shared-memory slots, memory) before the event
    reached a handler: back-pressure, not a failure of the event."""
    return isinstance(e, MemoryError) or any(c.__name__ == "PoolExhausted" for c in type(e).__mro__)


def failure(outcome: InvokeResult | BaseException) -> tuple[str | None, bool]:
    """How an invocation's outcome counts for its entry: (None, True) for a success, else the
    error text and whether the attempt counts towards max_deliveries (False when the event
    never reached a handler: back-pressure, a cold start that failed, no free slot)."""
    if isinstance(outcome, InvokeResult):
        return (None if outcome.ok else error_text(outcome.status, outcome.body)), True
    if isinstance(outcome, InvokeError):
        return f"status {outcome.status}: {outcome}", not not_delivered(
            outcome.status, outcome.error
        )
    return f"{type(outcome).__name__}: {outcome}", not resource_exhausted(outcome)


def dlq_name(stream: str, configured: str | None = None) -> str:
    return configured or stream + DLQ_SUFFIX


def default_group(function: str) -> str:
    return f"hearth-{function}"


def error_text(status: int, body: bytes, limit: int = 2000) -> str:
    """A handler failure as one readable line: `status 500: ValueError: bad input`."""
    detail = ""
    try:
        obj = json.loads(body) if body else None
        if isinstance(obj, dict) and ("error" in obj or "detail" in obj):
            detail = ": ".join(str(obj[k]) for k in ("error", "detail") if obj.get(k))
    except (ValueError, UnicodeDecodeError):
        pass
    if not detail:
        detail = bytes(body[:limit]).decode("utf-8", errors="replace")
    return f"status {status}: {detail}"[:limit]
