"""Admission: an instance with a free concurrency slot for each invocation, or a place in the
function's bounded queue, or a clear 429.

The admitter never starts instances itself: the decision (start, wait or reject) is the
autoscaler's request-path rule (`hearth.controller.autoscaler.admit`); for a start it calls
`scale_out` (the lifecycle counts the start at once and runs it in a task). Waiters are woken
when an instance frees a slot, becomes ready, or dies.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hearth.agent.instance import Instance
from hearth.agent.table import FunctionState, InstanceTable
from hearth.controller.autoscaler import admit
from hearth.dataplane.descriptor import Descriptor
from hearth.invoke import InvokeError, Overloaded
from hearth.spec import FunctionSpec

if TYPE_CHECKING:
    from hearth.agent.starts import Plan


def queue_admits(
    queued: int, capacity: int, service_s: float | None, max_wait_s: float | None
) -> bool:
    """Whether one more invocation may wait: not when, at the measured handler time, the ones
    ahead of it would keep it waiting longer than `max_wait_s` (hidden queueing: the caller
    would rather hear 429 + Retry-After now). None: no bound but the queue size."""
    if max_wait_s is None or service_s is None or capacity <= 0:
        return True
    return (queued + 1) / capacity * service_s <= max_wait_s


def wait_until(since: float | None, now: float, max_wait_s: float | None) -> float:
    """The monotonic time past which a call may no longer wait for an instance (then 429): the
    bound counted from `since`, when the gateway read the request (its wait in the gateway
    counts: `hearth.gateway.sojourn`), else from `now`; inf: no bound."""
    if not max_wait_s:
        return float("inf")
    return (now if since is None else min(since, now)) + max_wait_s


def _from_zero(fs: FunctionState) -> bool:
    """A cold start from zero is pending: its callers wait for it (up to the start budget), as
    nothing else can serve them. With instances live, a start in progress is extra capacity for
    later calls and waiting stays bounded by the queue-wait limit: under sustained overload the
    autoscaler keeps one start in progress nearly always, and exempting those waits let served
    calls queue for seconds (replay benchmark, 2,000/s: 200s at p99 12.8 s)."""
    return bool(fs.starting) and not fs.live()


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
        # each queued call's place, by the future it waits on (`_queue`)
        self._tickets: dict[asyncio.Future, int] = {}
        self._next_ticket = itertools.count()
        # a start made at once from a free warm-pool instance, for a call read in a protocol
        # callback (`Starts.plan_now`, `Starts.start_now`); unset: every start goes through
        # `acquire`
        self.plan_start: Callable[[FunctionSpec], Plan | None] | None = None
        self.begin_now: (
            Callable[[FunctionState, Plan, Descriptor], tuple[Instance, list[Descriptor]] | None]
            | None
        ) = None

    async def acquire(
        self, fs: FunctionState, deadline: float, since: float | None = None
    ) -> tuple[Instance, bool]:
        """An instance with a free concurrency slot, and whether this call caused a cold start;
        starts one up to max_instances, else queues up to queue_size (monotonic `deadline`).
        `since`: when the gateway read the request (the wait bound counts from there)."""
        self.arrived(fs, time.time())
        cold = False
        # a wall on waiting that is not for a cold start: past it, 429 (bounded queueing)
        queue_until = wait_until(since, time.monotonic(), self.max_queue_wait_s)
        ticket: int | None = None  # its place in the queue, once let in (see `_queue`)
        while True:
            fs = self.table.current(fs)  # redeployed while we waited
            inst = self.table.take(fs)
            if inst is not None:
                return inst, cold
            verdict, why = self._verdict(fs)
            if why and ticket is None:
                raise Overloaded(fs.spec.name, why)
            if why:  # woken (a start became ready, its first call still running): this call
                verdict = "wait"  # was let in; the queue's rule is for arrivals, not for it
            fut = asyncio.get_running_loop().create_future()
            # queued before the start: a pool instance it specialises at once
            ticket = self._queue(fs, fut, ticket)
            until = deadline
            try:
                if verdict == "start":  # is handed over in that call (`hand`): no loop pass
                    cold = True
                    self.scale_out(fs)
                now = time.monotonic()
                until = deadline if _from_zero(fs) else min(deadline, queue_until)
                if fut.done():  # handed over already: its spec and this request leave in
                    got = fut.result()  # one message (`Starts.begin_start`)
                else:
                    got = await asyncio.wait_for(fut, max(0.0, until - now))
                    # 3.11's `wait_for` swallows a cancellation that comes as `fut` gets its
                    # result (the call would go on for a caller gone): raised here, and what
                    # `fut` got is passed on (`_pass_on`, below), as 3.12's does. Not
                    # `asyncio.timeout`: a cluster call's first step runs outside a task on
                    # 3.11 (`hearth.cluster.eager`), where it raises RuntimeError
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise asyncio.CancelledError
                if got is not None:  # handed a starting instance (see `hand`): claimed for us
                    # cold only if this call caused a start: the longest waiter gets whichever
                    # start registers first, maybe one another call caused (which, served by
                    # another instance later, stays cold): never more cold calls than starts
                    return got, cold
            except TimeoutError:
                self._pass_on(fs, fut)  # (the bound may run out as `fut` gets its result)
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
                self._pass_on(fs, fut)  # cancelled (the caller went) as `fut` got its result
                raise
            finally:
                self._tickets.pop(fut, None)
                fs.woken.discard(fut)
                if fut in fs.waiters:
                    fs.waiters.remove(fut)

    def _pass_on(self, fs: FunctionState, fut: asyncio.Future) -> None:
        """A waiter leaves without looking at what `fut` got (its caller cancelled, or its
        bound ran out, in the step `fut` got its result): a starting instance handed to it
        (`hand`) gets its claim back, and the wake goes to the next waiter. A wake is sent
        for one free slot (`wake`): spent on a call that left, the slot stayed free while
        the next waiter waited on, for the next wake or to its deadline."""
        if not fut.done() or fut.cancelled() or fut.exception() is not None:
            return
        got = fut.result()
        if got is not None:
            # The claim goes back with `table.done`, not `Lifecycle.done`: a start record
            # waiting for this claim's answer (`Instance.after_answer`, `Starts._adopted`) would
            # wait for its RECORD_WAIT_S timer instead. Not reachable on Python 3.11: `hand`
            # runs before the start waits for `ready` (`Starts.start_instance`), so the start's
            # adoption is at least two loop steps after it (3.11's `wait_for`: `ready`'s
            # callback, then the task's wake-up), and this waiter's task, woken by `hand` in
            # the same step, runs first and gives the claim back before the adoption (which
            # then records at once; a start from the read, `Starts.start_now`, hands no waiter:
            # its call is the one read). On 3.12+, `wait_for` on a `ready` already done does not
            # suspend: a zygote fork with a preregistered endpoint that reported before its
            # fork's reply was read would be adopted in `hand`'s own step, and a waiter
            # leaving then would leave the record to its timer (RECORD_WAIT_S late, no more)
            self.table.done(got)
        self.wake(self.table.current(fs))

    def _queue(self, fs: FunctionState, fut: asyncio.Future, ticket: int | None) -> int:
        """Queue `fut` for a call; its ticket. A new call goes last with a new ticket; a call
        woken that found none free goes back where its ticket puts it, ahead of every call
        that came after it, so a wake of several (an instance's exit wakes them all) keeps
        their order (first come, first served)."""
        if ticket is None:
            ticket = next(self._next_ticket)
            fs.waiters.append(fut)
        else:
            at = next(
                (i for i, w in enumerate(fs.waiters) if self._tickets.get(w, -1) > ticket),
                len(fs.waiters),
            )
            fs.waiters.insert(at, fut)
        self._tickets[fut] = ticket
        return ticket

    def take_now(self, fs: FunctionState) -> Instance | None:
        """`acquire` when an instance is free now: it is taken (busy) and the arrival observed;
        None, and nothing observed, when none is free."""
        inst = self.table.take(self.table.current(fs))
        if inst is not None:
            self.arrived(fs, time.time())
        return inst

    def plan_now(self, fs: FunctionState) -> Plan | None:
        """For a call that found no free instance with no call queued or woken (the caller
        has checked: they go first): the start a free warm-pool instance can take right now
        when `acquire`'s answer would be a start (`plan_start`: no placement to make, no zygote
        to wait for). None, with nothing observed, started or changed, whenever `acquire`
        would do anything else (a wait, a 429, a start that has to wait): then `acquire`."""
        if self.plan_start is None:
            return None
        verdict, why = self._verdict(fs)
        if verdict != "start" or why:
            return None
        return self.plan_start(fs.spec)

    def start_now(
        self, fs: FunctionState, plan: Plan, request: Descriptor
    ) -> tuple[Instance, list[Descriptor]] | None:
        """`plan_now`'s start made in the same step (`begin_now`): the pool instance sent its
        spec and `request` at once, then claimed for the call (cold), and the arrival
        observed; None, with nothing sent or observed, when the spec could not be written.
        Returns the instance and the descriptors the data plane could not route."""
        assert self.begin_now is not None
        got = self.begin_now(fs, plan, request)
        if got is not None:
            self.arrived(fs, time.time())
        return got

    def _verdict(self, fs: FunctionState) -> tuple[str, str | None]:
        """For a call that found no free instance: start, wait or reject, and why it is
        rejected (the 429 detail; None unless rejected). Changes nothing."""
        # a woken call whose task has not looked yet is still in the queue (`wake`)
        live, queued, spec = len(fs.live()), len(fs.waiters) + len(fs.woken), fs.spec
        verdict = admit(
            live, fs.starting, queued, spec.concurrency, spec.max_instances, spec.queue_size
        )
        if verdict == "reject":
            return verdict, (
                f"function {spec.name!r}: {live} instance(s) busy, {queued} queued "
                f"(queue_size {spec.queue_size})"
            )
        if verdict == "wait" and not _from_zero(fs):
            if not queue_admits(
                queued, live * spec.concurrency, fs.service_s, self.max_queue_wait_s
            ):
                return "reject", (
                    f"function {spec.name!r}: {queued} queued would wait over "
                    f"{self.max_queue_wait_s:g}s"
                )
        return verdict, None

    def refusal(self, fs: FunctionState) -> Overloaded | None:
        """The 429 a call arriving now would get at once (every instance busy and the queue
        full, or too long to wait in), or None; changes nothing, so the gateway asks before it
        reads the body: back-pressure costs no body read, slot or validation. The arrival is
        still observed (keep-alive and autoscaler see the load they refuse)."""
        fs = self.table.current(fs)
        if self.table.has_free(fs):
            return None
        _, why = self._verdict(fs)
        if why is None:
            return None
        self.arrived(fs, time.time())
        return Overloaded(fs.spec.name, why)

    def waiting(self, fs: FunctionState) -> bool:
        """Whether `hand` would hand an instance over now (a waiter not done or cancelled)."""
        return any(not w.done() for w in self.table.current(fs).waiters)

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
                fs.woken.add(w)  # until its task looks (`acquire` discards it)
                n -= 1

    @staticmethod
    def fail(fs: FunctionState, err: BaseException) -> None:
        """Every waiter hears `err` (the start they waited for failed; the function went away)."""
        while fs.waiters:
            w = fs.waiters.popleft()
            if not w.done():
                w.set_exception(err)
