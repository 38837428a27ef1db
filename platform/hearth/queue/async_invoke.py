"""Asynchronous invocations on the queue machinery.

`enqueue_invocation` writes a pending result record and appends the request to the function's
internal stream ``hearth:fn:<name>:async``; the platform runs a StreamTriggerRunner on that stream
for every deployed function (`async_trigger`). The runner stores the outcome at
``hearth:result:<id>`` (a hash with a TTL) and POSTs it to the optional callback URL. The gateway
answers 202 + id and serves `GET /v1/invocations/{id}` from `get_invocation`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from hearth.invoke import QueueFull
from hearth.queue.wire import (
    MAX_EVENT_BYTES,
    InvalidPayload,
    check_body,
    encode_entry,
    validate_stream_name,
)
from hearth.spec import StreamTrigger

log = logging.getLogger("hearth.queue.async")

RESULT_PREFIX = "hearth:result:"
DEFAULT_RESULT_TTL = 3600
STATUSES = ("pending", "running", "succeeded", "failed")


def async_stream(function: str) -> str:
    return f"hearth:fn:{function}:async"


def result_key(invocation_id: str) -> str:
    return RESULT_PREFIX + invocation_id


def async_trigger(function: str, **overrides: Any) -> StreamTrigger:
    """The trigger the platform runs for a function's async invocations."""
    params: dict[str, Any] = {"stream": async_stream(function), "group": f"hearth-async-{function}"}
    params.update(overrides)
    return StreamTrigger(**params)


@dataclass
class Invocation:
    id: str
    function: str
    status: str  # pending | running | succeeded | failed
    http_status: int | None = None
    body: bytes = b""
    content_type: str | None = None
    error: str | None = None
    attempts: int = 0
    created_at: float | None = None
    updated_at: float | None = None
    callback_url: str | None = None
    callback: str | None = None  # delivered | failed: <reason> | None (no callback / not yet)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (body omitted: the gateway returns it raw with its content type)."""
        d = {k: v for k, v in self.__dict__.items() if k != "body"}
        d["body_bytes"] = len(self.body)
        return d


def _validate_callback(url: str | None) -> None:
    if url is None:
        return
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
        raise InvalidPayload(
            f"callback_url {url!r} is invalid: it must be an http:// or https:// URL of at most 2048 characters"
        )


async def enqueue_invocation(
    r: aioredis.Redis,
    function: str,
    payload: bytes | memoryview,
    content_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
    callback_url: str | None = None,
    ttl: int = DEFAULT_RESULT_TTL,
    *,
    max_bytes: int = MAX_EVENT_BYTES,
    invocation_id: str | None = None,
    max_backlog: int | None = None,
) -> str:
    """Queue one invocation; returns its id. The result record exists (status pending) before
    the request is visible to any consumer, so a poll right after 202 never gets a 404."""
    validate_stream_name(async_stream(function), allow_internal=True)
    if not isinstance(ttl, int) or ttl <= 0:
        raise InvalidPayload(f"ttl must be a positive number of seconds, got {ttl!r}")
    _validate_callback(callback_url)
    body = bytes(payload)
    ct = content_type or "application/octet-stream"
    check_body(body, ct, max_bytes)
    if max_backlog is not None:
        # acked entries are deleted (StreamTriggerRunner delete_acked), so the stream's length
        # is what waits or runs; the check and the XADD are not atomic: the cap is approximate
        backlog = await r.xlen(async_stream(function))
        if backlog >= max_backlog:
            raise QueueFull(function, backlog, max_backlog)
    inv = invocation_id or uuid.uuid4().hex
    reply: dict[str, Any] = {"ttl": ttl}
    if callback_url:
        reply["callback"] = callback_url
    fields = encode_entry(body, ct, headers=headers, invocation_id=inv, reply=reply)
    now = time.time()
    record = {
        "function": function,
        "status": "pending",
        "created_at": repr(now),
        "updated_at": repr(now),
        "attempts": "0",
    }
    if callback_url:
        record["callback_url"] = callback_url
    async with r.pipeline(transaction=True) as p:
        p.hset(result_key(inv), mapping=record)
        p.expire(result_key(inv), ttl)
        p.xadd(async_stream(function), fields)
        await p.execute()
    return inv


def _s(v: bytes | None) -> str | None:
    return v.decode("utf-8", errors="replace") if v is not None else None


def _parse(inv: str, h: dict[bytes, bytes]) -> Invocation:
    def num(k: bytes, cast: Any) -> Any:
        return cast(h[k]) if h.get(k) not in (None, b"") else None

    return Invocation(
        id=inv,
        function=_s(h.get(b"function")) or "",
        status=_s(h.get(b"status")) or "pending",
        http_status=num(b"http_status", int),
        body=h.get(b"body", b""),
        content_type=_s(h.get(b"content_type")),
        error=_s(h.get(b"error")),
        attempts=num(b"attempts", int) or 0,
        created_at=num(b"created_at", float),
        updated_at=num(b"updated_at", float),
        callback_url=_s(h.get(b"callback_url")),
        callback=_s(h.get(b"callback")),
    )


async def get_invocation(r: aioredis.Redis, invocation_id: str) -> Invocation | None:
    """The stored state of an invocation, or None if unknown or expired."""
    h = await r.hgetall(result_key(invocation_id))
    return _parse(invocation_id, h) if h else None


# --- used by the runner --------------------------------------------------------------------------


def _ttl(reply: dict[str, Any]) -> int:
    t = reply.get("ttl")
    return int(t) if isinstance(t, (int, float)) and t > 0 else DEFAULT_RESULT_TTL


def queue_mark_running(p: Any, inv: str, reply: dict[str, Any], attempt: int) -> None:
    k = result_key(inv)
    p.hset(
        k, mapping={"status": "running", "attempts": str(attempt), "updated_at": repr(time.time())}
    )
    p.expire(k, _ttl(reply))


def queue_store_result(
    p: Any,
    inv: str,
    reply: dict[str, Any],
    *,
    status: str,
    http_status: int | None,
    body: bytes,
    content_type: str | None,
    error: str | None,
    attempt: int,
) -> None:
    """Add the commands that store an outcome to pipeline `p` (so they commit with the XACK)."""
    k = result_key(inv)
    rec = {
        "status": status,
        "body": bytes(body),
        "attempts": str(attempt),
        "updated_at": repr(time.time()),
        "http_status": "" if http_status is None else str(http_status),
        "content_type": content_type or "",
        "error": error or "",
    }
    p.hset(k, mapping=rec)
    p.expire(k, _ttl(reply))


async def send_callback(
    session: Any,
    r: aioredis.Redis,
    inv: str,
    reply: dict[str, Any],
    function: str,
    *,
    status: str,
    http_status: int | None,
    body: bytes,
    content_type: str | None,
    error: str | None,
    attempts: int = 5,
    backoff_s: float = 0.2,
    timeout_s: float = 10.0,
) -> bool:
    """POST the outcome to reply['callback'] with retries (5xx, connection errors); the result
    hash records `callback = delivered | failed: <reason>`. Body = the function's response body;
    X-Hearth-* headers carry id, status and error."""
    import aiohttp

    url = reply.get("callback")
    if not url:
        return True
    headers = {
        "X-Hearth-Invocation-Id": inv,
        "X-Hearth-Function": function,
        "X-Hearth-Status": status,
        "Content-Type": content_type or "application/octet-stream",
    }
    if http_status is not None:
        headers["X-Hearth-Http-Status"] = str(http_status)
    if error:
        headers["X-Hearth-Error"] = error.replace("\r", " ").replace("\n", " ")[:1000]
    from hearth.queue.callbacks import CallbackRefused, check_url

    outcome = "failed: no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            check_url(url)  # IP literals; names are checked as they resolve (callbacks.session)
            async with session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,  # a redirect could point anywhere, internal included
            ) as resp:
                await resp.read()
                if resp.status < 300:
                    outcome = "delivered"
                    break
                outcome = f"failed: callback answered HTTP {resp.status}"
                if 300 <= resp.status < 500 and resp.status not in (408, 429):
                    break  # rejected or redirected (not followed); retrying will not help
        except CallbackRefused as e:
            outcome = f"failed: {e}"
            break
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            if isinstance(e.__cause__, CallbackRefused):  # raised by the guarded resolver
                outcome = f"failed: {e.__cause__}"
                break
            outcome = f"failed: {type(e).__name__}: {e}"
        if attempt < attempts:
            await asyncio.sleep(backoff_s * (2 ** (attempt - 1)))
    try:
        await r.hset(result_key(inv), "callback", outcome)
    except Exception as e:  # the result itself is stored; losing this note is not worth a crash
        log.warning("could not record callback outcome for %s: %s", inv, e)
    if outcome != "delivered":
        log.warning("callback for invocation %s to %s %s", inv, url, outcome)
    return outcome == "delivered"
