"""In-process tree executor: H partition holders, each with its own state, wired together by an
``invoke`` that routes a child request to the holder named in it. Every request goes through
``handlers.serve`` and every hop through msgpack, exactly as on the platform; only the transport
(a function call instead of the data plane) differs. Used by tests and the benchmark when the
platform is not running."""

from __future__ import annotations

from typing import Any

import msgpack
from hearth.sdk import HandlerError

from . import handlers
from .handlers import HolderState


class LocalTree:
    def __init__(self, path: str, holders: int = 1, branching: int = 2, verify: bool = True):
        self.path = str(path)
        self.cfg = {"holders": holders, "branching": branching, "child": "vecsearch-{node}"}
        self.states: list[HolderState | None] = [None] * holders
        self.verify = verify
        self.hops = 0

    def _state(self, node: int) -> tuple[HolderState, bool]:
        st = self.states[node]
        if st is None:
            st = self.states[node] = HolderState.open(self.path, verify=self.verify)
            return st, True
        return st, False

    def invoke(self, function: str, payload: Any, content_type: str) -> bytes:
        """What context.invoke does on the platform: deliver to the named holder, return its reply."""
        body = msgpack.unpackb(payload, raw=False)
        node = int(function.rsplit("-", 1)[1])
        self.hops += 1
        state, cold = self._state(node)
        try:
            out = handlers.serve(state, body, self.invoke, self.cfg, cold=cold)
        except HandlerError as e:
            return msgpack.packb({"error": str(e), "status": e.status}, use_bin_type=True)
        return msgpack.packb(out, use_bin_type=True)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """An external request (HTTP body) arriving at holder 0."""
        state, cold = self._state(0)
        return handlers.serve(state, body, self.invoke, self.cfg, cold=cold)
