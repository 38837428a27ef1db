"""Invocations: one event (or a batch of them, from a queue backlog) through the handler, and
the reply written back into shared memory.

Part of :class:`hearth.runtime.instance.Instance` (a mixin: the state is the instance's); the
serve loop there decides which calls run on the reader thread and which on the worker pool.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Awaitable

from hearth.dataplane.descriptor import Descriptor, Flags, Kind
from hearth.dataplane.slots import PayloadTooLarge, StaleSlot, payload_offset
from hearth.runtime.codec import encode_result, error_body, pack_meta, unpack_meta
from hearth.runtime.replies import Wire, _print_exc, write_slot
from hearth.sdk import OCTET, Context, Event, HandlerError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any

    from hearth.runtime.instance import RunSpec

# plain ints: an IntFlag's `&` runs Python code, twice per invocation otherwise
_BATCH, _BORROWED = int(Flags.BATCH), int(Flags.BORROWED)


# what sync handlers return: never awaitable (an ABC isinstance check costs ~1 us a call)
_PLAIN = frozenset({bytes, bytearray, memoryview, str, dict, list, tuple, int, float, type(None)})


def _awaitable(x: Any) -> bool:
    """``inspect.isawaitable`` without importing inspect."""
    if x.__class__ in _PLAIN:
        return False
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


async def _await(aw: Any) -> Any:
    return await aw


class Handling(Wire):
    """Running the handler on a request descriptor and answering it."""

    instance_id: str
    node: str
    spec: RunSpec | None
    handler: Any
    loop: Any
    executor: ThreadPoolExecutor | None
    avg_s: float
    pooled_busy: int
    busy_lock: threading.Lock

    # also used: `chain`, `emit` and `alloc` of the other mixin (hearth.runtime.calls.Calls),
    # which a handler reaches through its context

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

    def handle(self, d: Descriptor) -> None:
        assert self.spec is not None
        spent = 0.0
        borrowed = bool(d.flags & _BORROWED)  # the sender keeps the slot: no adopt/release
        forwarded = [borrowed]
        agents = False  # the slot stays the agent's (no table write here: no lock, no flock)
        try:
            # one generation check for the metadata and the payload: one view of both
            off = payload_offset(d.meta_len)
            whole = self.pool.view(d.slot, d.gen, off + d.length)
            meta = unpack_meta(whole[: d.meta_len]) if d.meta_len else {}
            payload = whole[off:].toreadonly()
            if not borrowed:
                # A request the agent wrote (it owns the slot, and frees it if this process
                # dies or is killed before replying) stays the agent's, and a reply written
                # back into it needs no hand-over: the warm call takes no pool lock here. A
                # slot another instance sent on (a chained call) is adopted, as before: it is
                # reclaimed if this process dies holding it.
                agents = self.pool.creators(d.slot, d.gen)
                if not agents:
                    self.pool.adopt(d.slot, d.gen)
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
            mlen, n = len(mb), len(body)
            off = payload_offset(mlen)
            if off + n <= self.pool.capacity(d.slot):
                try:
                    buf = self.pool.view(d.slot, d.gen, off + n)  # still this call's slot?
                except StaleSlot:
                    pass
                else:
                    buf[:mlen] = mb
                    if n:
                        buf[off:] = body
                    self.send_reply(d, d.slot, d.gen, n, mlen, agents)
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
        spec = self.spec
        assert spec is not None
        get = meta.get
        req_headers: dict[str, str] = get("headers") or {}
        try:
            ctx = Context(
                spec.name,
                self.instance_id,
                get("invocation_id") or str(d.invocation_id),
                float(get("deadline") or (time.time() + spec.timeout_s)),
                self.node,
                get("idempotency_key"),
                get("caller"),  # set by chain(); the gateway never sets it
                None,
                self.emit,
                self.alloc,
            )
            event = Event(payload, ctx, get("content_type") or OCTET, req_headers)
            ctx._invoke = lambda fn, p, ct, tok=None: self.chain(
                d, event, forwarded, fn, p, ct, tok
            )
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
