"""Sending on time: waiting for an invocation's planned instant, and keeping GC pauses out.

Precise pacing: an event-loop sleep until ~1.5 ms before the planned time (loop timers are ~1 ms
grained), then a blocking ``time.sleep`` until ``busy`` seconds before it (the process is not
runnable, so no CPU is burnt and responses are handled at the next loop pass), then a spin.
Naive pacing (the baseline a simple loader uses): ``asyncio.sleep`` only."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

_RAISED = (100_000, 50, 1000)


async def wait_until(target: float, busy: float, naive: bool = False) -> None:
    """Return at ``target`` (``perf_counter`` seconds), or at once if it has passed."""
    now = time.perf_counter()
    if target <= now:
        return
    if naive:
        await asyncio.sleep(target - now)
        return
    # coarse: the event loop's timers are ~1 ms grained, so stop 1.5 ms early
    if target - now > 0.002:
        await asyncio.sleep(target - now - 0.0015)
    else:
        await asyncio.sleep(0)  # run ready I/O callbacks once
    # fine: a blocking sleep (not runnable, no CPU burnt), then spin the rest
    now = time.perf_counter()
    if target - now > busy:
        time.sleep(target - now - busy)
        now = time.perf_counter()
    while now < target:
        now = time.perf_counter()


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Fewer, later GC passes while sending: a full collection over the records in flight is a
    multi-ms pause. Shards running in one process each enter this; they all restore the default."""
    threshold = gc.get_threshold()
    if threshold[0] == _RAISED[0]:  # another shard in this process already raised it
        threshold = (700, 10, 10)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_RAISED)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
