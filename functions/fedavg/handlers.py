"""Hearth handlers for the aggregator roles: ``handlers:leaf``, ``handlers:middle``, ``handlers:top``.

Deployed from the specs :meth:`TreePlan.function_specs` emits (or ``functions/fedavg/specs/``):
one function per aggregator, ``max_instances: 1``, role wiring in the environment::

    FEDAVG_ROLE       leaf | middle | top
    FEDAVG_PARENT     function to invoke with the partial (empty for the top)
    FEDAVG_EXPECTED   inputs per round (updates for a leaf, partials above)
    FEDAVG_ACC_DTYPE  float32 (default) | float64
    FEDAVG_CHECK      swap (default) | precheck
    FEDAVG_KEEP       global models kept by the top (default 3)
    FEDAVG_HOSTS      roles promoted into this instance: "name:level:parent:inputs;..."

State is module-level (one :class:`Aggregator` per role) so a warm instance keeps its
accumulators across invocations and rounds: no allocation after the first round.

Payloads
  * ``application/octet-stream``: a packed update (leaf) or partial (middle/top); see ``pack.py``.
    The leaf folds ``event.payload`` -- the slot the gateway wrote -- in place.
  * ``application/msgpack`` / ``application/json`` control messages ``{"op": ...}``:
    ``open`` (round, expected?), ``flush`` (deadline: forward what was folded), ``status``,
    ``fetch`` (top: the packed global model of ``round`` or the latest), ``reset``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from hearth.functions.fedavg.aggregator import Aggregator, Outcome
from hearth.functions.fedavg.fold import UpdateRejected
from hearth.functions.fedavg.pack import PackError, parse
from hearth.functions.fedavg.rounds import LateUpdate, RoundError, UnknownRound
from hearth.sdk import JSON, MSGPACK, OCTET, Event, HandlerError, Response

#: role name -> aggregator; survives across invocations in a warm instance
STATE: dict[str, Aggregator] = {}
#: per-function role environment, for runtimes hosting several aggregator functions in one
#: process (tests, the simulator); a normal instance reads its own process environment
ROLE_ENV: dict[str, dict[str, str]] = {}
MODEL_CT = "application/x-hearth-fl-model"


def _env(event: Event, name: str, default: str = "") -> str:
    src = ROLE_ENV.get(event.context.function, os.environ)
    return src.get(name, default)


def _alloc_from(event: Event):
    ctx = event.context
    if getattr(ctx, "_alloc", None) is not None:
        return ctx.alloc  # a slot: the partial can travel by descriptor
    return None


def _aggregator(
    name: str, level: str, parent: str | None, expected: int, event: Event
) -> Aggregator:
    agg = STATE.get(name)
    if agg is None:
        keep = int(_env(event, "FEDAVG_KEEP", "3"))
        agg = Aggregator(
            name,
            level,
            parent or None,
            expected,  # type: ignore[arg-type]
            acc_dtype=np.dtype(_env(event, "FEDAVG_ACC_DTYPE", "float32")),
            check=_env(event, "FEDAVG_CHECK", "swap"),
            alloc=_alloc_from(event),
            keep=keep,
        )
        STATE[name] = agg
    return agg


def _hosted(event: Event) -> dict[str, Aggregator]:
    """Roles promoted into this instance (``FEDAVG_HOSTS``), by level."""
    out = {}
    for item in filter(None, _env(event, "FEDAVG_HOSTS").split(";")):
        try:
            name, level, parent, inputs = item.split(":")
            out[level] = _aggregator(name, level, parent, int(inputs), event)
        except ValueError:
            raise HandlerError(
                f"FEDAVG_HOSTS: malformed entry {item!r} (want name:level:parent:inputs)", 500
            ) from None
    return out


def _primary(event: Event, level: str) -> Aggregator:
    role = _env(event, "FEDAVG_ROLE", level)
    if role != level:
        raise HandlerError(f"FEDAVG_ROLE is {role!r} but the handler is {level!r}", 500)
    expected = _env(event, "FEDAVG_EXPECTED", "0")
    try:
        n = int(expected)
    except ValueError:
        raise HandlerError(f"FEDAVG_EXPECTED: not an integer: {expected!r}", 500) from None
    return _aggregator(
        event.context.function, level, _env(event, "FEDAVG_PARENT") or None, n, event
    )


def _forward(
    agg: Aggregator, out: Outcome, event: Event, hosted: dict[str, Aggregator]
) -> dict[str, Any]:
    """Hand a finished partial upward: to a role hosted here (promotion: no data moves) or to
    the parent function through the data plane."""
    reply: dict[str, Any] = {"aggregator": agg.name, **out.progress.to_dict()}
    if out.duplicate:
        reply["duplicate"] = True  # already folded (redelivery): acknowledged, not folded again
    while out.partial is not None:
        local = hosted.get("middle") if agg.level == "leaf" else None
        if local is not None and agg.parent in (local.name, event.context.function):
            # the parent role lives in this instance: never invoke ourselves through the data
            # plane (with concurrency 1 that would wait on itself)
            if local.progress.folded == 0:
                local.adopt(agg)  # promotion: take the accumulator, no data moves
                out = local._maybe_finish()
                reply["promoted_into"] = local.name
            else:
                out = local.ingest(out.partial)  # a view of our own accumulator
            agg = local
            continue
        if not agg.parent:
            raise HandlerError(
                f"{agg.name}: no parent to forward the partial to (FEDAVG_PARENT)", 500
            )
        res = event.context.invoke(agg.parent, out.partial, OCTET)
        status = getattr(res, "status", 200)
        body = getattr(res, "body", b"")
        if status >= 400:  # the parent refused our partial: say so, do not pretend it landed
            import json

            try:
                detail = json.loads(body).get("detail", "")
            except (ValueError, AttributeError):
                detail = bytes(body[:200]).decode(errors="replace")
            raise HandlerError(
                f"{agg.name} -> {agg.parent}: HTTP {status}: {detail}",
                502 if status >= 500 else status,
            )
        reply["parent"] = {"function": agg.parent, "status": status}
        if body and str(getattr(res, "content_type", "")).startswith(JSON):
            import json

            reply["parent"]["reply"] = json.loads(body)
        break
    if out.model is not None:
        reply["published"] = {
            "round": out.model.round_id,
            "n": out.model.n,
            "bytes": len(out.model.payload),
        }
    return reply


def _control(agg: Aggregator, event: Event, hosted: dict[str, Aggregator]) -> Any:
    try:
        msg = event.data()
    except Exception as e:  # noqa: BLE001 - any decode error is the caller's
        raise HandlerError(f"control message is not valid {event.content_type}: {e}", 400) from None
    if not isinstance(msg, dict) or "op" not in msg:
        raise HandlerError("control message must be a map with an 'op' field", 400)
    op = msg["op"]
    rnd = msg.get("round")
    if rnd is not None and (not isinstance(rnd, int) or isinstance(rnd, bool)):
        raise HandlerError(f"round: expected an integer, got {rnd!r}", 400)
    roles = [agg, *[h for h in hosted.values() if h is not agg]]
    if op == "status":
        return {"roles": [a.status() for a in roles]}
    if op == "open":
        if rnd is None:
            raise HandlerError("open: field 'round' is required", 400)
        exp = msg.get("expected")
        if exp is not None and (not isinstance(exp, int) or exp < 0):
            raise HandlerError(f"expected: must be a non-negative integer, got {exp!r}", 400)
        try:
            agg.open(rnd, exp)
            for h in roles[1:]:
                h.open(rnd)
        except RoundError as e:
            raise HandlerError(str(e), 409) from None
        return {"roles": [a.status() for a in roles]}
    if op == "flush":
        if rnd is not None and agg.round_id is not None and agg.round_id != rnd:
            raise HandlerError(f"flush: this aggregator is in round {agg.round_id}, not {rnd}", 409)
        role = msg.get("role")
        if role is not None:
            picked = [a for a in roles if a.name == role]
            if not picked:
                raise HandlerError(
                    f"flush: role {role!r} is not hosted here ({[a.name for a in roles]})", 400
                )
            roles = picked
        reply = {}
        for a in roles:  # leaf first, then the middle it carries
            reply[a.name] = _forward(a, a.flush(), event, hosted)
        return reply
    if op == "fetch":
        if agg.book is None:
            raise HandlerError(
                f"fetch: {agg.name} is a {agg.level}; fetch models from the top", 400
            )
        try:
            model = agg.book.model(rnd)
        except UnknownRound as e:
            raise HandlerError(str(e), 404) from None
        return Response(
            body=model.payload,
            content_type=MODEL_CT,
            headers={"x-hearth-round": str(model.round_id), "x-hearth-samples": str(model.n)},
        )
    if op == "reset":
        for a in roles:
            STATE.pop(a.name, None)
        return {"reset": [a.name for a in roles]}
    raise HandlerError(f"op: unknown operation {op!r} (open, flush, status, fetch, reset)", 400)


def _handle(event: Event, level: str) -> Any:
    agg = _primary(event, level)
    hosted = _hosted(event)
    ct = event.content_type.split(";")[0].strip().lower()
    if ct in (MSGPACK, JSON):
        return _control(agg, event, hosted)
    try:
        p = parse(event.payload)
    except PackError as e:
        raise HandlerError(str(e), 400) from None
    target = agg
    if p.header.kind == "partial" and agg.level == "leaf" and "middle" in hosted:
        target = hosted["middle"]  # a sibling leaf's partial for the middle this leaf carries
    try:
        out = target.ingest(p)
    except LateUpdate as e:
        raise HandlerError(str(e), 409) from None
    except (UpdateRejected, RoundError) as e:
        raise HandlerError(str(e), 422) from None
    return _forward(target, out, event, hosted)


def init() -> None:
    """Cold start (the spec's ``init``): load the fused fold kernels before the first update."""
    from hearth.functions.fedavg.foldkernels import warm_kernels

    warm_kernels()


def leaf(event: Event) -> Any:
    """Fold client updates; forward (Σnw, Σn) to FEDAVG_PARENT once FEDAVG_EXPECTED arrived."""
    return _handle(event, "leaf")


def middle(event: Event) -> Any:
    """Fold the partials of the leaves on this node; forward to the top."""
    return _handle(event, "middle")


def top(event: Event) -> Any:
    """Fold partials (or updates in a one-level tree), divide, publish the global model."""
    return _handle(event, "top")
