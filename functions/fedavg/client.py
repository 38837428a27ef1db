"""HTTP client side of a deployed aggregation tree (used by ``hearth fl round ...`` and the Flower
adapter's gateway mode). Routes it expects on the gateway (the platform's invoke route)::

    POST {gateway}/v1/functions/{aggregator}:invoke
        Content-Type: application/octet-stream   body = packed update (pack.py)   -> leaf
        Content-Type: application/msgpack        body = {"op": "open"|"flush"|"status"|"fetch", "round": r}
    replies: JSON status maps; ``fetch`` returns the packed model (application/x-hearth-fl-model)
             with headers x-hearth-round / x-hearth-samples; errors are 4xx {"error","detail"}.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import msgpack
from hearth.functions.fedavg.pack import pack
from hearth.functions.fedavg.tree import TreePlan, plan_tree

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


class GatewayError(RuntimeError):
    """The gateway could not be reached or answered with an error (message says which)."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def invoke(
    gateway: str,
    function: str,
    body: bytes | bytearray | memoryview,
    content_type: str,
    timeout: float = 120.0,
    token: str | None = None,
) -> Reply:
    url = f"{gateway.rstrip('/')}/v1/functions/{function}:invoke"
    req = urllib.request.Request(
        url, data=bytes(body) if not isinstance(body, bytes) else body, method="POST"
    )
    req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            detail = json.loads(body).get("detail") or body.decode(errors="replace")
        except (ValueError, AttributeError):
            detail = body.decode(errors="replace")[:300]
        raise GatewayError(f"{function}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise GatewayError(f"cannot reach the gateway at {gateway} ({reason})") from None


def control(gateway: str, function: str, **msg: Any) -> Reply:
    return invoke(gateway, function, msgpack.packb(msg), "application/msgpack")


def open_round(gateway: str, plan: TreePlan, round_id: int) -> dict[str, Any]:
    """Open the round on every aggregator instance (top first so partials find it ready)."""
    out = {}
    for r in sorted(plan.roles, key=lambda r: ("top", "middle", "leaf").index(r.level)):
        if r.instance != r.name:
            continue
        out[r.name] = control(gateway, r.name, op="open", round=round_id, expected=r.inputs).json()
    return out


def status(gateway: str, plan: TreePlan) -> dict[str, dict[str, Any]]:
    """Per role status (expected/received/folded/rejected/done, round)."""
    out: dict[str, dict[str, Any]] = {}
    for inst in plan.instances:
        for st in control(gateway, inst, op="status").json().get("roles", []):
            out[st["name"]] = st
    return out


def flush(gateway: str, plan: TreePlan, round_id: int) -> None:
    """Deadline: forward what was folded, bottom-up."""
    for level in ("leaf", "middle", "top"):
        for r in plan.by_level(level):  # type: ignore[arg-type]
            # a promoted middle lives in its leaf's instance: address the role there
            control(gateway, r.instance, op="flush", round=round_id, role=r.name)


def fetch(gateway: str, plan: TreePlan, round_id: int | None = None) -> Reply:
    msg: dict[str, Any] = {"op": "fetch"}
    if round_id is not None:
        msg["round"] = round_id
    return control(gateway, plan.top.name, **msg)


def submit(gateway: str, leaf: str, model: Any, n: int, round_id: int, client: str) -> Reply:
    return invoke(
        gateway, leaf, pack(model, n, round=round_id, client=client), "application/octet-stream"
    )


def aggregate_via_gateway(
    gateway: str,
    round_id: int,
    updates: list[tuple[Any, int]],
    fan_in: int = 4,
    prefix: str = "fedavg",
) -> list[Any]:
    """Send updates to a deployed single-node tree and return the averaged arrays."""
    from hearth.functions.fedavg.aggregation import parse_model

    plan = plan_tree(len(updates), fan_in=fan_in, prefix=prefix)
    open_round(gateway, plan, round_id)
    for i, (m, n) in enumerate(updates):
        submit(gateway, plan.leaf_for(plan.nodes[0][0], i).instance, m, n, round_id, f"c{i}")
    return parse_model(fetch(gateway, plan, round_id).body).ndarrays()
