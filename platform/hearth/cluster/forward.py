"""The node agent's channel to instances on other nodes: an invocation (HTTP, async, queue
event) or a chained call whose function is hosted elsewhere goes over the link. The request's
slot streams to the remote node and is freed once sent; a chained call's reply lands in a new
slot, handed to the caller by descriptor as a local reply would be."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hearth.agent.instance import AGENT_ID
from hearth.agent.invoker import SlotPayload, new_invocation_id
from hearth.dataplane.descriptor import Descriptor, Flags, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import payload_offset
from hearth.invoke import InvokeError, InvokeResult
from hearth.spec import FunctionSpec

Count = Callable[[str, int, str, float], None]


class Forwarder:
    def __init__(self, member: Any, pool: SlotPool, link: Any, count: Count, budget_s: float):
        self.member = member  # hearth.cluster.member.Member
        self.pool = pool
        self.link = link  # the agent's DataplaneLink (free, send, send_error)
        self.count = count
        self.budget_s = budget_s  # how long the remote may take to find or start an instance

    async def invoke(
        self,
        node: str,
        function: str,
        payload: bytes | memoryview | SlotPayload,
        *,
        spec: FunctionSpec | None,
        content_type: str,
        headers: dict[str, str] | None,
        idempotency_key: str | None,
        invocation_id: str | None,
        timeout: float | None,
    ) -> InvokeResult:
        t0 = time.monotonic()
        exec_timeout, meta = self._meta(
            spec, content_type, headers, idempotency_key, invocation_id, timeout
        )
        slot = payload.slot if isinstance(payload, SlotPayload) else None
        if isinstance(payload, SlotPayload):
            view = payload.slot.buf[payload.offset : payload.offset + payload.length]
        else:
            view = memoryview(payload)

        def give_back() -> None:  # the request slot, once its bytes are on the wire (or failed)
            nonlocal slot
            if slot is not None:
                self.link.free(slot.index, slot.gen)
                slot = None

        try:
            res = await self.member.forward_invoke(
                node, function, view, meta, self._link_timeout(exec_timeout), sent=give_back
            )
        except InvokeError as e:
            self.count(function, e.status, e.error, t0)
            raise
        finally:
            del view
            give_back()
        self.count(function, res.status, "handler_error" if res.status >= 400 else "", t0)
        return res

    def start(
        self,
        node: str,
        function: str,
        payload: bytes,
        *,
        spec: FunctionSpec | None,
        content_type: str,
        headers: dict[str, str] | None,
        timeout: float | None,
        done: Callable[[InvokeResult | InvokeError], None],
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
    ) -> bool:
        """``invoke`` of a small in-memory payload without a task: ``done`` gets the result or
        the error in the callback that settles the call (counted as ``invoke`` counts them).
        False, nothing sent, when the link would make it wait: then ``invoke``."""
        t0 = time.monotonic()
        exec_timeout, meta = self._meta(
            spec, content_type, headers, idempotency_key, invocation_id, timeout
        )

        def settled(res: InvokeResult | InvokeError) -> None:
            if isinstance(res, InvokeError):
                self.count(function, res.status, res.error, t0)
            else:
                self.count(function, res.status, "handler_error" if res.status >= 400 else "", t0)
            done(res)

        return self.member.forward_now(
            node, function, memoryview(payload), meta, self._link_timeout(exec_timeout), settled
        )

    @staticmethod
    def _meta(
        spec: FunctionSpec | None,
        content_type: str,
        headers: dict[str, str] | None,
        idempotency_key: str | None,
        invocation_id: str | None,
        timeout: float | None,
    ) -> tuple[float | None, dict[str, Any]]:
        """A forwarded invocation's run time limit and the request meta that carries it."""
        exec_timeout = min(timeout or 1e9, spec.timeout_s) if spec is not None else timeout
        # only what is set: the remote takes the same defaults (no headers, no key) and names
        # the invocation itself when the caller did not (its reply carries the id)
        meta: dict[str, Any] = {"content_type": content_type, "exec_timeout": exec_timeout}
        if headers:
            meta["headers"] = headers
        if idempotency_key is not None:
            meta["idempotency_key"] = idempotency_key
        if invocation_id is not None:
            meta["invocation_id"] = invocation_id
        return exec_timeout, meta

    def _link_timeout(self, exec_timeout: float | None) -> float:
        """How long the caller waits on the link: the run, the remote's start budget, a second."""
        return (exec_timeout or 60.0) + self.budget_s + 1

    async def chain(self, node: str, spec: FunctionSpec, d: Descriptor, meta: dict) -> None:
        """A chained call `d` from a local instance to `spec` on `node`; answers `d.src`."""
        key = bytes(d.corr)
        fwd = {
            "content_type": meta.get("content_type"),
            "headers": meta.get("headers") or {},
            "invocation_id": new_invocation_id()[1],
            "exec_timeout": spec.timeout_s,
        }
        t0 = time.monotonic()
        try:
            view = self.pool.view(d.slot, d.gen, d.length, offset=payload_offset(d.meta_len))
            try:
                rep = await self.member.forward(
                    node,
                    spec.name,
                    view,
                    fwd,
                    spec.timeout_s + self.budget_s + 1,
                    sink=self.member.reply_sink(),
                )
            finally:
                del view
                if not d.flags & Flags.BORROWED:  # sent: the caller's reference is ours to drop
                    self.link.free(d.slot, d.gen)
        except InvokeError as e:
            self.count(spec.name, e.status, e.error, t0)
            await self.link.send_error(d.src, key, e.status, e.detail)
            return
        r = rep.body
        self.count(spec.name, int(rep.meta.get("status", 200)), "", t0)
        # if the caller is gone, the proxy's unknown-destination error brings the slot back to
        # the agent's reader, which frees it (no pending call matches)
        await self.link.send(
            Descriptor(
                dst=d.src,
                src=AGENT_ID,
                kind=Kind.REPLY,
                slot=r.slot.index,
                gen=r.slot.gen,
                length=r.length,
                meta_len=r.meta_len,
                corr=key,
            )
        )
