"""When the node agent carries several queued events to one instance in one round trip.

A data-plane round trip costs tens of microseconds of CPU on each side (a slot, a descriptor, a
wake-up, a future, a metrics update); for a no-op handler that is most of the work. Under a queue
backlog the trigger hands the agent many events at once, and one batch per instance amortises
that cost while every event still gets its own handler call, result and error.

Batching must never turn fast events into timeouts, so only functions whose measured service
time is short are batched, and a batch's expected run time stays a small share of the function's
timeout. A function with no measurement yet is not batched (its first events go one by one)."""

from __future__ import annotations

MAX_SERVICE_S = 0.002  # batch only handlers measured faster than this per event
TIMEOUT_SHARE = 0.1  # a batch's expected run time stays under this share of the timeout
EWMA = 0.2  # weight of the newest service-time sample


def batch_sizes(
    n: int, service_s: float | None, timeout_s: float, ready: int, max_batch: int
) -> list[int]:
    """Split `n` events into per-round-trip batch sizes (summing to n).

    `service_s`: measured seconds per event (None: unknown); `ready`: instances that can take
    work now (the events are spread over them so they run in parallel); `max_batch`: the
    trigger's cap (1 disables batching)."""
    if n <= 0:
        return []
    if service_s is None or service_s > MAX_SERVICE_S or max_batch <= 1:
        return [1] * n
    cap = min(max_batch, max(1, int(timeout_s * TIMEOUT_SHARE / max(service_s, 1e-6))))
    size = max(1, min(cap, -(-n // max(1, ready))))
    sizes = [size] * (n // size)
    if n % size:
        sizes.append(n % size)
    return sizes


def update_service_time(current: float | None, seconds: float, events: int) -> float:
    """Moving average of seconds per event; a batch of k events is one sample of its mean."""
    sample = seconds / max(1, events)
    return sample if current is None else (1 - EWMA) * current + EWMA * sample
