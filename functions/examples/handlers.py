"""Example handlers. Each shows one part of the handler contract (hearth.sdk)."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
from hearth.sdk import Event, HandlerError, Response

_LOADED_AT = time.time()  # module state survives across warm invocations
_calls = 0


def hello(event: Event) -> dict:
    """JSON in, JSON out; shows which process served the call and how warm it was."""
    global _calls
    _calls += 1
    data = event.data() if len(event.payload) else {}
    who = data.get("name", "world") if isinstance(data, dict) else "world"
    return {
        "greeting": f"hello, {who}",
        "pid": os.getpid(),
        "instance": event.context.instance_id,
        "calls_on_this_instance": _calls,
    }


def echo(event: Event) -> Response:
    """Returns the payload unchanged, with its content type."""
    return Response(body=event.payload, content_type=event.content_type)


def noop(event: Event) -> bytes:
    return b""


def array_sum(event: Event) -> dict:
    """Sums a float32 payload through a zero-copy view, and checks that the view is the slot's
    shared memory (np.shares_memory with the whole mapping of the node's slot pool)."""
    a = event.array(np.float32)
    mapping = np.frombuffer(event.payload.obj, dtype=np.uint8)  # the pool's mmap, not a copy
    return {
        "sum": float(a.sum(dtype=np.float64)),
        "n": int(a.size),
        "zero_copy": bool(np.shares_memory(a, mapping)),
        "pool_offset": int(a.ctypes.data - mapping.ctypes.data),  # where in the pool it lives
        "pid": os.getpid(),
    }


def fail(event: Event) -> None:
    """Raises: the caller gets a 500 with this text and the instance survives."""
    raise ValueError("this handler always fails")


def reject(event: Event) -> None:
    raise HandlerError("bad input: this handler rejects everything", status=422)


def sleep(event: Event) -> dict:
    """Sleeps for {"seconds": s} (used for timeouts, concurrency and kill tests)."""
    s = float(event.data().get("seconds", 1.0)) if len(event.payload) else 1.0
    time.sleep(s)
    return {"slept": s, "pid": os.getpid()}


def triage(event: Event) -> dict:
    """Answers from its payload: b"reject" -> 422, b"raise" -> 500, b"chain" -> calls `echo`;
    anything else comes back with the event's own key and headers (tests of batched events)."""
    p = bytes(event.payload)
    if p == b"reject":
        raise HandlerError("rejected on request", status=422)
    if p == b"raise":
        raise ValueError("asked to fail")
    out = {
        "payload": p.decode(errors="replace"),
        "key": event.context.idempotency_key,
        "invocation": event.context.invocation_id,
        "headers": dict(event.headers),
        "content_type": event.content_type,
        "pid": os.getpid(),
    }
    if p == b"chain":
        out["chained"] = bytes(
            event.context.invoke("echo", b"via-chain", "text/plain").body
        ).decode()
    return out


async def async_hello(event: Event) -> dict:
    await asyncio.sleep(0.001)
    return {"greeting": "hello from an async handler", "pid": os.getpid()}


def pid(event: Event) -> dict:
    return {
        "pid": os.getpid(),
        "instance": event.context.instance_id,
        "idempotency_key": event.context.idempotency_key,
        "invocation": event.context.invocation_id,
    }


def chain_sum(event: Event) -> dict:
    """Passes its own payload on to `array-sum` (same slot, no copy) and returns that answer."""
    r = event.context.invoke("array-sum", event.payload, "application/octet-stream")
    import json

    return {"via": "chain-sum", "downstream": json.loads(r.body)}


_BUF: memoryview | None = None  # a ctx.alloc() buffer kept across invocations


def lend_sum(event: Event) -> dict:
    """Doubles the payload into its own shared-memory buffer and lends it to `array-sum`
    (no copy: the callee reads this instance's buffer), twice in a row."""
    global _BUF
    a = event.array(np.float32)
    if _BUF is None or len(_BUF) < a.nbytes:
        _BUF = event.context.alloc(a.nbytes)
    out = np.frombuffer(_BUF, dtype=np.float32, count=a.size)
    np.multiply(a, 2, out=out)
    mapping = np.frombuffer(event.payload.obj, dtype=np.uint8)
    import json

    r = json.loads(event.context.invoke("array-sum", _BUF[: a.nbytes]).body)
    return {
        "downstream": r,
        "my_offset": int(out.ctypes.data - mapping.ctypes.data),
        "still_mine": float(out.sum(dtype=np.float64)),
    }


def slow_init() -> None:
    """An init hook with a visible dependency-load cost (for the cold-start breakdown)."""
    time.sleep(0.05)


def relay(event: Event) -> Response:
    """Passes its payload on to the function named by the ``x-relay-to`` header (default
    ``echo``) as a chained call and returns that answer: across nodes when the target lives on
    another node (the payload goes slot → link → slot)."""
    r = event.context.invoke(
        event.headers.get("x-relay-to", "echo"), event.payload, event.content_type
    )
    return Response(body=r.body, content_type=r.content_type, status=r.status)


_PUSH: dict[int, memoryview] = {}


def push(event: Event) -> dict:
    """Times ``reps`` chained calls of ``to`` with ``bytes`` of payload lent from this instance's
    shared memory (no copy on this side): the cross-node benchmark's probe."""
    req = event.data()
    n, reps, to = int(req["bytes"]), int(req.get("reps", 1)), str(req["to"])
    buf = _PUSH.get(n)
    if buf is None:
        buf = _PUSH[n] = event.context.alloc(n)
        np.frombuffer(buf, np.uint8)[:] = 7  # touch every page once, outside the timing
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = event.context.invoke(to, buf[:n])
        out.append(time.perf_counter() - t0)
        if r.status >= 400:
            raise HandlerError(f"{to} answered {r.status}: {bytes(r.body)[:200]!r}", r.status)
    return {"seconds": out, "bytes": n}
