"""What a call's end means for its caller: the error an ERROR descriptor stands for, why a start
a request went ahead of failed, and the ids a call is known by. Shared by every way the agent
invokes (`agent.invoker`, `agent.batches`)."""

from __future__ import annotations

import asyncio

from hearth.agent.instance import Instance, InstanceDied
from hearth.dataplane.descriptor import PROXY_ID, Descriptor, Status, new_corr
from hearth.invoke import InvokeError


def ahead_of(inst: Instance) -> asyncio.Future | None:
    """A starting instance's `ready` when the request goes ahead of its report (the admitter
    handed it over early), else None: the call's timeout then runs from the report."""
    return inst.ready if inst.state == "starting" and inst.ready is not None else None


def start_error(
    ready: asyncio.Future | None, got: BaseException | None = None
) -> InvokeError | None:
    """Why the start a request was sent ahead of failed (None if it did not), given what the
    request got (`got`). An instance that died before its ready report failed its start, whichever
    the agent sees first: its exit (which fails `ready`) or the data plane's word that the
    request could not reach it (`InstanceDied`, `ready` still pending). Either way the handler
    never ran: `cold_start_failed`, which a queue trigger does not count as a delivery; the
    order once decided it (`instance_died` under load, CI rehearsal 60, 8 Dec 2026)."""
    if ready is None or ready.cancelled():
        return None
    if not ready.done():
        if isinstance(got, InstanceDied):
            return InvokeError(502, "cold_start_failed", f"{got.detail} (before it was ready)")
        return None
    e = ready.exception()
    return e if isinstance(e, InvokeError) else None


def dataplane_error(d: Descriptor) -> InvokeError:
    """What an ERROR descriptor answering a call means for the caller. Overload is
    back-pressure (503 + Retry-After: a full proxy queue, or no slot free for the reply right
    now), never a 502 or a 507; a reply that can never fit is the function's error."""
    if d.src == PROXY_ID and d.status == Status.QUEUE_FULL:
        return InvokeError(503, "busy", "the instance's queue is full; retry", retry_after=1)
    if d.src == PROXY_ID:
        return InvokeError(
            502, "dataplane_error", f"the proxy could not deliver (status {d.status})"
        )
    if d.aux == 507:
        return InvokeError(
            503, "no_space", "no shared-memory slot free for the reply; retry", retry_after=1
        )
    if d.aux == 413:
        return InvokeError(502, "reply_too_large", "the reply does not fit the largest slot")
    status = d.aux if 400 <= d.aux <= 599 else 502
    return InvokeError(status, "dataplane_error", f"instance replied with error status {d.status}")


def new_invocation_id() -> tuple[bytes, str]:
    """A random (version 4) UUID as (16 bytes, canonical text), without uuid.UUID's overhead
    (this runs on every invocation)."""
    b = new_corr()
    h = b.hex()
    return b, f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
