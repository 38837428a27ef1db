"""The one invocation interface every trigger uses (HTTP gateway, Redis stream trigger, replay,
chaining): `await invoker.invoke(function, payload, ...)` -> InvokeResult. The node agent implements
it over the shared-memory data plane."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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


@dataclass
class InvokeResult:
    status: int  # 200 on success; 4xx/5xx from HandlerError or runtime failures
    body: bytes
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    instance_id: str = ""
    cold: bool = False
    invocation_id: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class BatchItem:
    """One event of `invoke_batch`: what `invoke` takes, minus the function and timeout."""

    payload: bytes | memoryview
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    invocation_id: str | None = None


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


class Invoker(Protocol):
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
        """Run one invocation. Raises InvokeError subclasses for platform-level failures
        (unknown function 404, overload 429, timeout 504, instance died 502); handler errors
        come back as an InvokeResult with status >= 400 and a JSON {error, detail} body."""
        ...


class BatchInvoker(Invoker, Protocol):
    """An invoker that can carry several events to one instance in one round trip (the node
    agent). Queue triggers use it when present; every event still gets its own handler call,
    result and error."""

    async def invoke_batch(
        self, function: str, items: list[BatchItem], *, timeout: float | None = None
    ) -> list[InvokeResult | InvokeError]:
        """One outcome per item, in order: a result, or the InvokeError that item met."""
        ...
