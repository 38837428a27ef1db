"""Client side of Hearth's federated rounds.

* :class:`RoundClient`: a client of the round endpoint (``roundserver.py``). One persistent
  connection; an update goes out straight from the caller's arrays (``sendmsg`` of views, no
  packed copy is built) and the global model comes back into one receive buffer reused every
  round.
* HTTP helpers for a deployed aggregation tree (``hearth fl round ...``, the Flower adapter's
  gateway mode); :func:`submit` streams the update the same way. Routes it expects on the
  gateway (the platform's invoke route)::

    POST {gateway}/v1/functions/{aggregator}:invoke
        Content-Type: application/octet-stream   body = packed update (pack.py)   -> leaf
        Content-Type: application/msgpack        body = {"op": "open"|"flush"|"status"|"fetch", "round": r}
    replies: JSON status maps; ``fetch`` returns the packed model (application/x-hearth-fl-model)
             with headers x-hearth-round / x-hearth-samples; errors are 4xx {"error","detail"}.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import msgpack
from hearth.functions.fedavg import wire
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


def submit(
    gateway: str,
    leaf: str,
    model: Any,
    n: int,
    round_id: int,
    client: str,
    timeout: float = 120.0,
    token: str | None = None,
) -> Reply:
    """POST an update to its leaf, streamed from the arrays (no packed copy is built)."""
    bufs, total = wire.update_iov(model, n, round=round_id, client=client)
    u = urllib.parse.urlsplit(gateway)
    if u.scheme != "http" or not u.hostname:
        raise GatewayError(f"gateway: expected http://host:port, got {gateway!r}")
    path = f"{u.path.rstrip('/')}/v1/functions/{leaf}:invoke"
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(total))
        if token:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        for b in bufs:
            conn.send(b)
        r = conn.getresponse()
        body = r.read()
        headers = {k.lower(): v for k, v in r.getheaders()}
    except OSError as e:
        raise GatewayError(f"cannot reach the gateway at {gateway} ({e})") from None
    finally:
        conn.close()
    if r.status >= 400:
        try:
            detail = json.loads(body).get("detail") or body.decode(errors="replace")
        except (ValueError, AttributeError):
            detail = body.decode(errors="replace")[:300]
        raise GatewayError(f"{leaf}: HTTP {r.status}: {detail}")
    return Reply(r.status, headers, body)


class RoundRefused(RuntimeError):
    """The round endpoint refused the connection, the update or the round (message says why)."""


class RoundClient:
    """One federated client on the round endpoint (see ``roundserver.py`` for the protocol).

    ``model`` after connecting is the server's current global model (the initial model), or
    None. :meth:`round` sends an update and returns the new global model. A model's arrays
    are views of this client's receive buffer: they stay valid until the next model arrives
    (copy what you keep).

    ``in_place`` (shared-memory path only): the model's arrays are views of the server's slot
    instead, read without a copy; they stay valid until this client's next update or
    :meth:`release_model` (the server's next round does not write that slot before). Use it
    when the client reads the model and then sends its update, as a training loop does; a
    client that holds the model and sends nothing stalls the next round's folding."""

    def __init__(
        self,
        address: tuple[str, int],
        token: str,
        client: str,
        *,
        timeout: float | None = 600.0,
        shm: bool = False,
        in_place: bool = False,
    ):
        self.client = client
        self.in_place = in_place
        self._held: int | None = None  # round whose model we read in the server's slot
        self._sent: int | None = None  # round of the update sent last, until its answer
        self.sock = socket.create_connection(address, timeout=timeout)
        wire.tune(self.sock)
        self._buf: bytearray | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.pool: Any = None  # the server's slot pool, on the shared-memory path
        hello = {"client": client, "token": token, "shm": bool(shm)}
        wire.send_control(self.sock, wire.HELLO, hello)
        kind, length = wire.read_frame(self.sock)
        body = wire.read_control(self.sock, length)
        if kind == wire.ERROR:
            self.sock.close()
            raise RoundRefused(_error_text(body))
        if kind != wire.WELCOME:
            self.sock.close()
            raise RoundRefused(f"expected WELCOME, got {wire.KIND_NAMES[kind]}")
        welcome = msgpack.unpackb(body)
        self.next_round: int = int(welcome["round"])
        if welcome.get("pool"):
            self._attach(welcome["pool"], welcome.get("slots") or [])
        self.model: Any = self.receive_model() if welcome.get("model") else None

    def _attach(self, name: str, slots: list) -> None:
        """Shared-memory path: map the server's pool and the slots we will write and read now,
        so no round pays the first-touch faults."""
        import numpy as np
        from hearth.dataplane.shm import SlotPool

        self.pool = SlotPool.attach(name)
        for index, gen in slots:
            v = self.pool.view(index, gen, self.pool.capacity(index))
            int(np.frombuffer(v, np.uint8)[:: wire.PAGE].sum())  # read-touch: maps the pages

    @property
    def shm(self) -> bool:
        return self.pool is not None

    def send_update(self, model: Any, n: int, round_id: int | None = None) -> int:
        """Send an update for ``round_id`` (default: the next round); returns the bytes sent."""
        rid = self.next_round if round_id is None else round_id
        if self._held is not None:
            model = self._unalias(model)
        bufs, total = wire.update_iov(model, n, round=rid, client=self.client)
        # released before asking for a slot: the server frees slots by folding, and its next
        # round's first fold waits for this release
        self.release_model()
        self._sent = rid
        if self.pool is not None:
            # credit: we can follow SLOT_CREDIT frames (write a slot a pass still reads, behind
            # the pass), so the server need not wait for the pass to end to lend us a slot
            req = {"length": total, "round": rid, "credit": True}
            wire.send_control(self.sock, wire.SLOT_REQUEST, req)
            g = msgpack.unpackb(self._expect(wire.SLOT_GRANT, "no slot granted"))

            def written(upto: int) -> None:  # the server checks that range while it is in cache
                wire.send_control(self.sock, wire.SLOT_PROGRESS, {"upto": upto})

            credit = [int(g.get("credit", total))]

            def more(upto: int) -> int:  # wait until the pass has read the slot up to `upto`
                while credit[0] < upto:
                    m = msgpack.unpackb(self._expect(wire.SLOT_CREDIT, "no credit"))
                    credit[0] = max(credit[0], int(m["upto"]))
                return credit[0]

            view = self.pool.view(g["slot"], g["gen"], total)
            # the one copy; SLOT_PROGRESS every `progress` bytes if the server asked for it
            wire.write_iov(view, bufs, int(g.get("progress") or 0), written, more)
            msg = {"slot": g["slot"], "gen": g["gen"], "length": total}
            wire.send_control(self.sock, wire.UPDATE_IN_SLOT, msg)
        else:
            try:
                self.sock.sendall(wire.frame(wire.UPDATE, total))
                wire.send_iov(self.sock, bufs)
            except OSError as e:
                raise RoundRefused(self._reason_closed(e)) from None
        self.bytes_sent += total
        return total

    def _expect(self, kind: int, what: str) -> bytes:
        """The next control frame's body, which must be of ``kind`` (an ERROR: its reason)."""
        got, length = wire.read_frame(self.sock)
        body = wire.read_control(self.sock, length)
        if got != kind:
            raise RoundRefused(_error_text(body) if got == wire.ERROR else what)
        return body

    def _reason_closed(self, err: OSError) -> str:
        """The server closed the connection while we were sending: its ERROR frame (sent just
        before, still readable after the reset) says why, if it is there."""
        self._sent = None
        try:
            self.sock.settimeout(5.0)  # it is there already or never comes
            kind, length = wire.read_frame(self.sock)
            if kind == wire.ERROR:
                return _error_text(wire.read_control(self.sock, length))
        except (OSError, wire.WireError):
            pass
        return f"the round endpoint closed the connection during the update ({err})"

    def receive_model(self) -> Any:
        """Read the next global model into the receive buffer, acknowledge it, return it."""
        import numpy as np
        from hearth.functions.fedavg.aggregation import parse_model

        kind, length = wire.read_frame(self.sock)
        if kind == wire.ERROR:
            if self._sent is not None:
                # the round went on without our update (refused) or failed: it is over, so
                # the next update goes to the round after it, not to this closed one again
                self.next_round = max(self.next_round, self._sent + 1)
                self._sent = None
            raise RoundRefused(_error_text(wire.read_control(self.sock, length)))
        self._sent = None
        src = None
        if kind == wire.MODEL_IN_SLOT and self.pool is not None:
            m = msgpack.unpackb(wire.read_control(self.sock, length))
            length = int(m["length"])
            src = self.pool.view(m["slot"], m["gen"], length, int(m["offset"]))
        elif kind != wire.MODEL:
            raise RoundRefused(f"expected MODEL, got {wire.KIND_NAMES[kind]}")
        holds = src is not None and self.in_place
        if holds:
            view = src.toreadonly()  # read in place: the server keeps the slot until released
        else:
            if self._buf is None or len(self._buf) < length:
                self._buf = bytearray(length)
            view = memoryview(self._buf)[:length]
            if src is not None:
                # our own copy (numpy: without the GIL): the server reuses its slot once all
                # acknowledged
                np.copyto(np.frombuffer(view, np.uint8), np.frombuffer(src, np.uint8))
            else:
                wire.recv_into_exact(self.sock, view)
        self.bytes_received += length
        model = parse_model(view)
        wire.send_control(self.sock, wire.ACK, {"round": model.round_id, "holds": holds})
        if holds:
            self._held = model.round_id
        self.next_round = model.round_id + 1
        self.model = model
        return model

    def _unalias(self, model: Any) -> Any:
        """Copies of the update's arrays that are views of the model held in the server's slot
        (e.g. a layer sent back unchanged): the slot may be rewritten once it is released."""
        import numpy as np
        from hearth.functions.fedavg.pack import named_layers

        held = self.model.payload if self.model is not None else None
        if held is None:
            return model
        lo = np.frombuffer(held, np.uint8).ctypes.data
        hi = lo + len(held)
        return [
            (nm, a.copy() if lo <= a.__array_interface__["data"][0] < hi else a)
            for nm, a in named_layers(model)
        ]

    def release_model(self) -> None:
        """``in_place``: tell the server we no longer read the current model in its slot (its
        arrays are invalid from now on). Called by the next update and by :meth:`close`."""
        if self._held is not None:
            wire.send_control(self.sock, wire.RELEASE, {"round": self._held})
            self._held = None

    def round(self, model: Any, n: int) -> Any:
        """One round: send the update, wait for and return the new global model."""
        self.send_update(model, n)
        return self.receive_model()

    def close(self) -> None:
        try:
            self.release_model()
            self.sock.sendall(wire.frame(wire.BYE, 0))
        except OSError:
            pass
        self.sock.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> RoundClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error_text(body: bytes) -> str:
    try:
        d = json.loads(body)
        return f"{d.get('error')}: {d.get('detail')}"
    except ValueError:
        return body.decode(errors="replace")[:300]


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
