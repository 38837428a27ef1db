"""The invocation contract every trigger calls (HTTP gateway, Redis stream trigger, replay,
chaining), as typing protocols; re-exported by :mod:`hearth.invoke` on first use."""

from __future__ import annotations

from typing import Protocol

from hearth.invoke import BatchItem, InvokeError, InvokeResult


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
