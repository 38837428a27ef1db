"""Admission: an instance with a free concurrency slot for each invocation, or a place in the
function's bounded queue, or a clear 429.

The admitter never starts instances itself: the decision (start, wait or reject) is the
autoscaler's request-path rule (`hearth.controller.autoscaler.admit`); for a start it calls
`scale_out` (the lifecycle counts the start at once and runs it in a task). Waiters are woken
when an instance frees a slot, becomes ready, or dies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hearth.agent.instance import Instance
from hearth.agent.table import FunctionState, InstanceTable
from hearth.controller.autoscaler import admit
from hearth.invoke import InvokeError, Overloaded


def queue_admits(
    queued: int, capacity: int, service_s: float | None, max_wait_s: float | None
) -> bool:
    """Whether one more invocation may wait: not when, at the measured handler time, the ones
    ahead of it would keep it waiting longer than `max_wait_s` (hidden queueing: the caller
    would rather hear 429 + Retry-After now). None: no bound but the queue size."""
    if max_wait_s is None or service_s is None or capacity <= 0:
        return True
    return (queued + 1) / capacity * service_s <= max_wait_s


class Admitter:
    def __init__(
        self,
        table: InstanceTable,
        scale_out: Callable[[FunctionState], object],
        arrived: Callable[[FunctionState, float], None],
    ) -> None:
        self.table = table
        self.scale_out = scale_out  # start one more instance of the function (counted now)
        self.arrived = arrived  # an invocation arrived (keep-alive and autoscaler observations)
        self.max_queue_wait_s: float | None = None  # HEARTH_MAX_QUEUE_WAIT_S (see queue_admits)

    async def acquire(self, fs: FunctionState, deadline: float) -> tuple[Instance, bool]:
        """An instance with a free concurrency slot, and whether this call caused a cold start;
        starts one up to max_instances, else queues up to queue_size (monotonic `deadline`)."""
        self.arrived(fs, time.time())
        cold = False
        # a wall on waiting that is not for a cold start: past it, 429 (bounded queueing)
        queue_until = time.monotonic() + (self.max_queue_wait_s or float("inf"))
        while True:
            fs = self.table.current(fs)  # redeployed while we waited
            inst = self.table.take(fs)
            if inst is not None:
                return inst, cold
            live = len(fs.live())
            queued = len(fs.waiters)
            spec = fs.spec
            verdict = admit(
                live, fs.starting, queued, spec.concurrency, spec.max_instances, spec.queue_size
            )
            if verdict == "start":
                cold = True
                self.scale_out(fs)
            elif verdict == "reject":
                raise Overloaded(
                    spec.name,
                    f"function {spec.name!r}: {live} instance(s) busy, {queued} queued (queue_size {spec.queue_size})",
                )
            elif not fs.starting and not queue_admits(
                queued, live * fs.spec.concurrency, fs.service_s, self.max_queue_wait_s
            ):
                raise Overloaded(
                    fs.spec.name,
                    f"function {fs.spec.name!r}: {queued} queued would wait over {self.max_queue_wait_s:g}s",
                )
            fut = asyncio.get_running_loop().create_future()
            fs.waiters.append(fut)
            now = time.monotonic()
            until = deadline if fs.starting else min(deadline, queue_until)
            try:
                got = await asyncio.wait_for(fut, max(0.0, until - now))
                if got is not None:  # handed a starting instance (see `hand`): claimed for us
                    # cold only if this call caused a start: the longest waiter gets whichever
                    # start registers first, maybe one another call caused (which, served by
                    # another instance later, stays cold): never more cold calls than starts
                    return got, cold
            except TimeoutError:
                if until < deadline:
                    raise Overloaded(
                        fs.spec.name,
                        f"function {fs.spec.name!r}: no instance free within {self.max_queue_wait_s:g}s",
                    ) from None
                raise InvokeError(
                    504,
                    "timeout",
                    f"no instance of {fs.spec.name!r} became free in time (max_instances {fs.spec.max_instances}, {len(fs.waiters)} waiting)",
                ) from None
            except BaseException:
                # cancelled just as a starting instance was handed to us: give its claim back
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    got = fut.result()
                    if got is not None:
                        self.table.done(got)
                raise
            finally:
                if fut in fs.waiters:
                    fs.waiters.remove(fut)

    def hand(self, fs: FunctionState, inst: Instance) -> bool:
        """Give a starting instance whose endpoint is registered to the longest waiter now:
        its first request goes ahead of the ready report (one round trip less on a cold
        start). False if nobody waits."""
        fs = self.table.current(fs)
        while fs.waiters:
            w = fs.waiters.popleft()
            if not w.done():
                self.table.claim(inst)
                w.set_result(inst)
                return True
        return False

    @staticmethod
    def wake(fs: FunctionState | None, n: int = 1) -> None:
        """Let up to `n` waiters look again."""
        if fs is None:
            return
        while n > 0 and fs.waiters:
            w = fs.waiters.popleft()
            if not w.done():
                w.set_result(None)
                n -= 1

    @staticmethod
    def fail(fs: FunctionState, err: BaseException) -> None:
        """Every waiter hears `err` (the start they waited for failed; the function went away)."""
        while fs.waiters:
            w = fs.waiters.popleft()
            if not w.done():
                w.set_exception(err)
