"""The holder tree: the children a holder invokes, the request sent to them and their replies
read back, and a search over the tree (children invoked in parallel while this holder searches
its own partitions; the top k merged)."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import numpy as np
from hearth.sdk import MSGPACK, HandlerError

from . import query
from .index import VecIndex
from .query import Request, Result, SearchParams
from .request_fields import as_array

Invoke = Callable[[str, Any, str], Any]


def children(node: int, holders: int, b: int) -> list[int]:
    """Holders `node` invokes: b * node + 1 .. b * node + b (those that exist)."""
    return [c for c in range(b * node + 1, b * node + b + 1) if c < holders]


def decode_reply(reply: Any, child: str) -> dict[str, Any]:
    """A child's reply body (msgpack, or JSON); HandlerError(502) if it failed or is unreadable."""
    status = getattr(reply, "status", 200)
    body = getattr(reply, "body", reply)
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        try:
            body = msgpack.unpackb(raw, raw=False)
        except Exception:
            try:
                body = json.loads(raw)
            except ValueError:
                raise HandlerError(
                    f"vecsearch: child {child} sent an undecodable reply", status=502
                ) from None
    if status >= 400 or not isinstance(body, dict) or "error" in body:
        detail = body.get("error") if isinstance(body, dict) else body
        raise HandlerError(f"vecsearch: child {child} failed: {detail}", status=502)
    return body


def fan_out(
    payload_for: Callable[[int], dict[str, Any]],
    tree: dict[str, Any],
    invoke: Invoke | None,
    pool: ThreadPoolExecutor,
) -> list[Any]:
    """Invoke this holder's children with `payload_for(child)`: their (name, future) pairs."""
    kids = children(tree["node"], tree["holders"], tree["b"])
    if kids and invoke is None:
        raise HandlerError("vecsearch: this runtime cannot invoke child holders", status=500)
    futs = []
    for c in kids:
        name = tree["child"].format(node=c)
        data = msgpack.packb(payload_for(c), use_bin_type=True)
        futs.append((name, pool.submit(invoke, name, data, MSGPACK)))
    return futs


def search_tree(
    idx: VecIndex,
    req: Request,
    body: dict[str, Any],
    params: SearchParams,
    tree: dict[str, Any],
    order: np.ndarray | None,
    nvisit: np.ndarray | None,
    invoke: Invoke | None,
) -> Result:
    """Search `req` on this holder's partitions while its children search theirs (each gets the
    same request and visit lists; they fan out further), and merge the top k."""
    Q = len(req.queries)
    vis = int(nvisit.max()) if nvisit is not None and len(nvisit) else 0

    def payload_for(c: int) -> dict[str, Any]:
        return {
            "op": "query",
            "vectors": np.ascontiguousarray(req.queries, np.float32).tobytes(),
            "shape": [Q, idx.dims],
            "k": req.k,
            "filter": req.filter,
            "metric": req.metric,
            "exact": req.exact,
            "params": body.get("params"),
            "order": None if order is None else np.ascontiguousarray(order[:, :vis]).tobytes(),
            "order_shape": [Q, vis],
            "nvisit": None if nvisit is None else np.ascontiguousarray(nvisit, np.int32).tobytes(),
            "_tree": tree | {"node": c},
        }

    owned = (np.arange(idx.n_partitions) % tree["holders"] == tree["node"]).astype(np.uint8)
    with ThreadPoolExecutor(max(1, tree["b"])) as pool:
        futs = fan_out(payload_for, tree, invoke, pool)
        mine = query.search_owned(idx, req, owned, params, order, nvisit)
        parts = [mine]
        for name, f in futs:
            r = decode_reply(f.result(), name)
            parts.append(
                Result(
                    ids=as_array(r["ids"], np.int64, [Q, req.k]),
                    dists=as_array(r["dists"], np.float32, [Q, req.k]),
                    counts=as_array(r["counts"], np.int64),
                    stats=r.get("stats", {}),
                )
            )
    merged = query.merge(parts, req.k)
    merged.stats["holders_reached"] = int(sum(p.stats.get("holders_reached", 1) for p in parts))
    return merged
