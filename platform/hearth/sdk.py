"""The contract a function author writes against.

A handler is ``def handle(event: Event) -> Result`` (or ``async def``). ``event.payload`` is a
read-only memoryview onto the shared-memory slot the payload landed in: ``event.array(np.float32)``
gives a numpy view of the same memory (no copy). A handler may return bytes, str, a dict/list (JSON
or msgpack, following the caller's Accept), a numpy array, a :class:`Response`, or ``None``.
"""

from __future__ import annotations

import json
import time

import msgpack

from hearth.records import Record

TYPE_CHECKING = False  # typing is not imported on the runtime's path (issue #19)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    import numpy as np

JSON = "application/json"
MSGPACK = "application/msgpack"
OCTET = "application/octet-stream"
NDARRAY = "application/x-ndarray"


class HandlerError(Exception):
    """Raise from a handler to return a chosen status (4xx/5xx) with a message."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class Context(Record):
    """Who is running and until when; ``invoke``/``emit``/``alloc`` reach the platform."""

    _fields = (
        "function",
        "instance_id",
        "invocation_id",
        "deadline",
        "node",
        "idempotency_key",
        "caller",
        "_invoke",
        "_emit",
        "_alloc",
    )
    _hidden = ("_invoke", "_emit", "_alloc")

    def __init__(
        self,
        function: str,
        instance_id: str,
        invocation_id: str,
        deadline: float,  # epoch seconds
        node: str = "local",
        idempotency_key: str | None = None,  # the Redis stream entry id (queue-triggered events)
        caller: str | None = None,  # the calling function for a chained call; None from a trigger
        _invoke: Callable[..., Any] | None = None,
        _emit: Callable[..., Any] | None = None,
        _alloc: Callable[[int], Any] | None = None,
    ) -> None:
        self.function = function
        self.instance_id = instance_id
        self.invocation_id = invocation_id
        self.deadline = deadline
        self.node = node
        self.idempotency_key = idempotency_key
        self.caller = caller
        # filled in by the runtime: chaining and emitting go through the data plane / Redis
        self._invoke = _invoke
        self._emit = _emit
        self._alloc = _alloc

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.time())

    def invoke(
        self,
        function: str,
        payload: bytes | memoryview | Any,
        content_type: str = OCTET,
        token: str | None = None,
    ) -> Any:
        """Call another function on this node through the data plane (the payload's slot is
        lent, not copied). `token`: the target's invoke token, if it has one."""
        if self._invoke is None:
            raise RuntimeError("chaining is not available in this runtime")
        return self._invoke(function, payload, content_type, token)

    def emit(self, stream: str, data: Any, **meta: Any) -> str:
        """Publish an event (msgpack) to a Redis stream; returns the entry id."""
        if self._emit is None:
            raise RuntimeError("emitting is not available in this runtime")
        return self._emit(stream, data, meta)

    def alloc(self, nbytes: int) -> memoryview:
        """A writable shared-memory buffer; returning a view of it as the result avoids a copy."""
        if self._alloc is None:
            raise RuntimeError("slot allocation is not available in this runtime")
        return self._alloc(nbytes)


class Event(Record):
    """One invocation's input: ``payload`` is a read-only view of its shared-memory slot."""

    _fields = ("payload", "context", "content_type", "headers")

    def __init__(
        self,
        payload: memoryview,
        context: Context,
        content_type: str = OCTET,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.payload = payload
        self.context = context
        self.content_type = content_type
        self.headers = {} if headers is None else headers

    def bytes(self) -> bytes:
        return bytes(self.payload)

    def text(self) -> str:
        return str(self.payload, "utf-8")

    def json(self) -> Any:
        return json.loads(bytes(self.payload))

    def msgpack(self) -> Any:
        return msgpack.unpackb(self.payload, raw=False)

    def data(self) -> Any:
        """Decode by content type: msgpack, JSON, or raw bytes."""
        ct = self.content_type.split(";")[0].strip().lower()
        if ct == MSGPACK:
            return self.msgpack()
        if ct == JSON:
            return self.json()
        return self.bytes()

    def array(self, dtype: Any = "float32", shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A zero-copy numpy view of the payload."""
        import numpy as np

        a = np.frombuffer(self.payload, dtype=dtype)
        return a.reshape(shape) if shape is not None else a


class Response(Record):
    """A result with a chosen status, content type or headers."""

    _fields = ("body", "status", "content_type", "headers")

    def __init__(
        self,
        body: bytes | memoryview | str | Any = b"",
        status: int = 200,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = {} if headers is None else headers
