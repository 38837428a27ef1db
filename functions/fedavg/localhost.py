"""Run the aggregator *handlers* in this process, wired by their specs: a stand-in for the
platform runtime (same ``hearth.sdk`` Event/Context, same result encoding), used by the handler
tests and the CLI tests' loopback gateway (``/v1/functions/<name>:invoke``).

Chaining passes the partial's memoryview straight to the parent handler (in-process: zero copy).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from hearth.functions.fedavg import handlers
from hearth.invoke import InvokeResult
from hearth.runtime.codec import encode_result
from hearth.sdk import OCTET, Context, Event, HandlerError
from hearth.spec import FunctionSpec


class LocalHost:
    def __init__(self, specs: list[FunctionSpec]):
        self.specs = {s.name: s for s in specs}
        self.calls: list[str] = []
        self.edges: list[tuple[str, str]] = []  # (caller, callee) of chained invocations
        for s in specs:
            handlers.ROLE_ENV[s.name] = dict(s.env)

    def close(self) -> None:
        for name in self.specs:
            handlers.ROLE_ENV.pop(name, None)
            handlers.STATE.pop(name, None)
            for item in filter(None, self.specs[name].env.get("FEDAVG_HOSTS", "").split(";")):
                handlers.STATE.pop(item.split(":")[0], None)

    def _chain(self, caller: str, function: str, payload: Any, ct: str) -> InvokeResult:
        self.edges.append((caller, function))
        return self.invoke(function, payload, ct)

    def invoke(
        self,
        function: str,
        payload: Any,
        content_type: str = OCTET,
        headers: dict[str, str] | None = None,
    ) -> InvokeResult:
        spec = self.specs.get(function)
        if spec is None:
            return InvokeResult(
                404,
                json.dumps(
                    {"error": "not_found", "detail": f"function {function!r} is not deployed"}
                ).encode(),
                "application/json",
            )
        mod, _, attr = spec.handler.partition(":")
        fn = getattr(handlers, attr)
        ctx = Context(
            function=function,
            instance_id=f"{function}-0",
            invocation_id=uuid.uuid4().hex,
            deadline=time.time() + spec.timeout_s,
        )
        ctx._invoke = lambda f, p, ct, tok=None: self._chain(function, f, p, ct)
        mv = payload if isinstance(payload, memoryview) else memoryview(payload)
        event = Event(
            payload=mv.toreadonly(),
            context=ctx,
            content_type=content_type,
            headers=dict(headers or {}),
        )
        self.calls.append(function)
        t0 = time.perf_counter()
        try:
            status, ctype, hdrs, body = encode_result(fn(event), event.headers)
        except HandlerError as e:
            status, ctype, hdrs = e.status, "application/json", {}
            body = json.dumps({"error": "handler_error", "detail": str(e)}).encode()
        return InvokeResult(
            status,
            body if isinstance(body, bytes) else bytes(body),
            ctype,
            hdrs,
            instance_id=ctx.instance_id,
            duration_s=time.perf_counter() - t0,
        )
