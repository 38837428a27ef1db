"""The node agent: the local backend. It starts, reuses and stops instance processes on this
machine, routes every invocation to them over the shared-memory data plane, bounds queues, scales
idle instances in after their keep-alive, and never stops an instance in the middle of work.

It implements :class:`hearth.invoke.Invoker` for all triggers (HTTP gateway, Redis streams,
replay) and routes chained calls between instances (the payload slot is passed on, not copied).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import itertools
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.batching import batch_sizes, update_service_time
from hearth.controller.keepalive import PolicySet, Profile
from hearth.controller.model import Instance as ObservedInstance
from hearth.controller.model import Node
from hearth.controller.placement import Cluster, Request
from hearth.dataplane.descriptor import MAX_FRAMES, NO_SLOT, Descriptor, Flags, Kind, Status
from hearth.dataplane.endpoint import AsyncEndpoint, unknown_dst_error
from hearth.dataplane.shm import (
    PayloadTooLarge,
    PoolExhausted,
    Slot,
    SlotPool,
    StaleSlot,
    payload_offset,
)
from hearth.invoke import (
    BatchItem,
    InvokeError,
    InvokeResult,
    InvokeTimeout,
    Overloaded,
    UnknownFunction,
)
from hearth.metrics import Metrics
from hearth.runtime.codec import META_RESERVE, error_body, pack_meta, unpack_meta
from hearth.runtime.env import instance_env
from hearth.runtime.instance import SHUTDOWN, write_slot
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.node")

AGENT_ID = 1
POOL_RUNTIME = "python3.11"


class InstanceDied(InvokeError):
    def __init__(self, function: str, instance: str, detail: str = ""):
        super().__init__(
            502,
            "instance_died",
            detail or f"instance {instance} of {function!r} exited during the invocation",
        )


@dataclass
class SlotPayload:
    """A request body the gateway already streamed into a slot at `offset` (one copy: socket → slot)."""

    slot: Slot
    offset: int
    length: int


@dataclass
class InstanceProc:
    id: str
    eid: int
    function: str | None  # None while a generic warm-pool instance
    proc: asyncio.subprocess.Process | None = None
    state: str = "starting"  # starting | pooled | idle | busy | stopping | dead
    inflight: int = 0
    from_pool: bool = False
    ready: asyncio.Future | None = None
    phases: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    served: int = 0
    pending: set[bytes] = field(default_factory=set)
    node: str = "local"
    runtime: str = POOL_RUNTIME
    memory_mb: int = 128
    cpu_millicores: int = 100
    keep_until: float = float("inf")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def live(self) -> bool:
        return self.state not in ("stopping", "dead")


@dataclass
class FunctionState:
    spec: FunctionSpec
    instances: dict[str, InstanceProc] = field(default_factory=dict)
    waiters: collections.deque = field(default_factory=collections.deque)
    starting: int = 0
    last_arrival: float = 0.0
    idle_since: float | None = None  # when the function last had nothing in flight
    cold_start_s: float | None = None  # measured (moving average), for cold-start-aware policies
    prewarm_at: float | None = None  # a policy asked to unload now and pre-warm then
    service_s: float | None = None  # handler seconds per event, timed in the instance (batching)

    def live(self) -> list[InstanceProc]:
        return [i for i in self.instances.values() if i.live]


@dataclass
class Pending:
    inst: InstanceProc
    future: asyncio.Future | None = None
    reply_to: int | None = None  # a chained call: forward the reply to this endpoint
    started: float = field(default_factory=time.monotonic)


def _pdeathsig() -> None:
    """Instances die with the agent, so a killed agent leaves no orphans behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class NodeAgent:
    def __init__(
        self,
        pool: SlotPool,
        proxy_socket: str,
        *,
        node: str = "local",
        redis_url: str | None = None,
        log_dir: Path | None = None,
        metrics: Metrics | None = None,
        warm_pool_size: int = 0,
        on_cold_start: Callable[[dict[str, Any]], None] | None = None,
        nodes: list[Node] | None = None,
        policies: PolicySet | None = None,
    ):
        self.pool = pool
        self.proxy_socket = proxy_socket
        self.node = node
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.metrics = metrics or Metrics()
        self.warm_pool_size = warm_pool_size
        self.on_cold_start = on_cold_start
        # Simulated nodes share this machine's data plane; placement and capacity are real decisions.
        self.nodes = nodes or [
            Node(name=node, cpu_millicores=(os.cpu_count() or 1) * 4000, memory_mb=_mem_mb())
        ]
        self.policies = policies or PolicySet()
        self.start_budget_s = 30.0  # longest wait for an instance (queueing + cold start)
        self.functions: dict[str, FunctionState] = {}
        self.pooled: dict[str, InstanceProc] = {}
        self.by_eid: dict[int, InstanceProc] = {}
        self.pending: dict[bytes, Pending] = {}
        # descriptors posted during one event-loop iteration, by destination: flushed together
        self._outbox: dict[int, list[Descriptor]] = {}
        self._flush_scheduled = False
        self._senders: set[asyncio.Task] = set()
        self._watchers: set[asyncio.Task] = set()  # one per instance process: reaps its exit
        self.cold_starts: list[dict[str, Any]] = []
        self._eids = itertools.count(AGENT_ID + 1)
        self._tasks: list[asyncio.Task] = []
        self.ep: AsyncEndpoint | None = None
        self.closing = False
        self._refilling = False
        self._last_reclaim = 0.0
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.mode = "unknown"

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> NodeAgent:
        self.ep = await AsyncEndpoint.register(self.proxy_socket, AGENT_ID)
        self.mode = getattr(self.ep, "mode", "unknown")
        self.metrics.dataplane_mode.labels(self.mode).set(1)
        self._tasks = [
            asyncio.create_task(self._reader(), name="agent-reader"),
            asyncio.create_task(self._reaper(), name="agent-reaper"),
        ]
        return self

    async def close(self) -> None:
        self.closing = True
        for fs in list(self.functions.values()):
            await self._stop_all(fs)
        await asyncio.gather(
            *(self._stop(i, "shutdown") for i in list(self.pooled.values())), return_exceptions=True
        )
        # every instance has exited: let their watchers finish (slot reclaim) before the pool
        # goes away with the platform
        if self._watchers:
            await asyncio.wait(list(self._watchers), timeout=10)
        for t in [*self._tasks, *self._watchers, *self._senders]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._watchers, *self._senders, return_exceptions=True)
        if self.ep:
            await self.ep.close() if asyncio.iscoroutinefunction(self.ep.close) else self.ep.close()

    # -- registry --------------------------------------------------------------------------
    async def deploy(self, spec: FunctionSpec) -> None:
        self.policies.set(spec.name, spec.keep_alive.policy)
        old = self.functions.get(spec.name)
        if old is not None:
            # Redeploy: new invocations go to new instances; old ones drain and stop.
            self.functions[spec.name] = FunctionState(spec=spec, waiters=old.waiters)
            asyncio.create_task(self._stop_all(old))
        else:
            self.functions[spec.name] = FunctionState(spec=spec)
        await self._ensure_min(self.functions[spec.name])

    async def undeploy(self, name: str) -> bool:
        fs = self.functions.pop(name, None)
        if fs is None:
            return False
        for w in fs.waiters:
            if not w.done():
                w.set_exception(UnknownFunction(name))
        await self._stop_all(fs)
        return True

    # -- invocation ------------------------------------------------------------------------
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
    ) -> InvokeResult:
        t0 = time.monotonic()
        fs = self.functions.get(function)
        if fs is None:
            self._drop(payload)
            raise UnknownFunction(function)
        timeout = min(timeout or fs.spec.timeout_s, fs.spec.timeout_s)
        if invocation_id is None:
            corr, inv = new_invocation_id()
        else:
            inv = invocation_id
            corr = uuid.UUID(inv).bytes if _is_uuid(inv) else os.urandom(16)
        meta = {
            "function": function,
            "content_type": content_type,
            "headers": headers or {},
            "deadline": time.time() + timeout,
            "idempotency_key": idempotency_key,
            "invocation_id": inv,
        }
        try:
            slot, meta_len, length = self._place(payload, meta)
        except PayloadTooLarge as e:  # the same answer for every trigger, never a 500
            self._drop(payload)
            raise InvokeError(413, "payload_too_large", str(e)) from None
        except PoolExhausted as e:
            self._drop(payload)
            raise InvokeError(
                429, "no_space", f"shared-memory pool exhausted, retry later: {e}"
            ) from None
        except Exception:
            self._drop(payload)
            raise
        try:
            # The function's timeout covers execution (as Lambda's does); waiting for a free or
            # freshly started instance is bounded separately by the start budget.
            inst, cold = await self._acquire(fs, t0 + timeout + self.start_budget_s)
        except BaseException:
            self._free(slot.index, slot.gen)
            raise
        if time.monotonic() - t0 > 0.005:  # waited: the handler's deadline starts at dispatch
            meta["deadline"] = time.time() + timeout
            mb = pack_meta(meta, meta_len)
            if len(mb) == meta_len:
                self.pool.view(slot.index, slot.gen, meta_len)[:] = mb
        t_dispatch = time.monotonic()
        d = slot.descriptor(inst.eid, AGENT_ID, length=length, meta_len=meta_len, corr=corr)
        try:
            reply = await self._send_and_wait(inst, d, t_dispatch + timeout - time.monotonic())
        except TimeoutError:
            self._kill(inst, "timeout")
            self.pool.release_if_owner(slot.index, slot.gen)  # never adopted: ours to free
            self._count(function, 504, "timeout", t0)
            raise InvokeTimeout(function, timeout) from None
        except InvokeError as e:
            # The instance died before adopting the request slot: free it, or it leaks.
            self.pool.release_if_owner(slot.index, slot.gen)
            self._count(function, e.status, e.error, t0)
            raise
        res = self._read_reply(reply, inst, cold, inv, t0, fs)
        self._count(function, res.status, "handler_error" if res.status >= 400 else "", t0)
        return res

    async def invoke_batch(
        self,
        function: str,
        items: list[BatchItem],
        *,
        timeout: float | None = None,
        max_batch: int = 32,
    ) -> list[InvokeResult | InvokeError]:
        """Several events for one function (a queue trigger's backlog): fast functions get them
        in batches, one round trip per instance (hearth.batching decides); every event still
        gets its own handler call and outcome, in order."""
        fs = self.functions.get(function)
        if fs is None:
            return [UnknownFunction(function) for _ in items]
        ready = sum(
            i.state in ("idle", "busy") and i.inflight < fs.spec.concurrency
            for i in fs.instances.values()
        )
        sizes = batch_sizes(len(items), fs.service_s, fs.spec.timeout_s, ready, max_batch)
        chunks, at = [], 0
        for k in sizes:
            chunks.append(items[at : at + k])
            at += k
        outs = await asyncio.gather(*(self._invoke_chunk(function, c, timeout) for c in chunks))
        return [r for out in outs for r in out]

    async def _invoke_chunk(
        self, function: str, items: list[BatchItem], timeout: float | None
    ) -> list[InvokeResult | InvokeError]:
        if len(items) > 1:
            try:
                return await self._invoke_batched(function, items, timeout)
            except (PayloadTooLarge, PoolExhausted):
                pass  # too big together: one by one, so each event gets its own precise answer
        out: list[InvokeResult | InvokeError] = []
        for it in items:
            try:
                out.append(
                    await self.invoke(
                        function,
                        it.payload,
                        content_type=it.content_type,
                        headers=it.headers,
                        idempotency_key=it.idempotency_key,
                        invocation_id=it.invocation_id,
                        timeout=timeout,
                    )
                )
            except InvokeError as e:
                out.append(e)
        return out

    async def _invoke_batched(
        self, function: str, items: list[BatchItem], timeout: float | None
    ) -> list[InvokeResult | InvokeError]:
        """One slot `[meta with a row per event][payloads back to back]`, one descriptor with
        Flags.BATCH; the reply has the same shape. Raises PayloadTooLarge/PoolExhausted before
        anything was sent."""
        t0 = time.monotonic()
        fs = self.functions.get(function)
        if fs is None:
            return [UnknownFunction(function) for _ in items]
        timeout = min(timeout or fs.spec.timeout_s, fs.spec.timeout_s)
        invs = [it.invocation_id or new_invocation_id()[1] for it in items]
        rows = [
            [it.content_type, it.headers or {}, it.idempotency_key, inv, len(it.payload)]
            for it, inv in zip(items, invs, strict=True)
        ]
        meta = {"function": function, "deadline": time.time() + timeout, "batch": rows}
        slot, meta_len, length = write_slot(self.pool, meta, b"".join(it.payload for it in items))
        n = len(items)
        try:
            inst, cold = await self._acquire(fs, t0 + timeout + self.start_budget_s)
        except InvokeError as e:
            self._free(slot.index, slot.gen)
            return [e] * n
        except BaseException:
            self._free(slot.index, slot.gen)
            raise
        self.metrics.batches.labels(function).inc()
        self.metrics.batched_events.labels(function).inc(n)
        d = slot.descriptor(
            inst.eid,
            AGENT_ID,
            length=length,
            meta_len=meta_len,
            corr=os.urandom(16),
            flags=Flags.BATCH,
        )
        try:
            reply = await self._send_and_wait(inst, d, timeout)
        except TimeoutError:
            self._kill(inst, "timeout")
            self.pool.release_if_owner(slot.index, slot.gen)
            for _ in items:
                self._count(function, 504, "timeout", t0)
            return [InvokeTimeout(function, timeout) for _ in items]
        except InvokeError as e:
            self.pool.release_if_owner(slot.index, slot.gen)
            for _ in items:
                self._count(function, e.status, e.error, t0)
            return [e] * n
        try:
            results = self._read_batch_reply(reply, inst, cold, invs, t0, fs)
        except (ValueError, TypeError, StaleSlot) as e:  # an instance speaking another protocol
            err = InvokeError(502, "bad_reply", f"instance {inst.id}: {e}")
            for _ in items:
                self._count(function, 502, "bad_reply", t0)
            return [err] * n
        for r in results:
            self._count(function, r.status, "handler_error" if r.status >= 400 else "", t0)
        return list(results)

    def _read_batch_reply(
        self,
        d: Descriptor,
        inst: InstanceProc,
        cold: bool,
        invs: list[str],
        t0: float,
        fs: FunctionState,
    ) -> list[InvokeResult]:
        if d.kind == Kind.ERROR or d.slot == NO_SLOT:
            return [self._read_reply(d, inst, cold, inv, t0) for inv in invs]
        try:
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            body = self.pool.view(d.slot, d.gen, d.length, offset=payload_offset(d.meta_len))
            rows = meta.get("batch") or []
            if len(rows) != len(invs):
                raise ValueError(f"batch reply has {len(rows)} results for {len(invs)} events")
            if "t" in meta:
                fs.service_s = update_service_time(fs.service_s, float(meta["t"]), len(rows))
            out, at, dt = [], 0, time.monotonic() - t0
            for (status, ctype, headers, n), inv in zip(rows, invs, strict=True):
                out.append(
                    InvokeResult(
                        status=int(status),
                        body=bytes(body[at : at + n]),
                        content_type=ctype or "application/octet-stream",
                        headers=headers or {},
                        instance_id=inst.id,
                        cold=cold,
                        invocation_id=inv,
                        duration_s=dt,
                    )
                )
                at += n
            return out
        finally:
            self._free(d.slot, d.gen)

    def _place(
        self, payload: bytes | memoryview | SlotPayload, meta: dict[str, Any]
    ) -> tuple[Slot, int, int]:
        if isinstance(payload, SlotPayload):
            mb = pack_meta(meta)
            if len(mb) <= payload.offset:
                payload.slot.buf[: len(mb)] = mb
                # declared as long as the reserve, so the payload starts exactly at `offset`
                # (the reader takes the first msgpack object and ignores what follows)
                return payload.slot, payload.offset, payload.length
            # Metadata larger than the reserve (huge headers): copy once more, rarely.
            body = bytes(payload.slot.buf[payload.offset : payload.offset + payload.length])
            self._free(payload.slot.index, payload.slot.gen)
            slot, mlen, blen = write_slot(self.pool, meta, body, META_RESERVE)
            return slot, mlen, blen
        slot, mlen, blen = write_slot(self.pool, meta, payload, META_RESERVE)
        return slot, mlen, blen

    def _drop(self, payload: Any) -> None:
        if isinstance(payload, SlotPayload):
            self._free(payload.slot.index, payload.slot.gen)

    def _free(self, slot: int, gen: int) -> None:
        try:
            self.pool.release(slot, gen)
        except StaleSlot:
            pass

    async def _acquire(self, fs: FunctionState, deadline: float) -> tuple[InstanceProc, bool]:
        """An instance with a free concurrency slot; starts one (cold) up to max, else queues."""
        now = fs.last_arrival = time.time()
        busy = any(i.inflight for i in fs.instances.values())
        idle_s = None if busy or fs.idle_since is None else now - fs.idle_since
        self.policies.get(fs.spec.name).record(fs.spec.name, now, idle_s, self._profile(fs))
        cold = False
        while True:
            if fs is not self.functions.get(fs.spec.name) and fs.spec.name in self.functions:
                fs = self.functions[fs.spec.name]  # redeployed while we waited
            best = None
            for inst in fs.instances.values():
                if inst.state in ("idle", "busy") and inst.inflight < fs.spec.concurrency:
                    if best is None or inst.last_used > best.last_used:
                        best = inst
            if best is not None:
                best.inflight += 1
                best.state = "busy"
                return best, cold
            live = len(fs.live())
            queued = len(fs.waiters)
            # From zero, start as many as the queue needs; while instances serve, scale out one
            # start at a time: on a small node, several interpreters starting at once take the
            # CPU the serving instances need (a cold-start storm).
            may_start = fs.starting == 0 if live else fs.starting * fs.spec.concurrency <= queued
            if live + fs.starting < fs.spec.max_instances and may_start:
                cold = True
                self._begin_start(fs)
            elif queued >= fs.spec.queue_size + fs.starting * fs.spec.concurrency:
                raise Overloaded(
                    fs.spec.name,
                    f"function {fs.spec.name!r}: {live} instance(s) busy, {queued} queued (queue_size {fs.spec.queue_size})",
                )
            fut = asyncio.get_running_loop().create_future()
            fs.waiters.append(fut)
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise InvokeError(
                    504,
                    "timeout",
                    f"no instance of {fs.spec.name!r} became free in time (max_instances {fs.spec.max_instances}, {len(fs.waiters)} waiting)",
                ) from None
            finally:
                if fut in fs.waiters:
                    fs.waiters.remove(fut)

    def _wake(self, fs: FunctionState | None, n: int = 1) -> None:
        if fs is None:
            return
        while n > 0 and fs.waiters:
            w = fs.waiters.popleft()
            if not w.done():
                w.set_result(None)
                n -= 1

    async def _send_and_wait(self, inst: InstanceProc, d: Descriptor, timeout: float) -> Descriptor:
        fut = asyncio.get_running_loop().create_future()
        key = bytes(d.corr)
        self.pending[key] = Pending(inst=inst, future=fut)
        inst.pending.add(key)
        assert self.ep is not None
        # A timer on the future is much cheaper than asyncio.wait_for (no extra task per call).
        timer = asyncio.get_running_loop().call_later(max(0.001, timeout), _expire, fut)
        try:
            self._post(d.stamp())
            return await fut
        finally:
            timer.cancel()
            self.pending.pop(key, None)
            inst.pending.discard(key)

    def _post(self, d: Descriptor) -> None:
        """Queue a descriptor; everything posted in this loop iteration for one instance leaves
        in one ``sendmsg`` (under load, concurrent requests share the system call and the
        instance's wake-up instead of paying one each)."""
        self._outbox.setdefault(d.dst, []).append(d)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        boxes, self._outbox = self._outbox, {}
        for ds in boxes.values():
            for i in range(0, len(ds), MAX_FRAMES):
                t = asyncio.create_task(self._send_box(ds[i : i + MAX_FRAMES]))
                self._senders.add(t)
                t.add_done_callback(self._senders.discard)

    async def _send_box(self, ds: list[Descriptor]) -> None:
        assert self.ep is not None
        try:
            unrouted = await self.ep.send_many(ds)
        except Exception as e:  # the data plane is gone: every caller in this box hears it
            for d in ds:
                p = self.pending.get(bytes(d.corr))
                if p is not None and p.future is not None and not p.future.done():
                    p.future.set_exception(e)
            return
        for d in unrouted:  # the destination went away as we sent: as if the proxy said so
            self._dispatch(unknown_dst_error(d))

    def _read_reply(
        self,
        d: Descriptor,
        inst: InstanceProc,
        cold: bool,
        inv: str,
        t0: float,
        fs: FunctionState | None = None,
    ) -> InvokeResult:
        if d.kind == Kind.ERROR or d.slot == NO_SLOT:
            return InvokeResult(
                status=d.aux or 502,
                body=error_body(
                    "dataplane_error", f"instance replied with error status {d.status}"
                ),
                content_type="application/json",
                instance_id=inst.id,
                cold=cold,
                invocation_id=inv,
            )
        try:
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            body = bytes(self.pool.view(d.slot, d.gen, d.length, offset=payload_offset(d.meta_len)))
        finally:
            self._free(d.slot, d.gen)
        if fs is not None and "t" in meta:  # the handler's own time (queueing excluded)
            fs.service_s = update_service_time(fs.service_s, float(meta["t"]), 1)
        return InvokeResult(
            status=int(meta.get("status", 200)),
            body=body,
            content_type=meta.get("content_type") or "application/octet-stream",
            headers=meta.get("headers") or {},
            instance_id=inst.id,
            cold=cold,
            invocation_id=inv,
            duration_s=time.monotonic() - t0,
        )

    def _count(self, function: str, status: int, error: str, t0: float) -> None:
        key = (function, status)
        child = self._children.get(key)
        if child is None:  # labels() costs microseconds on every call: keep the children
            child = self._children[key] = (
                self.metrics.invocations.labels(function, str(status)),
                self.metrics.latency.labels(function),
            )
        child[0].inc()
        child[1].observe(time.monotonic() - t0)
        if status >= 400:
            self.metrics.errors.labels(function, error or "error").inc()

    # -- instances -------------------------------------------------------------------------
    def _begin_start(self, fs: FunctionState) -> asyncio.Task:
        """Count the start now (in this loop step, so a burst sees it), run it in a task."""
        fs.starting += 1
        return asyncio.create_task(self._start_for(fs))

    async def _start_for(self, fs: FunctionState) -> None:
        """A cold start for `fs`; the caller has already counted it in `fs.starting`."""
        try:
            inst = await self.start_instance(fs.spec)
            if fs.spec.name in self.functions and self.functions[fs.spec.name] is not fs:
                fs = self.functions[fs.spec.name]
            fs.instances[inst.id] = inst
        except Exception as e:
            log.warning("cold start of %s failed: %s", fs.spec.name, e)
            err = (
                e
                if isinstance(e, InvokeError)
                else InvokeError(502, "cold_start_failed", f"{fs.spec.name}: {e}")
            )
            while fs.waiters:  # fail those waiting for this start rather than letting them hang
                w = fs.waiters.popleft()
                if not w.done():
                    w.set_exception(err)
        finally:
            fs.starting -= 1
        self._wake(fs, fs.spec.concurrency)

    # -- placement ---------------------------------------------------------------------------
    def observed(self) -> list[ObservedInstance]:
        """Live instances as the controller's decision core sees them."""
        out = []
        for inst in [
            *self.pooled.values(),
            *(i for fs in self.functions.values() for i in fs.instances.values()),
        ]:
            if inst.state in ("dead", "stopping"):
                continue
            state = "idle" if inst.state == "pooled" else inst.state
            out.append(
                ObservedInstance(
                    id=inst.id,
                    function=inst.function,
                    node=inst.node,
                    state=state,
                    runtime=inst.runtime,
                    memory_mb=inst.memory_mb,
                    cpu_millicores=inst.cpu_millicores,
                    started_at=inst.started_at,
                    last_used_at=inst.last_used,
                    inflight=inst.inflight,
                    from_pool=inst.from_pool,
                )
            )
        return out

    async def place(self, spec: FunctionSpec) -> str:
        """The node for a new instance of `spec` (placement core). Under memory pressure, idle
        instances are evicted in the order the keep-alive policy chooses, then placement retries."""
        specs = {n: fs.spec for n, fs in self.functions.items()}
        req = Request.for_spec(spec)
        for _ in range(64):
            cluster = Cluster.from_observation(self.nodes, self.observed(), specs)
            i = cluster.best(req)
            if i is not None:
                return cluster.names[i]
            victim = self._eviction_candidate(spec.name)
            if victim is None:
                raise InvokeError(
                    429,
                    "no_capacity",
                    f"no node has {spec.resources.cpu_millicores}m CPU and {spec.resources.memory_mb} MiB free for {spec.name!r}",
                )
            await self._stop(victim, "evicted under memory pressure")
        raise InvokeError(429, "no_capacity", f"could not make room for {spec.name!r}")

    def _eviction_candidate(self, for_function: str) -> InstanceProc | None:
        from hearth.controller.keepalive import Candidate

        pooled = [i for i in self.pooled.values() if i.state == "pooled"]
        if pooled:
            return pooled[0]
        cands = {}
        for fs in self.functions.values():
            for inst in fs.instances.values():
                if (
                    inst.state == "idle"
                    and inst.inflight == 0
                    and len(fs.live()) > fs.spec.min_instances
                ):
                    cands[inst.id] = (
                        inst,
                        Candidate(inst.id, fs.spec.name, inst.last_used, inst.memory_mb),
                    )
        if not cands:
            return None
        order = self.policies.get(for_function).eviction_order(
            [c for _, c in cands.values()], time.time()
        )
        victim = cands[order[0].instance_id][0]
        self.policies.get(victim.function or "").evicted(victim.function or "", time.time())
        return victim

    async def start_instance(
        self,
        spec: FunctionSpec,
        *,
        node: str | None = None,
        use_pool: bool = True,
        instance_id: str | None = None,
        from_pool: str | None = None,
    ) -> InstanceProc:
        """Start one ready instance of `spec` on `node` (default: placement decides): a warm-pool
        instance on that node is specialised when there is one, else a new process starts."""
        requested = time.time()
        node = node or await self.place(spec)
        # Every pool instance is a generic python3.11 runtime (the only runtime today).
        if from_pool is not None:
            p = self.pooled.get(from_pool)
            if p is None or p.state != "pooled" or p.node != node:
                raise ValueError(
                    f"pool instance {from_pool!r} is not an idle pool instance on {node!r}"
                )
        pooled = (
            self.pooled.get(from_pool)
            if from_pool is not None
            else (
                next(
                    (i for i in self.pooled.values() if i.state == "pooled" and i.node == node),
                    None,
                )
                if use_pool
                else None
            )
        )
        if pooled is not None:
            del self.pooled[pooled.id]
            inst = pooled
            inst.id = instance_id or inst.id
            inst.function, inst.state, inst.from_pool = spec.name, "starting", True
            inst.memory_mb, inst.cpu_millicores = (
                spec.resources.memory_mb,
                spec.resources.cpu_millicores,
            )
            inst.ready = asyncio.get_running_loop().create_future()
            slot, mlen, blen = write_slot(self.pool, {"spec": spec.to_dict()}, b"")
            spawned = time.time()
            assert self.ep is not None
            await self.ep.send(
                slot.descriptor(inst.eid, AGENT_ID, length=blen, meta_len=mlen).stamp()
            )
            asyncio.create_task(self._refill_pool())
        else:
            inst, spawned = await self._spawn(spec, node, instance_id)
        try:
            assert inst.ready is not None
            phases = await asyncio.wait_for(inst.ready, timeout=max(30.0, spec.timeout_s))
        except BaseException:
            self._kill(inst, "cold start failed")
            raise
        inst.state, inst.last_used = "idle", time.time()
        inst.keep_until = inst.last_used + spec.keep_alive.ttl_s  # until its first invocation
        self._record_cold_start(spec, inst, requested, spawned, phases)
        return inst

    async def _spawn(
        self, spec: FunctionSpec | None, node: str, instance_id: str | None = None
    ) -> tuple[InstanceProc, float]:
        eid = next(self._eids)
        iid = instance_id or f"{(spec.name if spec else 'pool')}-{uuid.uuid4().hex[:8]}"
        inst = InstanceProc(
            id=iid,
            eid=eid,
            function=spec.name if spec else None,
            ready=asyncio.get_running_loop().create_future(),
            node=node,
            runtime=POOL_RUNTIME,
            memory_mb=spec.resources.memory_mb if spec else 128,
            cpu_millicores=spec.resources.cpu_millicores if spec else 100,
        )
        boot = {
            "instance_id": iid,
            "endpoint_id": eid,
            "agent_id": AGENT_ID,
            "node": node,
            "pool": self.pool.name,
            "proxy_socket": self.proxy_socket,
            "redis_url": self.redis_url,
            "spec": spec.to_dict() if spec else None,
        }
        env = instance_env(spec.env if spec else None, boot)
        out: Any = asyncio.subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            out = open(self.log_dir / f"{iid}.log", "ab")  # noqa: SIM115 - handed to the child
        self.by_eid[eid] = inst
        spawned = time.time()
        inst.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hearth.runtime.instance",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=_pdeathsig,
        )
        if out is not asyncio.subprocess.DEVNULL:
            out.close()
        self._watchers.add(t := asyncio.create_task(self._watch(inst)))
        t.add_done_callback(self._watchers.discard)
        return inst, spawned

    def _record_cold_start(
        self,
        spec: FunctionSpec,
        inst: InstanceProc,
        requested: float,
        spawned: float,
        phases: dict[str, float],
    ) -> None:
        ready = phases.get("ready", time.time())
        if inst.from_pool:
            # The process was already up: allocation is only the hand-over to the pooled instance.
            p = {
                "requested": requested,
                "spawned": spawned,
                "process_started": phases.get("code_import_start", spawned),
            }
        else:
            p = {
                "requested": requested,
                "spawned": spawned,
                "process_started": phases.get("process_started", spawned),
            }
        p["code_imported"] = phases.get("code_imported", p["process_started"])
        p["deps_ready"] = phases.get("deps_ready", p["code_imported"])
        p["ready"] = ready
        inst.phases = p
        rec = {
            "function": spec.name,
            "instance": inst.id,
            "node": inst.node,
            "from_pool": inst.from_pool,
            "memory_mb": spec.resources.memory_mb,
            "cpu_millicores": spec.resources.cpu_millicores,
            "phases": p,
        }
        self.cold_starts.append(rec)
        del self.cold_starts[:-10_000]
        costs = {
            "scheduling": p["spawned"] - p["requested"],
            "pod_allocation": p["process_started"] - p["spawned"],
            "deploy_code": p["code_imported"] - p["process_started"],
            "deploy_dependency": p["ready"] - p["code_imported"],
        }
        costs["total"] = sum(costs.values())
        fs = self.functions.get(spec.name)
        if fs is not None:  # moving average: what a cold start of this function costs now
            fs.cold_start_s = (
                costs["total"]
                if fs.cold_start_s is None
                else 0.7 * fs.cold_start_s + 0.3 * costs["total"]
            )
        self.metrics.cold_starts.labels(spec.name, "pool" if inst.from_pool else "process").inc()
        for ph, v in costs.items():
            self.metrics.cold_phase.labels(spec.name, ph).observe(max(0.0, v))
        if self.on_cold_start:
            try:
                self.on_cold_start(rec)
            except Exception:  # recording must never break serving
                log.exception("cold-start recorder failed")

    async def _watch(self, inst: InstanceProc) -> None:
        assert inst.proc is not None
        rc = await inst.proc.wait()
        was = inst.state
        inst.state = "dead"
        self.by_eid.pop(inst.eid, None)
        self.pooled.pop(inst.id, None)
        if inst.ready is not None and not inst.ready.done():
            inst.ready.set_exception(
                InvokeError(
                    502,
                    "cold_start_failed",
                    f"instance {inst.id} exited with code {rc} before it was ready",
                )
            )
        for key in list(inst.pending):
            p = self.pending.get(key)
            if p and p.future and not p.future.done():
                p.future.set_exception(
                    InstanceDied(
                        inst.function or "?",
                        inst.id,
                        f"instance {inst.id} of {inst.function!r} died (exit code {rc}) during the invocation",
                    )
                )
            elif p and p.reply_to is not None:
                self.pending.pop(key, None)
                await self._send_error(p.reply_to, key, 502)
        freed = self.pool.reclaim_dead()
        if was not in ("stopping",) and not self.closing:
            log.warning(
                "instance %s (%s) exited with code %s; %d slot(s) reclaimed",
                inst.id,
                inst.function,
                rc,
                freed,
            )
        fs = self.functions.get(inst.function or "")
        if fs is not None:
            fs.instances.pop(inst.id, None)
            self._wake(fs, len(fs.waiters))  # waiters re-evaluate: maybe start a replacement

    def _kill(self, inst: InstanceProc, why: str) -> None:
        if inst.proc and inst.proc.returncode is None:
            (log.debug if self.closing else log.warning)("killing instance %s: %s", inst.id, why)
            inst.state = "stopping" if why == "shutdown" else inst.state
            try:
                inst.proc.kill()
            except ProcessLookupError:
                pass

    async def _stop(self, inst: InstanceProc, why: str, grace: float = 10.0) -> None:
        """Graceful stop: only when idle; the instance finishes and exits, else it is killed."""
        inst.state = "stopping"
        if inst.proc is None or inst.proc.returncode is not None:
            return
        try:
            assert self.ep is not None
            await self.ep.send(
                Descriptor(dst=inst.eid, src=AGENT_ID, kind=Kind.CANCEL, flags=SHUTDOWN).stamp()
            )
            await asyncio.wait_for(inst.proc.wait(), grace)
        except Exception:
            self._kill(inst, why)
            await inst.proc.wait()

    async def _stop_all(self, fs: FunctionState) -> None:
        await asyncio.gather(
            *(self._drain_and_stop(i) for i in list(fs.instances.values())), return_exceptions=True
        )

    async def _drain_and_stop(self, inst: InstanceProc) -> None:
        while inst.inflight > 0 and inst.state != "dead":
            await asyncio.sleep(0.01)
        await self._stop(inst, "shutdown")

    async def _ensure_min(self, fs: FunctionState) -> None:
        missing = fs.spec.min_instances - len(fs.live()) - fs.starting
        await asyncio.gather(
            *(self._begin_start(fs) for _ in range(max(0, missing))), return_exceptions=True
        )

    async def start_pool_instance(self, node: str, instance_id: str | None = None) -> InstanceProc:
        """One generic warm-pool instance on `node`, ready to be specialised."""
        inst, _ = await self._spawn(None, node, instance_id)
        self.pooled[inst.id] = inst
        try:
            assert inst.ready is not None
            inst.phases = await asyncio.wait_for(inst.ready, 30)
            inst.state = "pooled"
        except BaseException:
            self.pooled.pop(inst.id, None)
            self._kill(inst, "pool start failed")
            raise
        return inst

    async def _refill_pool(self) -> None:
        """Keep `warm_pool_size` generic instances per node (Fission-style pools)."""
        if self._refilling:
            return
        self._refilling = True
        try:
            for n in self.nodes:
                while (
                    not self.closing
                    and sum(1 for i in self.pooled.values() if i.node == n.name)
                    < self.warm_pool_size
                ):
                    try:
                        await self.start_pool_instance(n.name)
                    except Exception as e:
                        log.warning("warm-pool instance failed to start: %s", e)
                        return
        finally:
            self._refilling = False

    async def _reaper(self) -> None:
        """Scale in idle instances when their keep-alive window ends; pre-warm when a policy asks;
        keep min instances and the warm pool."""
        if self.warm_pool_size:
            asyncio.create_task(self._refill_pool())
        while True:
            await asyncio.sleep(0.05)
            now = time.time()
            for fs in list(self.functions.values()):
                live = fs.live()
                for inst in live:
                    if (
                        inst.state == "idle"
                        and inst.inflight == 0
                        and now >= inst.keep_until
                        and len(fs.live()) > fs.spec.min_instances
                        and not fs.waiters
                    ):
                        asyncio.create_task(self._stop(inst, "keep-alive expired"))
                if len(live) < fs.spec.min_instances and fs.starting == 0:
                    asyncio.create_task(self._ensure_min(fs))
                if fs.prewarm_at is not None and now >= fs.prewarm_at:
                    fs.prewarm_at = None
                    if not live and fs.starting == 0:
                        self._begin_start(fs)  # off the request path
            self._update_gauges()
            if now - self._last_reclaim > 2.0:  # slots of processes that died unseen
                self._last_reclaim = now
                self.pool.reclaim_dead()

    def _profile(self, fs: FunctionState) -> Profile:
        return Profile(
            memory_mb=fs.spec.resources.memory_mb,
            cold_start_s=fs.cold_start_s or 1.0,
            ttl_s=fs.spec.keep_alive.ttl_s,
        )

    def _update_gauges(self) -> None:
        self.metrics.instances.clear()
        for fs in self.functions.values():
            counts = collections.Counter(i.state for i in fs.instances.values())
            for state in ("starting", "idle", "busy", "stopping"):
                self.metrics.instances.labels(fs.spec.name, state).set(counts.get(state, 0))
        self.metrics.instances.labels("(pool)", "pooled").set(len(self.pooled))

    # -- data-plane reader -----------------------------------------------------------------
    async def _reader(self) -> None:
        assert self.ep is not None
        while True:
            try:
                d = await self.ep.recv()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("agent data-plane endpoint failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            try:
                self._dispatch(d)
            except Exception:
                log.exception("bad descriptor from %s", d.src)

    def _dispatch(self, d: Descriptor) -> None:
        key = bytes(d.corr)
        if d.kind in (Kind.REPLY, Kind.ERROR):
            p = self.pending.pop(key, None)
            if p is None:
                if d.has_slot:  # the caller gave up (timeout): drop the reply
                    self._free(d.slot, d.gen)
                return
            self._done(p.inst)
            if p.future is not None and not p.future.done():
                if d.kind == Kind.ERROR and d.status == Status.UNKNOWN_DST:
                    p.future.set_exception(
                        InstanceDied(
                            p.inst.function or "?",
                            p.inst.id,
                            f"instance {p.inst.id} is not registered with the proxy",
                        )
                    )
                else:
                    p.future.set_result(d)
            elif p.reply_to is not None:
                p.inst.pending.discard(key)
                fwd = dataclasses.replace(d, dst=p.reply_to, src=AGENT_ID)  # same slot, onwards
                asyncio.create_task(self.ep.send(fwd.stamp()))  # type: ignore[union-attr]
        elif d.kind == Kind.PONG and d.has_slot:
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            self._free(d.slot, d.gen)
            inst = self.by_eid.get(d.src)
            if inst is None or inst.ready is None or inst.ready.done():
                return
            if meta.get("type") in ("ready", "pooled"):
                inst.ready.set_result(meta.get("phases") or {})
            else:
                inst.ready.set_exception(
                    InvokeError(
                        502,
                        "cold_start_failed",
                        f"{inst.function}: {meta.get('error', 'instance failed to start')}",
                    )
                )
        elif d.kind == Kind.INVOKE:
            asyncio.create_task(self._route(d))

    def _done(self, inst: InstanceProc) -> None:
        inst.inflight = max(0, inst.inflight - 1)
        inst.served += 1
        now = inst.last_used = time.time()
        fs = self.functions.get(inst.function or "")
        if inst.state == "busy" and inst.inflight == 0:
            inst.state = "idle"
            if fs is not None:
                self._went_idle(fs, inst, now)
        self._wake(fs)

    def _went_idle(self, fs: FunctionState, inst: InstanceProc, now: float) -> None:
        """Ask the function's keep-alive policy how long this idle instance stays loaded."""
        if all(i.inflight == 0 for i in fs.instances.values()):
            fs.idle_since = now
        w = self.policies.get(fs.spec.name).window(fs.spec.name, now, self._profile(fs))
        keep = w.keep_s if w.keep_s != float("inf") else fs.spec.keep_alive.ttl_s
        if w.prewarm_s > 0:  # unload now, come back just before the predicted next arrival
            inst.keep_until = now
            fs.prewarm_at = now + w.prewarm_s
        else:
            inst.keep_until = now + max(0.0, keep)

    async def _route(self, d: Descriptor) -> None:
        """A chained call from an instance: pick the target's instance and forward the same slot."""
        key = bytes(d.corr)
        try:
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            fs = self.functions.get(meta.get("function", ""))
            if fs is None:
                raise UnknownFunction(meta.get("function", ""))
            inst, _ = await self._acquire(fs, time.monotonic() + fs.spec.timeout_s)
        except InvokeError as e:
            if not d.flags & Flags.BORROWED:  # a lent buffer stays with its owner
                self._free(d.slot, d.gen)
            await self._send_error(d.src, key, e.status, e.detail)
            return
        except StaleSlot:
            await self._send_error(d.src, key, 410, "stale slot")
            return
        except Exception as e:  # unreadable metadata: answer the caller now, free the slot
            if not d.flags & Flags.BORROWED:
                self._free(d.slot, d.gen)
            await self._send_error(d.src, key, 400, f"bad chained call: {type(e).__name__}: {e}")
            return
        self.pending[key] = Pending(inst=inst, reply_to=d.src)
        inst.pending.add(key)
        assert self.ep is not None
        await self.ep.send(dataclasses.replace(d, dst=inst.eid, src=AGENT_ID).stamp())

    async def _send_error(self, dst: int, corr: bytes, http_status: int, detail: str = "") -> None:
        assert self.ep is not None
        slot_args: dict[str, Any] = {}
        if detail:
            slot, mlen, blen = write_slot(self.pool, {"status": http_status, "detail": detail}, b"")
            slot_args = {"slot": slot.index, "gen": slot.gen, "meta_len": mlen, "length": blen}
        await self.ep.send(
            Descriptor(
                dst=dst,
                src=AGENT_ID,
                kind=Kind.ERROR,
                status=Status.HANDLER_ERROR,
                corr=corr,
                aux=http_status,
                **slot_args,
            ).stamp()
        )

    # -- introspection ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "dataplane": self.mode,
            "pool": self.pool.stats(),
            "warm_pool": len(self.pooled),
            "functions": {
                name: {
                    "instances": [
                        {
                            "id": i.id,
                            "pid": i.pid,
                            "state": i.state,
                            "inflight": i.inflight,
                            "served": i.served,
                            "from_pool": i.from_pool,
                            "node": i.node,
                            "idle_s": round(time.time() - i.last_used, 3),
                        }
                        for i in fs.instances.values()
                    ],
                    "queued": len(fs.waiters),
                    "starting": fs.starting,
                }
                for name, fs in self.functions.items()
            },
        }


def _mem_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError):
        return 8192


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def new_invocation_id() -> tuple[bytes, str]:
    """A random (version 4) UUID as (16 bytes, canonical text), without uuid.UUID's overhead
    (this runs on every invocation)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return bytes(b), f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
        return True
    except ValueError:
        return False
