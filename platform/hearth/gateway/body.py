"""Reading and checking request bodies without letting one client hold memory or slots.

Why each rule exists:

- A body has a deadline: ``grace_s`` plus its length at ``min_rate`` bytes/s. A client that sends
  headers and then nothing (slowloris) is answered 408 when it passes; it never holds a slot
  meanwhile, because small bodies are read into memory first and only then copied into a slot.
- Large bodies stream straight into a slot of the one class that fits (``exact``), so small
  requests cannot take the few large slots.
- Every body being received counts against a per-client and a global limit on concurrent reads
  and a global budget of body bytes; past them the answer is 429/503 with ``Retry-After``. A
  body stops counting once it has arrived (bytes still held stay in the budget): what waits on
  a node or a function after that is bounded elsewhere, so a dead node or a slow function
  cannot turn into 429s for the client's next calls.
- Validation is bounded: small JSON/msgpack bodies are parsed on the loop, medium ones in a
  two-thread pool (so at most two parses hold their object graphs at once), large ones are not
  parsed at all (a parse costs 20-60x the body in heap); nesting too deep is a 400, not a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import msgpack
from aiohttp import web

from hearth.agent.invoker import SlotPayload
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import payload_offset
from hearth.runtime.codec import META_RESERVE
from hearth.sdk import JSON, MSGPACK

SMALL_BODY = 64 << 10  # read into memory before a slot is taken
VALIDATE_INLINE = 64 << 10  # parsed on the event loop
VALIDATE_MAX = 4 << 20  # parsed in the validation pool; larger bodies are passed on unparsed
_VALIDATORS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="body-validate")


class BodyRejected(Exception):
    """A body refused before it was read or while it was: an HTTP status and a JSON error."""

    def __init__(self, status: int, error: str, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.retry_after = status, error, detail, retry_after


@dataclass
class BodyLimits:
    """What the gateway lets clients hold while their bodies arrive (see the module docstring)."""

    max_body_bytes: int = 256 << 20
    grace_s: float = 10.0
    min_rate: int = 256 << 10  # bytes/s a body must average after the grace period
    per_client: int = 256  # bodies one client address may be sending at once
    total: int = 4096  # bodies being received at once, all clients
    inflight_bytes: int = 1 << 30  # declared body bytes being received at once
    clients: Counter = field(default_factory=Counter)
    active: int = 0
    bytes_in_flight: int = 0

    def deadline_for(self, n: int | None) -> float:
        n = self.max_body_bytes if n is None else n
        return time.monotonic() + self.grace_s + n / self.min_rate

    def check(self, client: str, n: int) -> None:
        """Raise what `admit` would (429 for this client, 503 for all), taking nothing."""
        if self.clients[client] >= self.per_client:
            raise BodyRejected(
                429,
                "too_many_requests",
                f"{self.per_client} request bodies from {client} are already being received",
                retry_after=1,
            )
        if self.active >= self.total or self.bytes_in_flight + n > self.inflight_bytes:
            raise BodyRejected(
                503,
                "busy",
                "the gateway is receiving as many request bodies as it allows; retry shortly",
                retry_after=1,
            )

    def admit(self, client: str, n: int) -> None:
        """Take a place for a body `client` is sending and `n` bytes of the budget."""
        self.check(client, n)
        self.clients[client] += 1
        self.active += 1
        self.bytes_in_flight += n

    def grow(self, n: int) -> None:
        """A body without Content-Length received `n` more bytes."""
        if self.bytes_in_flight + n > self.inflight_bytes:
            raise BodyRejected(
                503, "busy", "too many request body bytes in flight; retry shortly", retry_after=1
            )
        self.bytes_in_flight += n

    def done(self, client: str, n: int) -> None:
        """The body has been received (or refused): its place and its `n` bytes are free."""
        self.leave(client)
        self.bytes_in_flight -= n

    def leave(self, client: str) -> None:
        """Free the place only: the body has arrived, its bytes are still held (see BodyStream)."""
        self.clients[client] -= 1
        if self.clients[client] <= 0:
            del self.clients[client]
        self.active -= 1


async def read_body(
    request: web.Request, pool: SlotPool, limits: BodyLimits
) -> SlotPayload | bytes:
    """The request body: small ones and those without Content-Length as bytes, large ones in a
    slot. Raises BodyRejected (408, 413, 429, 503) or web.HTTPBadRequest."""
    n = request.content_length
    if n is not None and n <= SMALL_BODY:
        # the usual invoke: the body came with the headers. Nothing is being received, so
        # there is nothing to admit or time (a timer per request costs more than the read)
        head = request.content.read_nowait(n) if n else b""
        if len(head) == n:
            return head
    else:
        head = b""
    client = request.remote or "?"
    held = n or 0
    limits.admit(client, held)
    try:
        async with asyncio.timeout_at(loop_time(limits.deadline_for(n))):
            if n is None:
                data = bytearray()
                async for chunk in request.content.iter_chunked(1 << 20):
                    if len(data) + len(chunk) > limits.max_body_bytes:
                        raise BodyRejected(
                            413,
                            "payload_too_large",
                            f"body exceeds the limit of {limits.max_body_bytes} bytes",
                        )
                    limits.grow(len(chunk))
                    held += len(chunk)
                    data += chunk
                return bytes(data)
            if n <= SMALL_BODY:
                return await _read_rest(request, n, head)
            return await _read_into_slot(request, pool, n)
    except TimeoutError:
        raise late(limits) from None
    finally:
        limits.done(client, held)


class BodyStream:
    """A request body at the front gateway, under the same rules as `read_body`: at most
    `max_body_bytes` (413) by its deadline (408), refused at once (429/503) while its client
    or the gateway is at its limit.

    Its place counts only while the body is being received, never while the call waits for a
    node: a node that died silently (connects hang until their timeout) or a slow function must
    not turn into 429s for the client's next calls. So a small body (`SMALL_BODY`, known length,
    nearly every invocation) is read whole by `small()` before any node is asked, and its bytes
    stay counted in the gateway's byte budget until `close()`. A larger one, or one without a
    length, streams through `chunks()`, its place taken when the node starts taking it (after
    the connect) and freed when it ends; while a connect is pending it sits in the client's
    socket (aiohttp reads at most ~128 KiB of it ahead). `close()` (idempotent) frees whatever
    is still held."""

    def __init__(self, request: web.Request, limits: BodyLimits) -> None:
        self.request, self.limits = request, limits
        self.client = request.remote or "?"
        self.length = request.content_length
        limits.check(self.client, self.length or 0)
        self._deadline = limits.deadline_for(self.length)
        self._place = False  # holds a place among the bodies being received
        self._bytes = 0  # bytes counted in the budget

    async def small(self) -> bytes | None:
        """The whole body if it is small (read now), else None: pass `chunks()` on instead."""
        if self.length is None or self.length > SMALL_BODY:
            return None
        self._admit(self.length)
        try:
            async with asyncio.timeout_at(loop_time(self._deadline)):
                return await _read_rest(self.request, self.length, b"")
        except TimeoutError:
            raise late(self.limits) from None
        finally:
            self._leave()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive; BodyRejected is raised from here while the
        consumer (an HTTP client sending it to a node) pulls them."""
        lim, total = self.limits, 0
        self._admit(self.length or 0)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(loop_time(self._deadline)):
                        chunk = await self.request.content.readany()
                except TimeoutError:
                    raise late(lim) from None
                if not chunk:
                    return
                total += len(chunk)
                if total > lim.max_body_bytes:
                    raise BodyRejected(
                        413,
                        "payload_too_large",
                        f"body exceeds the limit of {lim.max_body_bytes} bytes",
                    )
                yield chunk
        finally:
            self.close()

    def _admit(self, n: int) -> None:
        if not self._place:
            self.limits.admit(self.client, n)
            self._place, self._bytes = True, n

    def _leave(self) -> None:
        if self._place:
            self._place = False
            self.limits.leave(self.client)

    def close(self) -> None:
        self._leave()
        self.limits.bytes_in_flight -= self._bytes
        self._bytes = 0


def late(limits: BodyLimits) -> BodyRejected:
    return BodyRejected(
        408,
        "request_timeout",
        f"the body did not arrive in time (at least {limits.min_rate} bytes/s after "
        f"{limits.grace_s:g}s)",
    )


def loop_time(deadline_monotonic: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline_monotonic - time.monotonic())


async def _read_rest(request: web.Request, n: int, head: bytes) -> bytes:
    """The `n` bytes of a body of which `head` has arrived."""
    content = request.content
    parts = [head]
    got = len(head)
    while got < n:
        chunk = await content.read(n - got)
        if not chunk:
            raise web.HTTPBadRequest(text=f"body ended after {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def _read_into_slot(request: web.Request, pool: SlotPool, n: int) -> SlotPayload:
    off = payload_offset(META_RESERVE)
    slot = pool.alloc(off + max(n, 1), exact=True)
    pos = off
    content = request.content
    try:
        while pos - off < n:
            chunk = content.read_nowait() or await content.readany()
            if not chunk:
                break
            if pos + len(chunk) > off + n:
                raise web.HTTPBadRequest(text="body longer than its Content-Length")
            slot.buf[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        if pos - off != n:
            raise web.HTTPBadRequest(text=f"body ended after {pos - off} of {n} bytes")
    except BaseException:
        pool.release(slot.index, slot.gen)
        raise
    return SlotPayload(slot=slot, offset=off, length=n)


def _parse(kind: str, body: memoryview | bytes) -> str | None:
    try:
        if kind == "json":
            json.loads(bytes(body))
        else:
            msgpack.unpackb(body, raw=False)
    except RecursionError:
        return f"body is not valid {kind}: nested too deeply"
    except (ValueError, UnicodeDecodeError) as e:
        return f"body is not valid {'JSON' if kind == 'json' else 'msgpack'}: {e}"
    except Exception as e:  # msgpack raises several types
        return f"body is not valid msgpack: {type(e).__name__}: {e}"
    return None


def _kind(ctype: str) -> str | None:
    """The format a body of this content type must parse as: "json", "msgpack" or None."""
    ct = ctype.split(";")[0].strip().lower()
    if ct == JSON or ct.endswith("+json"):
        return "json"
    if ct in (MSGPACK, "application/x-msgpack"):
        return "msgpack"
    return None


async def validate_body(ctype: str, body: memoryview | bytes) -> str | None:
    """JSON and msgpack bodies must parse (up to VALIDATE_MAX bytes); returns the problem or None."""
    kind = _kind(ctype)
    n = len(body)
    if kind is None or n == 0 or n > VALIDATE_MAX:
        return None
    if n <= VALIDATE_INLINE:
        return _parse(kind, body)
    return await asyncio.get_running_loop().run_in_executor(_VALIDATORS, _parse, kind, body)


#: the usual content types, cached for good: a client cycling through many types would
#: otherwise push them out of the cache for every other client
_PINNED = (
    "application/json",
    "application/json; charset=utf-8",
    "application/msgpack",
    "application/x-msgpack",
    "application/octet-stream",
    "text/plain",
    "text/plain; charset=utf-8",
)
#: `_kind` of the content types seen on the warm path: a dict lookup, not five calls (#19). The
#: `_PINNED` ones, then the last of the others up to KINDS_MAX in all: a type not cached takes
#: the place of the other cached first, so a client sending a new type on every call keeps the
#: cache at its bound without keeping the types seen later out of it (until 7 Dec 2026 the
#: first 64 stayed for good, and every later one paid the five calls on each request); a hit
#: costs what it did
_KINDS: dict[str, str | None] = {t: _kind(t) for t in _PINNED}
KINDS_MAX = 64


def validate_small(ctype: str, body: bytes) -> str | None:
    """`validate_body` for a body of at most VALIDATE_INLINE bytes, here and now (no await)."""
    assert len(body) <= VALIDATE_INLINE
    if not body:
        return None
    kind = _KINDS.get(ctype, "")
    if kind == "":
        kind = _kind(ctype)
        if len(_KINDS) >= KINDS_MAX:
            # the oldest after the pinned ones (dicts keep insertion order)
            del _KINDS[next(islice(_KINDS, len(_PINNED), None))]
        _KINDS[ctype] = kind
    return None if kind is None else _parse(kind, body)
