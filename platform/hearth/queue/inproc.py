"""An Invoker that runs Python handlers inside the calling process.

It implements the same `hearth.invoke.Invoker` contract as the node agent (SDK Event/Context in,
InvokeResult out, handler errors as status >= 400 with a JSON {error, detail} body), without
instance processes or shared memory. Used by the queue tests, benchmarks and chaos workers until
they run through the node agent, and handy for running a trigger against local code."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from hearth.invoke import InvokeResult, InvokeTimeout, UnknownFunction
from hearth.runtime.codec import encode_result
from hearth.sdk import Context, Event, HandlerError


def load_handler(entry: str) -> Callable[..., Any]:
    mod, _, name = entry.partition(":")
    return getattr(importlib.import_module(mod), name)


class InProcessInvoker:
    def __init__(
        self,
        handlers: dict[str, Callable[..., Any] | str],
        *,
        emit: Callable[..., Any] | None = None,
        threaded: bool = False,
    ):
        """`handlers`: function name -> callable or 'module:callable'. `emit(stream, data, meta)`
        is bound to Context.emit (e.g. functools.partial(emit_sync, redis_client)). `threaded`
        runs sync handlers in a worker thread instead of on the event loop."""
        self.handlers = {
            k: load_handler(v) if isinstance(v, str) else v for k, v in handlers.items()
        }
        self.emit = emit
        self.threaded = threaded
        self.instance_id = f"inproc-{uuid.uuid4().hex[:8]}"
        self.calls = 0

    async def invoke(
        self,
        function: str,
        payload: bytes | memoryview,
        *,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: float | None = None,
    ) -> InvokeResult:
        fn = self.handlers.get(function)
        if fn is None:
            raise UnknownFunction(function)
        self.calls += 1
        inv = invocation_id or uuid.uuid4().hex
        t0 = time.perf_counter()
        ctx = Context(
            function=function,
            instance_id=self.instance_id,
            invocation_id=inv,
            deadline=time.time() + (timeout or 30.0),
            idempotency_key=idempotency_key,
            _emit=self.emit,
        )
        headers = dict(headers or {})
        ev = Event(
            payload=memoryview(payload).toreadonly(),
            context=ctx,
            content_type=content_type,
            headers=headers,
        )
        try:
            if inspect.iscoroutinefunction(fn):
                out = await asyncio.wait_for(fn(ev), timeout) if timeout else await fn(ev)
            elif self.threaded:
                coro = asyncio.to_thread(fn, ev)
                out = await asyncio.wait_for(coro, timeout) if timeout else await coro
            else:
                out = fn(ev)
            status, ct, rh, body = encode_result(out, headers)
        except TimeoutError:
            raise InvokeTimeout(function, timeout or 0) from None
        except HandlerError as e:
            status, ct, rh = e.status, "application/json", {}
            body = json.dumps({"error": "handler_error", "detail": str(e)}).encode()
        except Exception as e:
            status, ct, rh = 500, "application/json", {}
            body = json.dumps({"error": type(e).__name__, "detail": str(e)}).encode()
        return InvokeResult(
            status=status,
            body=bytes(body),
            content_type=ct,
            headers=rh,
            instance_id=self.instance_id,
            invocation_id=inv,
            duration_s=time.perf_counter() - t0,
        )
