"""The function replays invoke on Hearth: it does what the trace says an invocation cost.

Event body (JSON, written by the replay driver): ``{"function", "duration_ms", "memory_mb",
"seq", "mode"?}``. ``mode``: ``busy`` (spin the CPU, default), ``sleep`` (wait without CPU) or
``mixed`` (half each). ``memory_mb`` is allocated and touched (one write per 4 KiB page) for the
duration of the invocation. Durations are capped by the invocation deadline.
"""

from __future__ import annotations

import time

from hearth.sdk import Event, HandlerError

MAX_MEMORY_MB = 4096
PAGE = 4096


def run_work(
    duration_ms: float, memory_mb: float, mode: str = "busy", deadline_s: float | None = None
) -> dict:
    """Pure-ish core (no I/O): allocate, then busy-loop and/or sleep until the duration passed."""
    t0 = time.perf_counter()
    if not 0 <= memory_mb <= MAX_MEMORY_MB:
        raise ValueError(f"memory_mb must be within 0..{MAX_MEMORY_MB}, got {memory_mb}")
    if duration_ms < 0:
        raise ValueError(f"duration_ms must be >= 0, got {duration_ms}")
    if mode not in ("busy", "sleep", "mixed"):
        raise ValueError(f"mode must be busy, sleep or mixed, not {mode!r}")
    dur = duration_ms / 1000.0
    if deadline_s is not None:
        dur = max(0.0, min(dur, deadline_s - 0.01))
    buf = None
    nbytes = int(memory_mb * 1024 * 1024)
    if nbytes:
        buf = bytearray(nbytes)
        mv = memoryview(buf)
        mv[::PAGE] = b"\x01" * len(range(0, nbytes, PAGE))  # touch every page
    end = t0 + dur
    if mode == "sleep":
        time.sleep(max(0.0, end - time.perf_counter()))
    elif mode == "mixed":
        half = t0 + dur / 2
        while time.perf_counter() < half:
            pass
        time.sleep(max(0.0, end - time.perf_counter()))
    else:
        while time.perf_counter() < end:
            pass
    elapsed = time.perf_counter() - t0
    del buf
    return {"elapsed_ms": elapsed * 1000.0, "memory_mb": memory_mb, "mode": mode}


def handle(event: Event) -> dict:
    try:
        body = event.json() if len(event.payload) else {}
    except ValueError as e:
        raise HandlerError(f"body must be JSON: {e}", status=400) from None
    if not isinstance(body, dict):
        raise HandlerError("body must be a JSON object", status=400)
    try:
        dur = float(body.get("duration_ms", 0.0))
        mem = float(body.get("memory_mb", 0.0))
    except (TypeError, ValueError):
        raise HandlerError("duration_ms and memory_mb must be numbers", status=400) from None
    mode = str(body.get("mode", "busy"))
    try:
        out = run_work(dur, mem, mode, event.context.remaining())
    except ValueError as e:
        raise HandlerError(str(e), status=400) from None
    out["seq"] = body.get("seq")
    out["function"] = body.get("function")
    out["instance"] = event.context.instance_id
    return out
