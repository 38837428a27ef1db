"""Chained calls: the instance as a client of its agent (``ctx.invoke``, ``ctx.emit``) and the
shared-memory buffers a handler can lend to a callee without a copy (``ctx.alloc``).

Part of :class:`hearth.runtime.instance.Instance` (a mixin: the state is the instance's).
"""

from __future__ import annotations

import threading
import time

from hearth.dataplane.descriptor import NO_SLOT, PROXY_ID, Descriptor, Flags, Kind, new_corr
from hearth.dataplane.slots import payload_offset
from hearth.invoke import InvokeResult
from hearth.runtime.codec import META_RESERVE, pack_meta
from hearth.runtime.replies import Wire, write_slot
from hearth.sdk import Event, HandlerError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from concurrent.futures import Future
    from typing import Any

    from hearth.runtime.instance import RunSpec

ALLOC_META = 4096  # bytes reserved before a ctx.alloc() buffer for the metadata of a forward


def _addr(buf: Any) -> int:
    import numpy as np

    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _zeros(n: int) -> memoryview:
    import numpy as np

    return memoryview(np.zeros(n, dtype=np.uint8))


class Calls(Wire):
    """Calls to other functions through the agent, from a handler on any thread."""

    spec: RunSpec | None
    waiters: dict[bytes, Future]
    allocs: dict[int, tuple[Any, int]]
    inline_ok: bool

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
