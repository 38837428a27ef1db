"""Client sessions of the round endpoint: accept, HELLO (token, unique name, bounded count),
WELCOME with the current model, then one frame after another until BYE or an error.

One thread per connection (blocking reads release the GIL). After an update is queued the
session waits for its round to be published and answers with the model, or with the reason
the update or the round failed. A departing client no longer counts in open rounds; the fold
thread re-checks them in order.

Any error ends only its own session: the client gets an ERROR frame (an unexpected error is
logged once, with its traceback), its receive slot goes back to the server, and the round
completes with the other clients.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from typing import Any

import msgpack
from hearth.functions.fedavg import wire
from hearth.functions.fedavg.broadcast import Broadcast
from hearth.functions.fedavg.recvslots import RecvSlot, RecvSlots
from hearth.functions.fedavg.roundfold import Folder
from hearth.functions.fedavg.roundingest import Ingest
from hearth.functions.fedavg.roundstate import RoundState, RoundTable

log = logging.getLogger(__name__)


class Sessions:
    """Serves every client connection of one endpoint."""

    def __init__(
        self,
        table: RoundTable,
        slots: RecvSlots,
        folder: Folder,
        ingest: Ingest,
        broadcast: Broadcast,
        *,
        pool_name: str,
        token: str,
        hello_timeout: float,
        allow_shm: bool,
        stop: threading.Event,
    ):
        self.table, self.slots, self.folder = table, slots, folder
        self.ingest, self.broadcast = ingest, broadcast
        self.pool_name, self.token = pool_name, token
        self.hello_timeout, self.allow_shm = hello_timeout, allow_shm
        self._stop = stop
        self.threads: list[threading.Thread] = []

    def accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, _addr = listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self.serve, args=(sock,), daemon=True)
            t.start()
            self.threads.append(t)

    def _hello(self, sock: socket.socket) -> tuple[str, bool]:
        sock.settimeout(self.hello_timeout)
        kind, length = wire.read_frame(sock)
        if kind != wire.HELLO:
            raise wire.WireError(f"expected HELLO, got {wire.KIND_NAMES[kind]}")
        msg = msgpack.unpackb(wire.read_control(sock, length))
        tok = str(msg.get("token", "")) if isinstance(msg, dict) else ""
        if not hmac.compare_digest(tok.encode(), self.token.encode()):
            raise PermissionError("bad round token")
        name = str(msg.get("client", ""))
        if not name or len(name) > 200:
            raise wire.WireError("HELLO needs a client name (1-200 characters)")
        self.table.join(name, sock)
        sock.settimeout(None)
        shm = bool(msg.get("shm")) and self.allow_shm and wire.is_loopback(sock)
        return name, shm

    def serve(self, sock: socket.socket) -> None:
        name = None
        granted: RecvSlot | None = None  # a slot lent to this client's shared-memory update
        try:
            wire.tune(sock)
            try:
                name, shm = self._hello(sock)
            except (PermissionError, wire.WireError, ValueError, OSError) as e:
                wire.send_error(sock, "hello refused", str(e))
                return
            nxt, latest = self.table.latest_for(name)
            welcome: dict[str, Any] = {"clients": self.table.clients, "round": nxt}
            welcome["model"] = latest is not None
            if shm:
                # the slots this client will write and read: it maps them before round 1
                welcome["pool"] = self.pool_name
                welcome["slots"] = self.slots.handles() + self.folder.acc_handles()
            wire.send_control(sock, wire.WELCOME, welcome)
            if latest is not None:
                self.broadcast.send(sock, latest, shm)
            while not self._stop.is_set():
                kind, length = wire.read_frame(sock)
                if kind == wire.UPDATE:
                    self._reply(sock, name, self.ingest.receive(sock, name, length), shm)
                elif kind == wire.SLOT_REQUEST and shm and granted is None:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    granted = self.ingest.grant(
                        sock, int(msg.get("length", -1)), msg.get("round"), bool(msg.get("credit"))
                    )
                elif kind == wire.SLOT_PROGRESS and granted is not None:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    rs, granted = granted, None  # on any error progress releases it
                    self.ingest.progress(name, rs, msg)
                    granted = rs
                elif kind == wire.UPDATE_IN_SLOT and granted is not None:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    rs, granted = granted, None
                    self._reply(sock, name, self.ingest.in_slot(name, rs, msg), shm)
                elif kind == wire.ACK:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    holds = shm and bool(msg.get("holds"))
                    self.table.ack(name, int(msg.get("round", -1)), holds)
                elif kind == wire.RELEASE:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    self.table.release(name, int(msg.get("round", -1)))
                elif kind == wire.BYE:
                    return
                else:
                    raise wire.WireError(f"unexpected {wire.KIND_NAMES[kind]} frame")
        except (wire.WireError, OSError, ValueError) as e:
            if not self._stop.is_set():
                wire.send_error(sock, "protocol error", str(e))
        except Exception as e:
            # a bug (or input no check foresaw): this session ends, the others and the round
            # go on; the client hears why instead of waiting for an answer that never comes
            log.exception("fedavg round endpoint: session of client %r failed", name)
            wire.send_error(sock, "internal error", f"{type(e).__name__}: {e}")
        finally:
            if granted is not None:  # left (or broke the protocol) while writing its update
                granted.release()
            self._drop(name, sock)

    def _reply(self, sock: socket.socket, name: str, r: RoundState, shm: bool) -> None:
        """The update is queued: answer with the round's model once it is published."""
        r.published.wait()
        if self._stop.is_set():
            return
        if r.failed is not None:  # the server failed the round: nobody gets a model for it
            wire.send_error(sock, f"round {r.stats.round} failed", r.failed)
            return
        err = r.errors.get(name)
        if err is not None:
            wire.send_error(sock, "update rejected", err)
            self.table.ack(name, r.stats.round)
            return
        with self.table.lock:
            r.sending.add(name)
        self.broadcast.send(sock, r, shm)

    def _drop(self, name: str | None, sock: socket.socket) -> None:
        try:
            sock.close()
        except OSError:
            pass
        if name is None:
            return
        for r in self.table.leave(name, sock):
            if not r.published.is_set():
                # a departed client may complete a round: the fold thread decides, in order
                self.folder.poke(r.stats.round)

    def shutdown_all(self) -> None:
        """Wake every session blocked on its socket (the server is closing)."""
        for c in self.table.all_socks():
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
