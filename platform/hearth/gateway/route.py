"""The invoke route's decisions, in one place for both ways a request reaches them.

Why: `POST /v1/functions/{name}:invoke` is served by aiohttp's handler (`gateway.app.invoke`)
and, for the simple warm call, by the gateway's own lean HTTP path (`gateway.fastpath`), which
answers without aiohttp's request and response objects. Both must answer the same request the
same way, so every rule lives here and each path only carries bytes in and out:

- `admit`: the wait bound since the gateway read the request (503 + Retry-After), the token
  rule (an unknown name answers like a token-protected function: 401 before a token, 403 for a
  wrong one, 404 for the admin token only), the body limit (413), and admission (429 +
  Retry-After before any body is read);
- `passed_headers`: which request headers reach the function;
- `call`: the invocation itself, its errors as JSON and the X-Hearth-* response headers.

`checked` (the body's validation) sits between them. An `Answer` (`gateway.answer`) is what to
send: a status, headers (Content-Type included) and the body bytes.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from hearth.agent.table import FunctionState
from hearth.gateway.answer import Answer, overloaded
from hearth.gateway.body import BodyRejected, validate_body, validate_small
from hearth.gateway.sojourn import over_wait, waited
from hearth.invoke import InvokeError, InvokeResult
from hearth.node import NodeAgent, SlotPayload

log = logging.getLogger("hearth.gateway")

#: request headers never passed to a function (hop-by-hop, or credentials)
HOP_HEADERS = frozenset(
    {"authorization", "cookie", "host", "content-length", "transfer-encoding", "connection"}
)


def bearer(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def same(got: str, want: str) -> bool:
    """Constant-time token comparison; header bytes that are not UTF-8 arrive surrogate-escaped
    and simply do not match (never a 500)."""
    return hmac.compare_digest(
        got.encode("utf-8", "surrogateescape"), want.encode("utf-8", "surrogateescape")
    )


def clean(v: str) -> str:
    """Header bytes that are not UTF-8 arrive surrogate-escaped; keep them as visible text."""
    return v if v.isascii() else v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def passed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers a function sees: lower-case names, no hop-by-hop or credentials."""
    out = {}
    for k, v in headers.items():
        k = k.lower()
        if k not in HOP_HEADERS:
            out[k if k.isascii() else clean(k)] = v if v.isascii() else clean(v)
    return out


def _header_ok(k: str, v: str) -> bool:
    """A reply header a client can be sent: no line breaks (they would split the response)."""
    return (
        bool(k)
        and ":" not in k
        and "\r" not in k
        and "\n" not in k
        and "\0" not in k
        and "\r" not in v
        and "\n" not in v
        and "\0" not in v
    )  # spelled out, not a generator: it runs on every warm call's reply (#19)


class InvokeRoute:
    """The decisions of `POST /v1/functions/{name}:invoke` (see the module docstring)."""

    def __init__(self, agent: NodeAgent, admin_token: str, limit: int) -> None:
        self.agent = agent
        self.admin_token = admin_token
        self.limit = limit  # largest body accepted (HEARTH_MAX_BODY_BYTES)

    def admit(
        self,
        name: str,
        headers: Mapping[str, str],
        length: int | None,
        received_at: float | None,
        is_async: bool,
    ) -> Answer | None:
        """The refusal a request gets before its body is read, or None to go on."""
        agent = self.agent
        max_wait = agent.admitter.max_queue_wait_s
        if max_wait:
            # waited past the node's bound since the gateway read it: 503 now (gateway.sojourn)
            now = time.monotonic()
            if over_wait(received_at, now, max_wait):
                agent.metrics.rejected.labels("overloaded").inc()
                return overloaded(
                    f"the request waited {waited(received_at, now) * 1000:.0f} ms in the gateway "
                    f"(limit {max_wait * 1000:.0f} ms): retry later"
                )
        fs = agent.functions.get(name)
        refused = self._token_refusal(name, fs, headers)
        if refused is not None:
            return refused
        if length is not None and length > self.limit:
            agent.metrics.rejected.labels("too_large").inc()
            return Answer.error(
                413,
                "payload_too_large",
                f"body of {length} bytes exceeds the limit of {self.limit} bytes",
            )
        # a synchronous call the function cannot take now: 429 before any body read, slot or parse
        full = None if is_async else agent.admitter.refusal(fs)  # type: ignore[arg-type]
        if full is not None:
            agent.metrics.rejected.labels("overloaded").inc()
            return Answer.error(full.status, full.error, full.detail, {"Retry-After": "1"})
        return None

    def _token_refusal(
        self, name: str, fs: FunctionState | None, headers: Mapping[str, str]
    ) -> Answer | None:
        """The token rule: 401/403 (404 for the admin token only), or None to go on. Counts
        nothing: `start` asks it too."""
        if fs is not None and not fs.spec.invoke_token:
            return None
        # An unknown name answers like a token-protected function until the caller proves a
        # token, so names cannot be enumerated; the admin token may learn that it is unknown.
        got = bearer(headers)
        if got is None:
            return Answer.error(
                401,
                "unauthorized",
                f"function {name!r} needs 'Authorization: Bearer <invoke token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if fs is None:
            if same(got, self.admin_token):
                return Answer.error(
                    404, "unknown_function", f"no function named {name!r} is deployed"
                )
            return Answer.error(403, "forbidden", "the invoke token is not valid")
        if not (same(got, fs.spec.invoke_token or "") or same(got, self.admin_token)):
            return Answer.error(403, "forbidden", "the invoke token is not valid")
        return None

    def body_refused(self, e: BodyRejected) -> Answer:
        """A body refused while it was read (408, 413, 429, 503), counted."""
        self.agent.metrics.rejected.labels(e.error).inc()
        retry = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return Answer.error(e.status, e.error, e.detail, retry)

    async def checked(self, ctype: str, payload: SlotPayload | bytes) -> Answer | None:
        """400 for a JSON or msgpack body that does not parse (its slot freed), else None."""
        view = (
            payload.slot.buf[payload.offset : payload.offset + payload.length]
            if isinstance(payload, SlotPayload)
            else payload
        )
        try:
            problem = await validate_body(ctype, view)
        finally:
            del view
        if not problem:
            return None
        if isinstance(payload, SlotPayload):
            self.agent.pool.release(payload.slot.index, payload.slot.gen)
        return Answer.error(400, "malformed_body", problem)

    def start(
        self,
        name: str,
        headers: Mapping[str, str],
        body: bytes,
        received_at: float | None,
        done: Callable[[Answer], None],
    ) -> bool:
        """`admit`, `checked` and `call` at once, for a complete small request whose function
        has an instance free now (`NodeAgent.start_call`): the call is started here, with no
        task and no wait, and its Answer goes to `done` (exactly once, later, on the loop).

        False, with nothing done or counted, whenever any rule would answer otherwise (the
        wait bound, the token rule, 413, 400) or the call would wait for an instance: the
        request then takes the way through `admit`, `checked` and `call`, which gives it that
        answer or waits. So a request gets the same answer either way."""
        agent = self.agent
        max_wait = agent.admitter.max_queue_wait_s
        if max_wait and over_wait(received_at, time.monotonic(), max_wait):
            return False
        fs = agent.table.functions.get(name)  # (`agent.functions`, without its property call)
        if fs is None or len(body) > self.limit:
            return False
        if fs.spec.invoke_token and self._token_refusal(name, fs, headers) is not None:
            return False
        ctype = headers.get("Content-Type", "application/octet-stream")
        if validate_small(ctype, body) is not None:
            return False

        def answered(res: InvokeResult | InvokeError) -> None:
            try:
                a = self.answer(name, res)
            except Exception as e:  # the 500 the task path gives (its handler catches it)
                log.exception("unhandled error on POST /v1/functions/%s:invoke", name)
                a = Answer.error(500, "internal_error", f"{type(e).__name__}: {e}")
            done(a)

        return agent.start_call(
            name,
            body,
            done=answered,
            content_type=ctype,
            headers=passed_headers(headers),
        )

    async def call(
        self,
        name: str,
        payload: SlotPayload | bytes,
        ctype: str,
        headers: dict[str, str],
        timeout: float | None,
        received_at: float | None,
    ) -> Answer:
        """Invoke the function; its reply, or the invocation's error, as an Answer."""
        try:
            res = await self.agent.invoke(
                name,
                payload,
                content_type=ctype,
                headers=headers,
                timeout=timeout,
                received_at=received_at,
            )
        except InvokeError as e:
            return self.answer(name, e)
        return self.answer(name, res)

    def call_remote(
        self,
        name: str,
        body: bytes,
        ctype: str,
        headers: dict[str, str],
        timeout: float | None,
        done: Callable[[Answer], None],
    ) -> bool:
        """`call` of a function hosted on another node, without a task: `done` gets the answer
        from the callback that settles the forwarded call (its reply frame, its deadline, its
        link failing). False, nothing started, when it runs here or would wait: then `call`."""

        def answered(res: InvokeResult | InvokeError) -> None:
            try:
                a = self.answer(name, res)
            except Exception as e:  # a bug: 500 as JSON, as the handlers answer one
                log.exception("unhandled error answering POST /v1/functions/%s:invoke", name)
                a = Answer.error(500, "internal_error", f"{type(e).__name__}: {e}")
            done(a)

        return self.agent.forward_now(
            name, body, content_type=ctype, headers=headers, timeout=timeout, done=answered
        )

    def answer(self, name: str, res: InvokeResult | InvokeError) -> Answer:
        """What the client gets for an invocation's outcome: its error as JSON, or the
        function's reply with the X-Hearth-* headers (statuses outside 200-599 refused)."""
        if isinstance(res, InvokeError):
            retry = {"Retry-After": str(res.retry_after)} if res.retry_after else None
            return Answer.error(res.status, res.error, res.detail, retry)
        if not 200 <= res.status <= 599:
            # 1xx is an interim answer: sent as the final one, the client would take the next
            # response for this call's (and a status past 599 is no HTTP status at all)
            return Answer.error(
                502, "bad_reply", f"function {name!r} answered status {res.status} (200-599 only)"
            )
        out: dict[str, Any] = {
            "X-Hearth-Invocation": res.invocation_id,
            "X-Hearth-Instance": res.instance_id,
            "X-Hearth-Node": self.agent.node,
            "X-Hearth-Cold": "1" if res.cold else "0",
            "X-Hearth-Duration": f"{res.duration_s:.6f}",
        }
        for k, v in res.headers.items():
            kl = k.lower()
            if kl not in HOP_HEADERS and kl != "content-type":
                v = str(v)
                if _header_ok(k, v):
                    out[k] = v
        out["Content-Type"] = res.content_type if _header_ok("t", res.content_type) else ""
        return Answer(res.status, out, res.body)
