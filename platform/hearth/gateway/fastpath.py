"""The node gateway's lean HTTP path for the warm invoke (issue #19), and its cheap refusal (#16).

Why: a warm no-op invoke spent more of the agent's time in aiohttp (a request object, a task to
read it, a task to handle it, the router, middlewares, a response object and its writer) than in
Hearth. So each connection's protocol (`FastTap`, which also stamps every read for the wait
bound, see `gateway.sojourn`) recognises the simple invoke itself, answers it with bytes it
writes straight to the transport, and hands everything else to aiohttp's protocol, which sits
beside it from the connection's start.

What the fast path takes (`gateway.httphead.parse_head`), and only that: `POST /v1/functions/{name}:invoke`
over HTTP/1.1 with no query string, a head of at most `MAX_HEAD` bytes whose every line is a
plain `token: value` (no control characters, no repeated name), a `Content-Length` of at most
`SMALL_BODY`, one Host, and none of Transfer-Encoding, Expect, Upgrade, Prefer or a Connection other
than keep-alive or close (answered, then closed). Anything else (other routes, async calls,
chunked or large bodies, malformed heads, bare-LF line ends, HTTP/1.0) goes to aiohttp with every byte buffered so
far, and the connection stays aiohttp's from then on: its parser, header limits, body deadlines
and in-flight limits (`gateway.body`) judge it exactly as before. A small body that did not come
with its head (http.client sends a body in a second write) is awaited under the same rules as
on aiohttp's path (`FastTap._body`: a place among the bodies being received, per client and in
all, and a deadline); it never holds a slot while it arrives.

Every decision is `gateway.route`'s, shared with aiohttp's handler: the same request gets the
same answer on either path. A complete request whose function has an instance free right now,
and which every rule lets through, is started from the read itself (`InvokeRoute.start`, then
`Invoker.start_call`): no task, no coroutine, and its answer is written from the data plane's
reply callback (counted in `hearth_gateway_fast_path_direct`). Any other request is served in a
task, one loop turn after its read like aiohttp's handler, so the wait bound (counted from the
read) sees that turn: one that waited past it is answered 503. Responses go out in request
order, and while one is served further requests on the connection wait in its buffer (reading
pauses past `PIPELINE_MAX` bytes, and while the client does not read its responses).

The cheap refusal: while the node sheds on loop lag (`gateway.shed`), an invoke is answered
503 `overloaded` + Retry-After from the read itself, without a task or any aiohttp object:
the refusal costs a fraction of a served call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from aiohttp import web

from hearth.gateway.answer import Answer, overloaded
from hearth.gateway.body import SMALL_BODY, BodyLimits, BodyRejected, late, loop_time
from hearth.gateway.httphead import MAX_HEAD, MORE, OTHER, Request, parse_head
from hearth.gateway.httpresponse import encode
from hearth.gateway.route import InvokeRoute, passed_headers
from hearth.gateway.shed import LATE_TICKS, LoopLag, lag_detail
from hearth.gateway.sojourn import ReadStamps

log = logging.getLogger("hearth.gateway")

BUSY_S = 2 * 86_400.0  # longer than any call's timeout and start budget
PIPELINE_MAX = MAX_HEAD + SMALL_BODY  # buffered while a request is served; then reading pauses


def _bug(req: Request, e: Exception) -> Answer:
    """A bug while serving: 500 as JSON, logged; the connection keeps serving (as aiohttp's)."""
    log.exception("unhandled error on POST /v1/functions/%s:invoke", req.name)
    return Answer.error(500, "internal_error", f"{type(e).__name__}: {e}")


class FastPath:
    """The node gateway's fast path: its route, its lag shedding, its calls in flight."""

    def __init__(
        self,
        route: InvokeRoute,
        limits: BodyLimits,
        lag: LoopLag | None,
        on_shed: Callable[[], None],
    ) -> None:
        self.route, self.limits, self.lag, self.on_shed = route, limits, lag, on_shed
        self.served = route.agent.metrics.fast_path  # requests taken here (shed ones too)
        self.direct = route.agent.metrics.fast_path_direct  # ...of which started with no task
        self.inflight: set[asyncio.Task] = set()  # requests served in a task...
        self.started = 0  # ...and without one (`FastTap._start`), in flight
        self._idle: asyncio.Future | None = None  # set when `started` drops to 0 (shutdown)
        self.closing = False  # shutting down: every new request goes to aiohttp

    def tap(self) -> Callable[[asyncio.Protocol, ReadStamps], FastTap]:
        """The app's `TAP`: each connection's protocol made with no Python frame between
        (a partial, not a method: one call fewer per connection, #19)."""
        return functools.partial(FastTap, fast=self)

    async def drain(self, _app: web.Application | None = None) -> None:
        """Let calls in flight answer before aiohttp closes the connections (app.on_shutdown)."""
        self.closing = True
        waits: set[asyncio.Future] = set(self.inflight)
        if self.started:
            self._idle = asyncio.get_running_loop().create_future()
            waits.add(self._idle)
        if waits:
            await asyncio.wait(waits, timeout=60)

    def ended(self) -> None:
        """A call started without a task has answered."""
        self.started -= 1
        if not self.started and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def shed(self, close: bool) -> bytes | None:
        """The 503 to send instead of serving an invoke while the loop lags, else None."""
        lag = self.lag
        # with fewer than LATE_TICKS - 1 late ticks in a row (the one overdue now would add one)
        # `sheds` says no whatever the clock: answered here, two calls and a clock read fewer
        # on every request (#19; exact: test_shed_precheck.py)
        if lag is None or lag.state.late_ticks < LATE_TICKS - 1 or not lag.sheds():
            return None
        lag.state.shed += 1
        self.on_shed()
        return encode(overloaded(lag_detail(lag)), close)


class FastTap(asyncio.Protocol):
    """One connection: simple invokes served here, the rest by aiohttp's protocol `inner`."""

    __slots__ = (
        "_inner",
        "_stamps",
        "_fast",
        "_t",
        "_buf",
        "_busy",
        "_other",
        "_paused",
        "_want",
        "_more",
        "_ka",
    )

    def __init__(self, inner: asyncio.Protocol, stamps: ReadStamps, fast: FastPath) -> None:
        self._inner, self._stamps, self._fast = inner, stamps, fast
        self._t: asyncio.Transport | None = None
        self._buf = b""  # bytes read and not yet taken by a request
        self._busy = False  # a request of this connection is being served
        self._other = False  # the connection is aiohttp's
        self._paused = 0  # bit 1: the client is not reading (pause_writing); bit 2: we paused
        self._want = 0  # body bytes awaited in the buffer...
        self._more: asyncio.Future | None = None  # ...set once they are there (or the end)
        self._ka: float | None = None  # aiohttp's keep-alive timeout (see `_keep`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]
        inner = self._inner
        if hasattr(inner, "_next_keepalive_close_time"):  # fixed for the protocol's life
            self._ka = inner.keepalive_timeout  # type: ignore[attr-defined]
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._stamps.at[self._inner] = time.monotonic()
        if self._other:
            self._inner.data_received(data)
            return
        self._buf = self._buf + data if self._buf else data
        more = self._more
        if more is not None and len(self._buf) >= self._want and not more.done():
            more.set_result(None)
        if self._busy or self._paused & 1:
            self._hold()
            return
        self._next()

    def _hold(self) -> None:
        """Stop reading while the buffer holds more than `PIPELINE_MAX` that cannot be served
        now (a call in progress, or answers the client does not read); resumed when they flow."""
        if len(self._buf) > PIPELINE_MAX and not self._paused & 2:
            self._paused |= 2
            self._t.pause_reading()  # type: ignore[union-attr]

    def _next(self) -> None:
        """Serve the next request in the buffer, or hand the connection to aiohttp."""
        fast = self._fast
        while self._buf:
            req = OTHER if fast.closing else parse_head(self._buf)
            if req is MORE:
                return
            if req is OTHER:
                self._delegate()
                return
            assert isinstance(req, Request)
            self._buf = self._buf[req.end :]
            fast.served.n += 1
            refusal = fast.shed(req.close)
            if refusal is None:
                self._busy = True
                self._keep(BUSY_S)  # aiohttp's idle timer must not close it meanwhile
                received_at = self._stamps.at.get(self._inner)
                started = self._start(req, received_at) if req.body is not None else False
                if started is None:
                    continue  # answered at once: the next one, in this loop (no recursion)
                if started:
                    return
                task = asyncio.get_running_loop().create_task(self._serve(req, received_at))
                fast.inflight.add(task)
                task.add_done_callback(fast.inflight.discard)
                return
            self._write(refusal, req.close)  # and a pipelined request behind it is judged too
            if req.close:
                return
            if self._paused & 1:  # the client does not read its answers: refusals wait too
                self._hold()  # (a 503 is ~4x the smallest invoke: one read's worth of refusals
                return  # would otherwise pile up in the transport; resume_writing goes on)

    async def _serve(self, req: Request, received_at: float | None) -> None:
        route = self._fast.route
        try:
            answer = route.admit(req.name, req.headers, req.length, received_at, False)
            if answer is None and req.body is None:
                got = await self._body(req.length)
                if isinstance(got, Answer):
                    answer = got
                else:
                    req.body = got
                    # whole now: started as one read whole with its head is (`_start`), if
                    # nothing has to wait; else on through `checked` and `call` below (and
                    # while shutting down: `drain` waits for this task, not for that call)
                    started = False if self._fast.closing else self._start(req, received_at)
                    if started is None:
                        self._next()  # answered at once (a bug's 500)
                    if started is not False:
                        return
            if req.body is None:
                req.close = True  # refused before its body: the body's bytes are not a request
            if answer is None:
                ctype = req.headers.get("Content-Type", "application/octet-stream")
                answer = await route.checked(ctype, req.body)
                if answer is None:
                    headers = passed_headers(req.headers)
                    if self._remote(req, ctype, headers):
                        return  # answered from the forwarded call's callback
                    answer = await route.call(req.name, req.body, ctype, headers, None, received_at)
        except Exception as e:  # a bug: answer 500 as JSON, keep serving (as aiohttp's path)
            answer = _bug(req, e)
        self._finish(req, answer)

    def _remote(self, req: Request, ctype: str, headers: dict[str, str]) -> bool:
        """Forward a call of a function hosted on another node without waiting in this task
        (a request `_start` could not take: its body came after its head): the link's callback
        that settles it (reply, deadline, link failure) writes the answer and serves the next
        request, a loop pass sooner than resuming here (#14)."""
        fast = self._fast
        ended = False

        def done(answer: Answer) -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            fast.ended()
            self._finish(req, answer)

        assert req.body is not None
        if not fast.route.call_remote(req.name, req.body, ctype, headers, None, done):
            return False
        fast.started += 1
        return True

    def _start(self, req: Request, received_at: float | None) -> bool | None:
        """Serve a complete request with no task (`InvokeRoute.start`: a warm call that waits
        for nothing, started from this read; its answer is written from the data plane's
        reply callback). False: the request takes `_serve`'s task. None: it was answered here
        and now (a bug's 500) and the next request may be read: `_next` goes on in its loop
        (answering through `_finish`, which calls `_next`, recursed once per request)."""
        fast = self._fast
        ended = False

        def done(answer: Answer) -> None:
            nonlocal ended
            if ended:  # (the invoker calls it once; a second answer would corrupt the stream)
                return
            ended = True
            fast.ended()
            self._finish(req, answer)

        try:
            started = fast.route.start(req.name, req.headers, req.body, received_at, done)
        except Exception as e:  # a bug: as `_serve`'s (nothing was started)
            return None if self._answered(req, _bug(req, e)) else True
        if started:
            fast.started += 1
            fast.direct.n += 1
        return started

    def _finish(self, req: Request, answer: Answer) -> None:
        """Send a request's answer, then serve the next one in the buffer."""
        if self._answered(req, answer):
            self._next()

    def _answered(self, req: Request, answer: Answer) -> bool:
        """Send a request's answer; whether the next request in the buffer may be served now."""
        self._write(encode(answer, req.close), req.close)
        if req.close or self._t is None:
            return False  # nothing more is read on this connection
        self._busy = False
        if self._paused & 2:
            self._paused &= ~2
            self._t.resume_reading()  # type: ignore[union-attr]
        return not self._paused & 1

    async def _body(self, n: int) -> bytes | Answer:
        """The `n` bytes of a small body that did not come with its head, under the same rules
        as on aiohttp's path (`gateway.body.read_body`): a place among the bodies being received
        (per client and in all: 429/503 at once) and a deadline (408); or the refusal."""
        fast = self._fast
        limits, route = fast.limits, fast.route
        peer = self._t.get_extra_info("peername") if self._t is not None else None
        client = peer[0] if isinstance(peer, tuple) else "?"
        try:
            limits.admit(client, n)
        except BodyRejected as e:
            return route.body_refused(e)
        try:
            if len(self._buf) < n:
                self._want, self._more = n, asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout_at(loop_time(limits.deadline_for(n))):
                        await self._more
                except TimeoutError:
                    return route.body_refused(late(limits))
                finally:
                    self._more = None
            if len(self._buf) < n:  # the connection ended first
                return Answer.error(
                    400, "http_error", f"body ended after {len(self._buf)} of {n} bytes"
                )
            body, self._buf = self._buf[:n], self._buf[n:]
            return body
        finally:
            limits.done(client, n)

    def _write(self, data: bytes, close: bool = False) -> None:
        t = self._t
        if t is not None and not t.is_closing():
            t.write(data)
            if close:
                self._buf, self._busy = b"", True  # whatever follows is not read
                t.close()  # once the answer is sent
                return
            self._keep(0.0)

    def _keep(self, busy_s: float) -> None:
        """Re-arm aiohttp's idle timer (it closes a connection whose protocol waits for a
        request longer than `keepalive_timeout`, and sees none of the fast path's): it counts
        from the last answer, as for its own, and not while a call is being served."""
        ka = self._ka
        if ka is not None:
            # aiohttp's protocol holds its loop: asking asyncio costs a getpid() per call
            inner = self._inner
            t = inner._loop.time() + ka + busy_s  # type: ignore[attr-defined]
            inner._next_keepalive_close_time = t  # type: ignore[attr-defined]

    def _delegate(self) -> None:
        self._other = True
        data, self._buf = self._buf, b""
        if self._paused & 2:
            self._paused &= ~2
            self._t.resume_reading()  # type: ignore[union-attr]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stamps.at.pop(self._inner, None)
        self._t = None
        if self._more is not None and not self._more.done():
            self._more.set_result(None)  # a body being awaited never comes
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused |= 1
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._paused &= ~1
        self._inner.resume_writing()
        if not self._busy and not self._other:
            if self._paused & 2:  # no call to resume reads when it ends: the buffer may hold
                self._paused &= ~2  # only refusals (shed) or a part of a head
                self._t.resume_reading()  # type: ignore[union-attr]
            self._next()
