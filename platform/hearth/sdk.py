"""The contract a function author writes against.

A handler is ``def handle(event: Event) -> Result`` (or ``async def``). ``event.payload`` is a
read-only memoryview onto the shared-memory slot the payload landed in: ``event.array(np.float32)``
gives a numpy view of the same memory (no copy). A handler may return bytes, str, a dict/list (JSON
or msgpack, following the caller's Accept), a numpy array, a :class:`Response`, or ``None``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
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


@dataclass
class Context:
    function: str
    instance_id: str
    invocation_id: str
    deadline: float  # epoch seconds
    node: str = "local"
    idempotency_key: str | None = None  # the Redis stream entry id for queue-triggered events
    caller: str | None = None  # the calling function for a chained call; None from a trigger
    # Filled in by the runtime: chaining and emitting go through the data plane / Redis.
    _invoke: Callable[..., Any] | None = field(default=None, repr=False)
    _emit: Callable[..., Any] | None = field(default=None, repr=False)
    _alloc: Callable[[int], Any] | None = field(default=None, repr=False)

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


@dataclass
class Event:
    payload: memoryview
    context: Context
    content_type: str = OCTET
    headers: dict[str, str] = field(default_factory=dict)

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


@dataclass
class Response:
    body: bytes | memoryview | str | Any = b""
    status: int = 200
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
