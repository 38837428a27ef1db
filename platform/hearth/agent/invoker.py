"""The invocation front: slots, deadlines, replies, and the two ways to make a call.

Every trigger (HTTP gateway, Redis streams, replay, a peer node) calls `invoke`: the payload
goes into a shared-memory slot once, the admitter picks an instance, the link carries the
descriptor and brings the reply back. `start_call` is the same call without a coroutine, for a
caller that reads requests in a protocol callback (the gateway's fast path, a peer's frame): it
starts the call only when nothing has to wait, and hands the outcome to a callback run from the
link's reader. Both end a call through `_ended`, so they give the same answers and keep the same
books. The batch path (`agent.batches`), chained-call routing (`agent.chained`) and the call's
bytes in and out of shared memory (`agent.slotio`: the payload placed, the reply read) are
mixins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.batches import Batches
from hearth.agent.chained import Chained
from hearth.agent.instance import AGENT_ID, Instance
from hearth.agent.link import DataplaneLink
from hearth.agent.outcomes import (  # noqa: F401 - dataplane_error, new_invocation_id: public names of this module
    ahead_of,
    dataplane_error,
    new_invocation_id,
    start_error,
)
from hearth.agent.slotio import (  # noqa: F401 - reply_fields: a public name of this module
    SlotIO,
    SlotPayload,
    reply_fields,
    request_meta,
)
from hearth.agent.table import FunctionState, InstanceTable
from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError, InvokeResult, InvokeTimeout, UnknownFunction
from hearth.metrics import Metrics
from hearth.runtime.codec import pack_meta

log = logging.getLogger("hearth.node")

#: sees an instance's reply descriptor in the reader callback: (reply, instance id, cold,
#: invocation id); it must not keep the slot
ReplyHook = Callable[[Descriptor, str, bool, str], None]
#: what `start_call` hands its outcome to: the result, or the InvokeError `invoke` would raise
Done = Callable[[InvokeResult | InvokeError], None]


class _Call:
    """One call on its way: what ending it needs (`Invoker._ended`)."""

    __slots__ = (
        "fs",
        "inst",
        "cold",
        "inv",
        "sent",
        "t0",
        "timeout",
        "ahead",
        "corr",
        "invoker",
        "done",
    )

    def __init__(
        self,
        fs: FunctionState,
        inst: Instance,
        cold: bool,
        inv: str,
        sent: Descriptor,
        t0: float,
        timeout: float,
        corr: bytes,
    ) -> None:
        self.fs, self.inst, self.cold, self.inv = fs, inst, cold, inv
        self.sent = sent  # what went to the instance (its slot is the request's)
        self.t0, self.timeout, self.corr = t0, timeout, corr
        self.ahead = ahead_of(inst)
        self.invoker: Invoker | None = None  # set by `start_call`
        self.done: Done | None = None

    def ended(self, got: Descriptor | BaseException) -> None:
        """`start_call`'s end: the link's reply (or why there is none) to the caller's `done`."""
        invoker = self.invoker
        assert invoker is not None and self.done is not None
        try:
            out = invoker._ended(self, got, settle=False)
        except InvokeError as e:
            out = e
        except Exception as e:  # a bug, or an instance speaking another protocol: as invoke's 500
            log.exception("ending a call of %s failed", self.fs.spec.name)
            out = InvokeError(500, "internal_error", f"{type(e).__name__}: {e}")
        try:
            self.done(out)
        except Exception:  # the caller's bug: its books are still kept, its slot still freed
            log.exception("the end callback of a call of %s failed", self.fs.spec.name)
        finally:
            if isinstance(out, InvokeResult):  # after the answer left: off the caller's wait
                invoker._settle(self, got, out)  # type: ignore[arg-type]


class Invoker(SlotIO, Batches, Chained):
    def __init__(
        self,
        pool: SlotPool,
        table: InstanceTable,
        admitter: Admitter,
        link: DataplaneLink,
        metrics: Metrics,
        kill: Callable[[Instance, str], None],
        emit: Callable[[str, bytes, str, dict[str, Any], dict[str, Any]], Awaitable[str]]
        | None = None,
    ) -> None:
        self.pool = pool
        self.table = table
        self.admitter = admitter
        self.link = link
        self.metrics = metrics
        self.kill = kill  # an instance that overran its deadline is killed (it may be stuck)
        self.emit = emit  # ctx.emit from an instance: the agent publishes (it holds Redis)
        self.start_budget_s = 30.0  # longest wait for an instance (queueing + cold start)
        # a chained call to a function hosted on another node: (fs, d, meta) -> handled?
        self.remote: Callable[[FunctionState, Descriptor, dict], Any] | None = None

    async def invoke(
        self,
        function: str,
        payload: bytes | memoryview | SlotPayload,
        *,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: float | None = None,
        on_reply: ReplyHook | None = None,
        received_at: float | None = None,
    ) -> InvokeResult:
        """``on_reply(reply descriptor, instance id, cold, invocation id)`` sees the instance's
        reply in the reader callback, before this resumes (a forwarded call sends it on)."""
        t0 = time.monotonic()
        fs = self.table.get(function)
        if fs is None:
            self._drop(payload)
            raise UnknownFunction(function)
        timeout = min(timeout or fs.spec.timeout_s, fs.spec.timeout_s)
        corr, inv, meta = request_meta(
            function, content_type, headers, timeout, idempotency_key, invocation_id
        )
        slot, meta_len, length = self._placed(payload, meta)
        try:
            # The function's timeout covers execution (as Lambda's does); waiting for a free or
            # freshly started instance is bounded separately by the start budget.
            inst, cold = await self.admitter.acquire(
                fs, t0 + timeout + self.start_budget_s, received_at
            )
        except BaseException:
            self.link.free(slot.index, slot.gen)
            raise
        if time.monotonic() - t0 > 0.005:  # waited: the handler's deadline starts at dispatch
            meta["deadline"] = time.time() + timeout
            mb = pack_meta(meta, meta_len)
            if len(mb) == meta_len:
                self.pool.view(slot.index, slot.gen, meta_len)[:] = mb
        t_dispatch = time.monotonic()
        d = slot.descriptor(inst.eid, AGENT_ID, length=length, meta_len=meta_len, corr=corr)
        call = _Call(fs, inst, cold, inv, d, t0, timeout, corr)
        hook = None if on_reply is None else lambda r: on_reply(r, inst.id, cold, inv)
        try:
            reply = await self.link.call(
                inst, d, t_dispatch + timeout - time.monotonic(), call.ahead, hook
            )
        except (TimeoutError, InvokeError) as e:
            raise self._ended(call, e) from None
        out = self._ended(call, reply)
        if isinstance(out, InvokeError):
            raise out
        return out

    def start_call(
        self,
        function: str,
        payload: bytes | memoryview | SlotPayload,
        *,
        done: Done,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: float | None = None,
        on_reply: ReplyHook | None = None,
    ) -> bool:
        """`invoke` without a coroutine, for a caller in a protocol callback: the call is
        started now if nothing has to wait for it, and ends in `done`.

        A call that finds no instance free but would start one, when a free warm-pool
        instance can take that start right now (a bytes payload; `Admitter.plan_now`: no
        placement to make, no zygote to wait for), starts it here too (`_start_pooled`): the
        pool instance is sent its spec and this request in one message before the start is
        booked, the call is cold, and its timeout runs from the instance's ready report, as
        for a request `acquire` hands a starting instance (#19: no task step, second admission
        or waiter before the spec leaves; nothing is written for a call that will wait).

        Returns False, having done nothing (the payload is still the caller's; nothing counted
        or observed), when the call would wait or is neither of those: the function is
        unknown here, no instance has a free concurrency slot right now and none can be
        started that way, or calls are already queued for one, or woken to take one (they go
        first). The caller then makes the same call with `await invoke(...)`, which waits,
        starts instances, and gives an unknown function its 404.

        Returns True when the call is under way: the payload is the invoker's from then on, and
        `done(outcome)` runs exactly once, never before this returns, on the event loop (from
        the link's reader callback, the deadline timer, or an instance's exit), with the
        InvokeResult `invoke` would return or the InvokeError it would raise (413/429 from the
        slot pool, 504 after the timeout, 502 when the instance dies or the proxy bounces the
        call, 503 when there is no room for the reply, 500 `internal_error` for an unreadable
        reply). It must not raise and must not keep the InvokeResult's slot (there is none:
        the body is bytes). Everything `invoke` keeps holds here too: the slot is freed on every
        path, the function's timeout kills the instance (a shorter `timeout` only abandons the
        call), the counters and latency histogram count it, the instance's capacity is
        returned when its reply comes, and `on_reply` sees the reply first, as in `invoke`.

        The node's wait bound (HEARTH_MAX_QUEUE_WAIT_S, counted from the read) is the caller's
        to check before calling: nothing here waits. Like `invoke`, it raises only on a bug
        (an exception from placing the payload, which is then dropped)."""
        fs = self.table.get(function)
        if fs is None or fs.waiters or fs.woken:
            return False
        if not self.table.has_free(fs):
            if not self.table.pooled or not isinstance(payload, bytes):
                return False  # (no pool instance at all, the usual node: nothing to try)
            return self._start_pooled(
                fs,
                payload,
                done,
                content_type,
                headers,
                idempotency_key,
                invocation_id,
                timeout,
                on_reply,
            )
        t0 = time.monotonic()
        timeout = min(timeout or fs.spec.timeout_s, fs.spec.timeout_s)
        corr, inv, meta = request_meta(
            function, content_type, headers, timeout, idempotency_key, invocation_id
        )
        try:
            slot, meta_len, length = self._placed(payload, meta, 0)  # no rewrite: no reserve
        except InvokeError as e:  # 413 or 429 from the slot pool (rare: a loop lookup is fine)
            asyncio.get_running_loop().call_soon(done, e)
            return True
        inst = self.admitter.take_now(fs)
        assert inst is not None, "has_free said one was free, and nothing ran since"
        d = slot.descriptor(inst.eid, AGENT_ID, length=length, meta_len=meta_len, corr=corr)
        call = _Call(fs, inst, False, inv, d, t0, timeout, corr)
        call.invoker, call.done = self, done
        hook = None if on_reply is None else lambda r: on_reply(r, inst.id, False, inv)
        self.link.start(inst, d, timeout, hook, call.ended, call.ahead)
        return True

    def _start_pooled(
        self,
        fs: FunctionState,
        payload: bytes,
        done: Done,
        content_type: str,
        headers: dict[str, str] | None,
        idempotency_key: str | None,
        invocation_id: str | None,
        timeout: float | None,
        on_reply: ReplyHook | None,
    ) -> bool:
        """`start_call`'s start from a free warm-pool instance: decided first (nothing is
        written for a call that will wait), then the request's slot, then the spec and the
        request sent together before anything is booked (`Admitter.start_now`); False, with
        nothing done, when it cannot be made now (the task's way gives the same answer)."""
        plan = self.admitter.plan_now(fs)
        if plan is None:
            return False
        t0 = time.monotonic()
        function = fs.spec.name
        timeout = min(timeout or fs.spec.timeout_s, fs.spec.timeout_s)
        corr, inv, meta = request_meta(
            function, content_type, headers, timeout, idempotency_key, invocation_id
        )
        try:
            slot, meta_len, length = self._placed(payload, meta, 0)
        except InvokeError:  # the way through `invoke` gives the same answer, nothing started
            return False
        d = slot.descriptor(plan.inst.eid, AGENT_ID, length=length, meta_len=meta_len, corr=corr)
        got = self.admitter.start_now(fs, plan, d)
        if got is None:
            self.link.free(slot.index, slot.gen)  # (the payload is bytes: still the caller's)
            return False
        inst, unrouted = got
        call = _Call(fs, inst, True, inv, d, t0, timeout, corr)
        call.invoker, call.done = self, done
        hook = None if on_reply is None else lambda r: on_reply(r, inst.id, True, inv)
        self.link.start(inst, d, timeout, hook, call.ended, call.ahead, posted=unrouted)
        return True

    def _ended(
        self, c: _Call, got: Descriptor | BaseException, settle: bool = True
    ) -> InvokeResult | InvokeError:
        """How a call ended: its reply descriptor, TimeoutError (its deadline passed), an
        InvokeError (its instance died, or was never reachable) or another exception (the data
        plane failed). Frees what is still the caller's, counts it, and returns the outcome;
        without `settle`, a result's reply slot and count are left to `_settle`."""
        function, inst = c.fs.spec.name, c.inst
        if isinstance(got, TimeoutError):
            # The link has abandoned the call: its reply, if one still comes, frees the slot;
            # if the instance ends first, its exit does (the request slot stays the agent's
            # until the instance replies: see `hearth.runtime.handling`; freed only then,
            # never while it may still write).
            if c.timeout >= c.fs.spec.timeout_s:
                self.kill(inst, "timeout")  # over the function's own limit: it may be stuck
            else:
                # only the caller's shorter ?timeout= ran out: the instance is fine and keeps
                # working (killing it would let any client stop instances at will); its late
                # reply frees the slot and the instance's capacity, and the function's own
                # timeout still holds from dispatch: a handler that hangs is stopped then. The
                # timer is the abandoned call's: cancelled when its late reply or the
                # instance's exit settles it (no handle held for the rest of timeout_s)
                p = self.link.pending.get(c.corr)
                if p is not None and p.future is None and p.inst is inst:
                    p.timer = asyncio.get_running_loop().call_later(
                        c.fs.spec.timeout_s - c.timeout, self._overran, inst, c.corr
                    )
            self._count(function, 504, "timeout", c.t0)
            return InvokeTimeout(function, c.timeout)
        if isinstance(got, BaseException):
            if isinstance(got, InvokeError):
                # The instance died, was never reached, or answered in another call's slot
                # (the link refused that reply): the request slot, if still ours, is freed.
                self.pool.release_if_owner(c.sent.slot, c.sent.gen)
            # else the data plane failed as the request left: it may have reached a running
            # instance, which may still write the slot: the link abandoned the call (freed
            # once it replied or ended)
            if not isinstance(got, InvokeError):  # (only `start_call` gets here)
                got = InvokeError(502, "dataplane_error", f"{type(got).__name__}: {got}")
            e = start_error(c.ahead, got) or got  # sent ahead of a start that failed: say so
            self._count(function, e.status, e.error, c.t0)
            return e
        if got.kind == Kind.ERROR or (got.slot, got.gen) != (c.sent.slot, c.sent.gen):
            # An answer not in the request slot (an ERROR, or a reply in a slot of its own):
            # the instance is done with the request slot; an honest one has released it
            # already (a no-op then), a buggy or hostile one would leak it for good (it stays
            # the agent's: no reclaim at the instance's exit).
            self.pool.release_if_owner(c.sent.slot, c.sent.gen)
        if got.kind == Kind.ERROR:
            err = dataplane_error(got)
            self._count(function, err.status, err.error, c.t0)
            return err
        try:
            res = self._read_reply(got, inst, c.cold, c.inv, c.t0, c.fs, free=settle)
        except InvokeError as e:  # a reply no trigger can answer with: 502 on every path
            self._count(function, e.status, e.error, c.t0)
            return e
        if settle:
            self._settle(c, None, res)
        return res

    def _overran(self, inst: Instance, corr: bytes) -> None:
        """The function's timeout of a call its caller gave up on earlier (a shorter
        ?timeout=): if the instance is still at work on it, it is stopped as at a timeout."""
        p = self.link.pending.get(corr)
        if p is not None and p.inst is inst and p.future is None and inst.running:
            self.kill(inst, "timeout")

    def _settle(self, c: _Call, reply: Descriptor | None, res: InvokeResult) -> None:
        """A result's books: its reply slot freed (if not yet), its count and latency."""
        if reply is not None and reply.has_slot:
            self.link.free(reply.slot, reply.gen)
        status = res.status
        self._count(c.fs.spec.name, status, "handler_error" if status >= 400 else "", c.t0)

    def _count(self, function: str, status: int, error: str, t0: float) -> None:
        self.metrics.calls.count(function, status, time.monotonic() - t0)
        if status >= 400:
            self.metrics.errors.labels(function, error or "error").inc()
