"""A function instance: one OS process that loads a handler once (cold start) and serves many
invocations (warm), reading 64-byte descriptors from its data-plane endpoint and payloads from
shared-memory slots.

Started by the node agent as ``python -m hearth.runtime.instance`` with its boot record (JSON) in
the ``HEARTH_INSTANCE`` environment variable. Without a ``spec`` in the boot record it is a generic
warm-pool instance: interpreter up and common dependencies imported, waiting to be specialised.

Lean on purpose (issue #19): importing this module imports the standard library's threading,
sockets and msgpack, nothing more -- no numpy (imported when a handler asks for arrays, or
preloaded by the zygote from the spec's ``preload``), no pydantic (the agent validated the spec;
:class:`RunSpec` reads the fields the runtime needs), no asyncio (only for async handlers).
``tests/platform/test_runtime_import.py`` holds it to that.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # first thing: the 'process started' phase timestamp

import collections  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Awaitable  # noqa: E402

from hearth.dataplane.descriptor import (  # noqa: E402
    NO_SLOT,
    PROXY_ID,
    Descriptor,
    Flags,
    Kind,
    new_corr,
)
from hearth.dataplane.endpoint import Endpoint  # noqa: E402
from hearth.dataplane.shm import PayloadTooLarge, SlotPool, StaleSlot, payload_offset  # noqa: E402
from hearth.invoke import InvokeResult  # noqa: E402
from hearth.records import Record  # noqa: E402
from hearth.runtime.codec import META_RESERVE, encode_result, error_body, pack_meta, unpack_meta  # noqa: E402
from hearth.sdk import Context, Event, HandlerError  # noqa: E402

# Not imported here (issue #19: every plain-process start pays for this module's imports):
# typing, dataclasses (it imports inspect), concurrent.futures (with logging) and traceback.
# The worker pool and error printing import theirs when first needed; the zygote preloads them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor
    from typing import Any

SHUTDOWN = 1  # CANCEL flag: finish in-flight work and exit
# Sync handlers whose calls average under this run on the reader thread when nothing else is in
# flight: no hand-off to a worker thread (a wake-up and a GIL transfer per call). Longer or
# chaining handlers go to the worker pool, which is what bounds concurrency.
INLINE_MAX_S = 0.002
REPLY_BATCH = 16  # queued inline replies are sent at this many ...
REPLY_WAIT_S = 0.0005  # ... or once the oldest has waited this long, whichever comes first
ALLOC_META = 4096  # bytes reserved before a ctx.alloc() buffer for the metadata of a forward
# plain ints: an IntFlag's `&` runs Python code, twice per invocation otherwise
_BATCH, _BORROWED = int(Flags.BATCH), int(Flags.BORROWED)


def _awaitable(x: Any) -> bool:
    """``inspect.isawaitable`` without importing inspect."""
    if isinstance(x, Awaitable):
        return True
    code = getattr(x, "gi_code", None)  # a generator made a coroutine by types.coroutine
    return code is not None and bool(code.co_flags & 0x100)  # CO_ITERABLE_COROUTINE


def _coroutine_function(f: Any) -> bool:
    """``inspect.iscoroutinefunction`` (``async def``, also through partials and bound
    methods) without importing inspect."""
    while isinstance(f, functools.partial):
        f = f.func
    f = getattr(f, "__func__", f)
    code = getattr(f, "__code__", None)
    return code is not None and bool(code.co_flags & 0x80)  # CO_COROUTINE


def _print_exc() -> None:
    import traceback

    traceback.print_exc()


def _addr(buf: Any) -> int:
    import numpy as np

    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


class RunSpec(Record):
    """What an instance needs of its function's spec. The agent validated the spec
    (``hearth.spec.FunctionSpec``) and sends ``FunctionSpec.to_dict()``; this reads that dict,
    so the runtime never imports pydantic."""

    _fields = ("name", "handler", "init", "code_path", "env", "concurrency", "timeout_s")

    def __init__(
        self,
        name: str,
        handler: str,
        init: str | None = None,
        code_path: str | None = None,
        env: dict[str, str] | None = None,
        concurrency: int = 1,
        timeout_s: float = 30.0,
    ) -> None:
        self.name = name
        self.handler = handler
        self.init = init
        self.code_path = code_path
        self.env = {} if env is None else env
        self.concurrency = concurrency
        self.timeout_s = timeout_s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(
            name=d["name"],
            handler=d["handler"],
            init=d["init"],
            code_path=d["code_path"],
            env=dict(d["env"]),
            concurrency=int(d["concurrency"]),
            timeout_s=float(d["timeout_s"]),
        )


def load_entry(entry: str) -> Any:
    mod, _, attr = entry.partition(":")
    return getattr(importlib.import_module(mod), attr)


def write_slot(
    pool: SlotPool, meta: dict[str, Any], body: Any, reserve: int = 0
) -> tuple[Any, int, int]:
    """Allocate a slot and write `[meta][pad][body]`: the one copy into shared memory.
    Returns (slot, meta_len, body_len)."""
    mb = pack_meta(meta, reserve)
    body_mv = memoryview(body).cast("B") if not isinstance(body, memoryview) else body.cast("B")
    off = payload_offset(len(mb))
    slot = pool.alloc(off + body_mv.nbytes)
    slot.buf[: len(mb)] = mb
    slot.buf[off : off + body_mv.nbytes] = body_mv
    return slot, len(mb), body_mv.nbytes


class Instance:
    def __init__(self, boot: dict[str, Any], started: float | None = None):
        self.boot = boot
        self.instance_id: str = boot["instance_id"]
        self.eid: int = boot["endpoint_id"]
        self.agent: int = boot["agent_id"]
        self.node: str = boot.get("node", "local")
        # a forked instance (the zygote) started at its fork, not at this module's import
        self.phases: dict[str, float] = {"process_started": started or T_PROCESS}
        self.pool = SlotPool.attach(boot["pool"])
        pre = boot.get("endpoint_fds")  # registered ahead by the agent (zygote forks)
        self.ep = (
            Endpoint.from_fds(boot["proxy_socket"], self.eid, *pre, boot["endpoint_mode"])
            if pre
            else Endpoint.register(boot["proxy_socket"], self.eid)
        )
        self.send_lock = threading.Lock()
        self.waiters: dict[bytes, Future] = {}
        self.spec: RunSpec | None = None
        self.handler: Any = None
        self.is_async = False
        self.loop: Any = None  # an asyncio loop, for async handlers only
        self.executor: ThreadPoolExecutor | None = None  # made by the first call it runs
        self.serving = False
        self.stopping = False
        # ctx.alloc() buffers by payload address: they live as long as this instance
        self.allocs: dict[int, tuple[Any, int]] = {}
        self.reader = threading.current_thread()
        self.inline_ok = True  # turned off for good once a handler chains from the reader thread
        self.avg_s = 1.0  # moving average of handler time; pessimistic until measured
        self.pooled_busy = 0
        self.busy_lock = threading.Lock()
        self.stash: collections.deque[Descriptor] = collections.deque()
        # replies of inline calls while more requests are already received: sent together
        # (one sendmsg, one wake-up of the agent) before the reader next blocks
        self.outq: list[tuple[int, bytes]] = []
        self.outq_t0 = 0.0  # when the oldest queued reply was made (bounds the added latency)
        self.held = False  # the ready report waits in `outq` for the first request's reply

    # -- wire ------------------------------------------------------------------------------
    def send(self, d: Descriptor) -> None:
        d.src = self.eid
        if d.kind == Kind.REPLY and d.has_slot and d.dst == self.agent:
            # the agent owns the reply from now: it survives this process exiting before the
            # agent has read it (else reclaim_dead frees it and a success becomes a 500)
            try:
                self.pool.give_to_creator(d.slot, d.gen)
            except StaleSlot:
                pass
        if d.kind in (Kind.REPLY, Kind.ERROR) and threading.current_thread() is self.reader:
            if not self.outq:
                self.outq_t0 = time.perf_counter()
            self.outq.append((d.dst, d.stamp().pack()))
            return
        with self.send_lock:
            self.ep.send(d.stamp())

    def flush_replies(self) -> None:
        """Send the reader's queued replies: one message per run of the same destination."""
        q, self.outq = self.outq, []
        i = 0
        while i < len(q):
            j = i
            while j < len(q) and q[j][0] == q[i][0]:
                j += 1
            with self.send_lock:
                self.ep.send_frame(b"".join(f for _, f in q[i:j]))
            i = j

    def report(self, event: str, **meta: Any) -> None:
        slot, mlen, _ = write_slot(self.pool, {"type": event, "pid": os.getpid(), **meta}, b"")
        d = Descriptor(dst=self.agent, slot=slot.index, gen=slot.gen, meta_len=mlen, kind=Kind.PONG)
        if event == "ready" and self._request_waiting():
            # The first request is in the socket already (the agent sends it right behind the
            # spec): it runs first and this report leaves with its reply, in one message.
            # Sent now, the report would wake the agent, which then took the CPU from the
            # handler (0.5-7 ms on a busy node). A concurrency-1 handler serves nothing else
            # meanwhile; others run the request on a worker and the report goes at once.
            d.src = self.eid
            self.outq_t0 = time.perf_counter()
            self.outq.append((d.dst, d.stamp().pack()))
            self.held = True
            return
        self.send(d)

    def _request_waiting(self) -> bool:
        """Whether a descriptor can be read without blocking (one poll, no wait)."""
        if self.stash or self.ep.buffered():
            return True
        fd = self.ep.fileno()
        if fd < 0:
            return False
        p = select.poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(0))

    # -- lifecycle -------------------------------------------------------------------------
    def specialise(self, spec: RunSpec) -> None:
        self.spec = spec
        if spec.code_path and spec.code_path not in sys.path:
            sys.path.insert(0, spec.code_path)
        os.environ.update(spec.env)
        self.phases["code_import_start"] = time.time()
        self.handler = load_entry(spec.handler)
        self.phases["code_imported"] = time.time()
        if spec.init:
            init = load_entry(spec.init)
            r = init()
            if _awaitable(r):
                import asyncio

                asyncio.run(r)
        self.phases["deps_ready"] = time.time()
        self.is_async = _coroutine_function(self.handler)
        if self.is_async:
            import asyncio

            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="handler-loop", daemon=True).start()
        self.serving = True  # from here SIGTERM drains instead of exiting at once
        # one call at a time anyway: the first runs on the reader thread (no worker thread to
        # start on the cold path, ~1 ms); its time then decides, as for every later call
        self.avg_s = 0.0 if spec.concurrency == 1 else 1.0
        self.phases["ready"] = time.time()

    def run(self) -> int:
        spec = self.boot.get("spec")
        if spec is None:
            # Warm pool: pay for the interpreter and common imports now, specialise later
            # (a pooled instance does not know its function's preload yet: these are the
            # usual ones; the lean import above stays for forks of a preloaded zygote)
            import asyncio  # noqa: F401

            import numpy  # noqa: F401

            self.phases["pool_ready"] = time.time()
            self.report("pooled", phases=self.phases)
        else:
            self.specialise(RunSpec.from_dict(spec))
            self.report("ready", phases=self.phases)
        return self.serve()

    def serve(self) -> int:
        while not self.stopping:
            try:
                if self.outq and (
                    # the next read would block (or a held ready report has its request
                    # in the socket: that runs first, see `report`)
                    (not self.stash and not self.ep.buffered() and not self._hold())
                    or len(self.outq) >= REPLY_BATCH
                    or time.perf_counter() - self.outq_t0 > REPLY_WAIT_S
                ):
                    self.flush_replies()
                d = self.stash.popleft() if self.stash else self.ep.recv()
            except (ConnectionError, OSError) as e:
                print(f"instance {self.instance_id}: data plane closed: {e}", file=sys.stderr)
                return 1
            if d.src not in (self.agent, PROXY_ID):
                # work, replies and shutdowns come from the agent only (the proxy stamps `src`
                # with the sender's registered id); another instance's descriptor is dropped
                # untouched: its slot is not ours to read or free
                continue
            if d.kind == Kind.INVOKE:
                if self.spec is None:
                    self.handle_specialise(d)
                elif (
                    self.inline_ok
                    and not self.is_async
                    and self.pooled_busy == 0
                    and self.avg_s < INLINE_MAX_S
                ):
                    self.timed_handle(d)
                else:
                    with self.busy_lock:
                        self.pooled_busy += 1
                    (self.executor or self._workers()).submit(self.pooled_handle, d)
            elif d.kind in (Kind.REPLY, Kind.ERROR):
                fut = self.waiters.pop(bytes(d.corr), None)
                if fut is not None:
                    fut.set_result(d)
                elif d.has_slot:
                    self._release(d)
            elif d.kind == Kind.PING:
                self.send(d.reply(kind=Kind.PONG))
            elif d.kind == Kind.CANCEL and d.flags & SHUTDOWN:
                self.stopping = True
        if self.executor:
            self.executor.shutdown(wait=True)  # never kill work in the middle of an invocation
        self.flush_replies()
        return 0

    def _hold(self) -> bool:
        """Keep the queued replies (a held ready report) for one more read: only once, right
        after specialising, and only if that read finds a request at once."""
        if not self.held:
            return False
        self.held = False
        return self._request_waiting()

    def _workers(self) -> ThreadPoolExecutor:
        """The handler threads, made when a call first needs one: short calls of a
        concurrency-1 function run on the reader thread and never do."""
        from concurrent.futures import ThreadPoolExecutor

        assert self.spec is not None
        self.executor = ThreadPoolExecutor(
            max_workers=self.spec.concurrency, thread_name_prefix="handler"
        )
        return self.executor

    def timed_handle(self, d: Descriptor) -> None:
        t0 = time.perf_counter()
        n = self.handle_batch(d) if d.flags & _BATCH else self.handle(d) or 1
        self.avg_s = 0.8 * self.avg_s + 0.2 * (time.perf_counter() - t0) / max(1, n)

    def pooled_handle(self, d: Descriptor) -> None:
        try:
            self.timed_handle(d)
        finally:
            with self.busy_lock:
                self.pooled_busy -= 1

    def handle_specialise(self, d: Descriptor) -> None:
        meta = self._meta(d)
        self._release(d)
        try:
            self.specialise(RunSpec.from_dict(meta["spec"]))
            self.report("ready", phases=self.phases, from_pool=True)
        except Exception as e:  # the agent stops this instance and reports the error
            self.report("failed", error=f"{type(e).__name__}: {e}", phases=self.phases)

    # -- invocations -----------------------------------------------------------------------
    def _meta(self, d: Descriptor) -> dict[str, Any]:
        return unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len)) if d.meta_len else {}

    def _release(self, d: Descriptor) -> None:
        try:
            self.pool.release(d.slot, d.gen)
        except StaleSlot:
            pass

    def handle(self, d: Descriptor) -> None:
        assert self.spec is not None
        spent = 0.0
        borrowed = bool(d.flags & _BORROWED)  # the sender keeps the slot: no adopt/release
        forwarded = [borrowed]
        try:
            if not borrowed:
                self.pool.adopt(d.slot, d.gen)
            meta = self._meta(d)
            payload = self.pool.view(
                d.slot, d.gen, d.length, offset=payload_offset(d.meta_len)
            ).toreadonly()
        except StaleSlot as e:
            status, ctype, headers, body = (
                410,
                "application/json",
                {},
                error_body("stale_slot", str(e)),
            )
        else:
            t0 = time.perf_counter()
            status, ctype, headers, body = self._run(d, meta, payload, forwarded)
            spent = time.perf_counter() - t0
        # "t": the handler's own time, so the agent's batching decision ignores queueing
        reply_meta = {"status": status, "content_type": ctype, "headers": headers, "t": spent}
        if not forwarded[0] and isinstance(body, (bytes, bytearray)):
            # The request slot is ours and its payload is no longer needed: a reply that fits goes
            # back in it (no second allocation; the caller frees it after reading the reply).
            mb = pack_meta(reply_meta)
            off = payload_offset(len(mb))
            if off + len(body) <= self.pool.capacity(d.slot):
                try:
                    self.pool.view(d.slot, d.gen, off + len(body))[: len(mb)] = mb
                    self.pool.view(d.slot, d.gen, len(body), off)[:] = body
                except StaleSlot:
                    pass
                else:
                    self.send(
                        d.reply(
                            kind=Kind.REPLY,
                            slot=d.slot,
                            gen=d.gen,
                            length=len(body),
                            meta_len=len(mb),
                        )
                    )
                    return
        try:
            slot, mlen, blen = write_slot(self.pool, reply_meta, body)
        except Exception as e:  # no space for the reply: say so without a slot
            _print_exc()
            # 507: the pool is full right now (the agent answers 503 + Retry-After);
            # 413: the reply can never fit (a function error)
            aux = 413 if isinstance(e, PayloadTooLarge) else 507
            out = d.reply(kind=Kind.ERROR, status=5, aux=aux, length=0)
            print(f"reply failed: {e}", file=sys.stderr)
        else:
            out = d.reply(
                kind=Kind.REPLY, slot=slot.index, gen=slot.gen, length=blen, meta_len=mlen
            )
        finally:
            # freed before the reply goes: a caller holding the answer never sees the request
            # slot still in use (the body, if it was a view of it, is copied by now)
            if not forwarded[0]:
                self._release(d)
        self.send(out)

    def _run(
        self, d: Descriptor, meta: dict[str, Any], payload: memoryview, forwarded: list[bool]
    ) -> tuple[int, str, dict[str, str], Any]:
        """Call the handler on one event; every failure becomes a status and a JSON error."""
        assert self.spec is not None
        req_headers: dict[str, str] = meta.get("headers") or {}
        try:
            ctx = Context(
                function=self.spec.name,
                instance_id=self.instance_id,
                invocation_id=meta.get("invocation_id") or str(d.invocation_id),
                deadline=float(meta.get("deadline") or (time.time() + self.spec.timeout_s)),
                node=self.node,
                idempotency_key=meta.get("idempotency_key"),
                caller=meta.get("caller"),  # set by chain(); the gateway never sets it
            )
            event = Event(
                payload=payload,
                context=ctx,
                content_type=meta.get("content_type") or "application/octet-stream",
                headers=req_headers,
            )
            ctx._invoke = lambda fn, p, ct, tok=None: self.chain(
                d, event, forwarded, fn, p, ct, tok
            )
            ctx._emit = self.emit
            ctx._alloc = self.alloc
            result = self.handler(event)
            if _awaitable(result):
                import asyncio  # imported already: the handler is async

                assert self.loop is not None
                result = asyncio.run_coroutine_threadsafe(_await(result), self.loop).result()
            return encode_result(result, req_headers)
        except HandlerError as e:
            return e.status, "application/json", {}, error_body("handler_error", str(e))
        except StaleSlot as e:
            return 410, "application/json", {}, error_body("stale_slot", str(e))
        except Exception as e:
            _print_exc()
            return (
                500,
                "application/json",
                {},
                error_body("handler_error", f"{type(e).__name__}: {e}"),
            )

    def handle_batch(self, d: Descriptor) -> int:
        """Several events in one slot (Flags.BATCH, from a queue backlog): each gets its own
        context, handler call and outcome; one reply lists them in order. A chained call from
        a batched event copies its payload (the slot holds the whole batch)."""
        rows: list[list[Any]] = []
        bodies: list[bytes] = []
        t0 = time.perf_counter()
        try:
            self.pool.adopt(d.slot, d.gen)
            meta = self._meta(d)
            base, at = payload_offset(d.meta_len), 0
            for ctype, headers, idem, inv, n in meta["batch"]:
                payload = self.pool.view(d.slot, d.gen, n, offset=base + at).toreadonly()
                at += n
                item = {
                    "content_type": ctype,
                    "headers": headers,
                    "idempotency_key": idem,
                    "invocation_id": inv,
                    "deadline": meta.get("deadline"),
                }
                status, rctype, rheaders, body = self._run(d, item, payload, [True])
                body = bytes(body)  # before the slot is reused for the reply
                rows.append([status, rctype, rheaders, len(body)])
                bodies.append(body)
        except Exception as e:  # unreadable batch: say so without a slot; the agent fails each
            _print_exc()
            self._release(d)
            self.send(d.reply(kind=Kind.ERROR, status=5, aux=400 if not rows else 500, length=0))
            print(f"bad batch: {type(e).__name__}: {e}", file=sys.stderr)
            return max(1, len(rows))
        reply_meta = {"status": 200, "batch": rows, "t": time.perf_counter() - t0}
        mb = pack_meta(reply_meta)
        off, total = payload_offset(len(mb)), sum(map(len, bodies))
        if off + total <= self.pool.capacity(d.slot):  # the reply goes back in the request slot
            buf = self.pool.view(d.slot, d.gen, off + total)
            buf[: len(mb)] = mb
            at = off
            for b in bodies:
                buf[at : at + len(b)] = b
                at += len(b)
            self.send(
                d.reply(kind=Kind.REPLY, slot=d.slot, gen=d.gen, length=total, meta_len=len(mb))
            )
            return len(rows)
        self._release(d)
        try:
            slot, mlen, blen = write_slot(self.pool, reply_meta, b"".join(bodies))
        except Exception as e:
            self.send(d.reply(kind=Kind.ERROR, status=5, aux=507, length=0))
            print(f"batch reply failed: {e}", file=sys.stderr)
        else:
            self.send(
                d.reply(kind=Kind.REPLY, slot=slot.index, gen=slot.gen, length=blen, meta_len=mlen)
            )
        return len(rows)

    def chain(
        self,
        d: Descriptor,
        event: Event,
        forwarded: list[bool],
        function: str,
        payload: Any,
        ctype: str,
        token: str | None = None,
    ) -> InvokeResult:
        """Invoke another function through the agent. The event's own slot is lent (BORROWED):
        the callee reads it and answers in a slot of its own, so the caller's ``event.payload``
        stays what it was and stays the caller's even if the callee dies."""
        assert self.spec is not None
        meta = {
            "function": function,
            "content_type": ctype,
            "headers": {},
            "deadline": event.context.deadline,
            "caller": self.spec.name,
        }
        if token is not None:
            meta["token"] = token  # the target's invoke token, checked by the agent
        corr = new_corr()
        hit = self._alloc_of(payload)
        if hit is not None:  # a ctx.alloc() buffer: lend it by descriptor, no copy
            slot, n = hit
            mb = pack_meta(meta, ALLOC_META)
            if len(mb) == ALLOC_META:
                slot.buf[:ALLOC_META] = mb
                return self._call_agent(slot.index, slot.gen, n, ALLOC_META, corr, lent=True)
        if payload is event.payload:
            mb = pack_meta(meta)
            # the slot's metadata block carries one call at a time: a second concurrent call
            # with the same payload (or metadata past the reserve) copies
            if len(mb) > payload_offset(d.meta_len) or forwarded[0] or len(forwarded) > 1:
                payload = bytes(payload)
            else:
                self.pool.view(d.slot, d.gen, len(mb))[:] = mb
                forwarded.append(True)  # lent: marks the metadata block as in use
                try:
                    return self._call_agent(d.slot, d.gen, d.length, d.meta_len, corr, lent=True)
                finally:
                    forwarded.pop()
        return self._call_copy(meta, payload, corr)

    def _call_copy(self, meta: dict[str, Any], body: Any, corr: bytes) -> InvokeResult:
        """A call to the agent with `body` copied into a slot of its own (the callee's)."""
        slot, mlen, blen = write_slot(self.pool, meta, body, META_RESERVE)
        return self._call_agent(slot.index, slot.gen, blen, mlen, corr)

    def _call_agent(
        self, slot: int, gen: int, length: int, meta_len: int, corr: bytes, lent: bool = False
    ) -> InvokeResult:
        """An INVOKE to the agent (a chained call or an emit) and its answer; `lent`: the slot
        stays this instance's (BORROWED), the callee only reads it."""
        return self._call(
            Descriptor(
                dst=self.agent,
                slot=slot,
                gen=gen,
                length=length,
                meta_len=meta_len,
                kind=Kind.INVOKE,
                corr=corr,
                flags=Flags.BORROWED if lent else Flags.NONE,
            )
        )

    def alloc(self, nbytes: int) -> memoryview:
        """A writable shared-memory buffer owned by this instance (freed when it exits).
        Passing it (or a prefix of it) to ctx.invoke lends it to the callee without a copy."""
        slot = self.pool.alloc(ALLOC_META + max(nbytes, 1))
        view = slot.buf[ALLOC_META : ALLOC_META + nbytes]
        # a freed slot still holds its last owner's bytes (possibly another function's payload)
        view[:] = bytes(nbytes) if nbytes <= 1 << 16 else _zeros(nbytes)
        self.allocs[_addr(view)] = (slot, nbytes)
        return view

    def _alloc_of(self, payload: Any) -> tuple[Any, int] | None:
        if not self.allocs:
            return None
        try:
            mv = memoryview(payload)
        except TypeError:
            return None
        if not mv.c_contiguous:
            return None
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        hit = self.allocs.get(_addr(mv))
        return (hit[0], mv.nbytes) if hit is not None and mv.nbytes <= hit[1] else None

    def _call(self, out: Descriptor) -> InvokeResult:
        assert self.spec is not None
        if threading.current_thread() is self.reader:
            r = self._pump_for(out)  # running inline: nobody else reads the endpoint
        else:
            from concurrent.futures import Future  # a worker's call: its module is loaded

            fut: Future = Future()
            key = bytes(out.corr)
            self.waiters[key] = fut
            self.send(out)
            try:
                r = fut.result(timeout=self.spec.timeout_s)
            except TimeoutError:
                self.waiters.pop(key, None)  # a late reply then finds no waiter and is released
                raise HandlerError(
                    f"chained call did not answer within {self.spec.timeout_s:g}s", 504
                ) from None
        if r.kind == Kind.ERROR or r.slot == NO_SLOT:
            meta = self._meta(r) if r.slot != NO_SLOT else {}
            if r.slot != NO_SLOT:
                self._release(r)
            raise HandlerError(
                meta.get("detail") or f"chained call failed (status {r.status})", r.aux or 502
            )
        meta = self._meta(r)
        body = bytes(self.pool.view(r.slot, r.gen, r.length, offset=payload_offset(r.meta_len)))
        self._release(r)
        return InvokeResult(
            status=int(meta.get("status", 200)),
            body=body,
            content_type=meta.get("content_type", ""),
            headers=meta.get("headers") or {},
        )

    def _pump_for(self, out: Descriptor) -> Descriptor:
        """A chained call from the reader thread: read the endpoint until its reply comes,
        keeping other descriptors for the serve loop; later calls of this handler use workers."""
        assert self.spec is not None
        self.inline_ok = False
        key = bytes(out.corr)
        self.flush_replies()  # about to block on the reply: earlier answers go first
        self.send(out)
        deadline = time.monotonic() + self.spec.timeout_s
        while True:
            d = self.ep.recv(timeout=max(0.001, deadline - time.monotonic()))
            if (
                d.kind in (Kind.REPLY, Kind.ERROR)
                and bytes(d.corr) == key
                and d.src in (self.agent, PROXY_ID)
            ):
                return d
            fut = (
                self.waiters.pop(bytes(d.corr), None)
                if d.kind in (Kind.REPLY, Kind.ERROR)
                else None
            )
            if fut is not None:
                fut.set_result(d)
            else:
                self.stash.append(d)

    def emit(self, stream: str, data: Any, meta: dict[str, Any]) -> str:
        """Publish through the agent, which holds the Redis credentials (function code never
        does): the event goes as a chained call with ``emit`` in its metadata."""
        from hearth.queue.wire import encode_payload, validate_stream_name

        meta = dict(meta or {})
        ct = meta.pop("content_type", None)
        validate_stream_name(stream)
        body, ct = encode_payload(data, ct)
        headers = {str(k): str(v) for k, v in (meta.pop("headers", None) or {}).items()}
        rest = {str(k): v if k in ("invocation_id",) else str(v) for k, v in meta.items()}
        m = {"emit": stream, "content_type": ct, "headers": headers, "meta": rest}
        return self._call_copy(m, body, new_corr()).body.decode()


def _zeros(n: int) -> memoryview:
    import numpy as np

    return memoryview(np.zeros(n, dtype=np.uint8))


async def _await(aw: Any) -> Any:
    return await aw


def run_instance(boot: dict[str, Any], started: float | None = None, leave: Any = None) -> int:
    """Serve as the instance `boot` describes until told to stop; the exit code. `leave`
    replaces the SIGTERM behaviour (a joined pod asks its node agent to drain it instead)."""
    inst: Instance | None = None

    def on_term(*_: Any) -> None:
        if leave is not None:
            leave()
            return
        if inst is None or not inst.serving:
            os._exit(0)
        inst.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    inst = Instance(boot, started)
    try:
        return inst.run()
    except Exception as e:
        # A cold start that fails (import error, init raising) is reported to the agent.
        _print_exc()
        try:
            inst.report("failed", error=f"{type(e).__name__}: {e}", phases=inst.phases)
        except Exception:
            pass
        return 1


def main() -> int:
    # The boot record is for the runtime, not the handler: gone before any user code loads.
    return run_instance(json.loads(os.environ.pop("HEARTH_INSTANCE")))


if __name__ == "__main__":
    sys.exit(main())
