"""The one invocation interface every trigger uses (HTTP gateway, Redis stream trigger, replay,
chaining): `await invoker.invoke(function, payload, ...)` -> InvokeResult. The node agent implements
it over the shared-memory data plane."""

from __future__ import annotations

from hearth.records import Record

TYPE_CHECKING = False  # no typing import on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

    from hearth.contract import Invoker


class InvokeError(Exception):
    """An invocation that could not be carried out; `status` is the HTTP status to report."""

    def __init__(self, status: int, error: str, detail: str = "", retry_after: int | None = None):
        super().__init__(f"{error}: {detail}" if detail else error)
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after = retry_after  # seconds, for back-pressure answers (429/503)


class UnknownFunction(InvokeError):
    def __init__(self, name: str):
        super().__init__(404, "unknown_function", f"no function named {name!r} is deployed")


class Overloaded(InvokeError):
    def __init__(self, name: str, detail: str = ""):
        super().__init__(
            429,
            "overloaded",
            detail or f"function {name!r}: all instances busy and queue full",
            retry_after=1,
        )


class QueueFull(InvokeError):
    def __init__(self, name: str, backlog: int, cap: int):
        super().__init__(
            429,
            "queue_full",
            f"function {name!r} has {backlog} async invocations waiting (limit {cap})",
            retry_after=1,
        )


class InvokeTimeout(InvokeError):
    def __init__(self, name: str, timeout: float):
        super().__init__(504, "timeout", f"function {name!r} did not answer within {timeout:g}s")


class InvokeResult(Record):
    """What an invocation returned: 200 on success; 4xx/5xx from HandlerError or runtime
    failures."""

    _fields = (
        "status",
        "body",
        "content_type",
        "headers",
        "instance_id",
        "cold",
        "invocation_id",
        "duration_s",
    )

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        instance_id: str = "",
        cold: bool = False,
        invocation_id: str = "",
        duration_s: float = 0.0,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = {} if headers is None else headers
        self.instance_id = instance_id
        self.cold = cold
        self.invocation_id = invocation_id
        self.duration_s = duration_s

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class BatchItem(Record):
    """One event of `invoke_batch`: what `invoke` takes, minus the function and timeout."""

    _fields = ("payload", "content_type", "headers", "idempotency_key", "invocation_id")

    def __init__(
        self,
        payload: bytes | memoryview,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
    ) -> None:
        self.payload = payload
        self.content_type = content_type
        self.headers = {} if headers is None else headers
        self.idempotency_key = idempotency_key
        self.invocation_id = invocation_id


async def invoke_item(
    invoker: Invoker, function: str, item: BatchItem, timeout: float | None
) -> InvokeResult | InvokeError:
    """One event of a batch through `invoker.invoke`: its result, or the InvokeError it met
    (the outcome `invoke_batch` lists for it)."""
    try:
        return await invoker.invoke(
            function,
            item.payload,
            content_type=item.content_type,
            headers=item.headers,
            idempotency_key=item.idempotency_key,
            invocation_id=item.invocation_id,
            timeout=timeout,
        )
    except InvokeError as e:
        return e


def __getattr__(name: str) -> Any:
    """`Invoker` and `BatchInvoker` (typing protocols) load on first use: the instance runtime
    imports this module for `InvokeResult` and never imports typing (issue #19)."""
    if name in ("Invoker", "BatchInvoker"):
        from hearth import contract

        return getattr(contract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
