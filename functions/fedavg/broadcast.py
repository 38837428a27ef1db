"""Sending a round's model to a client from the one slot that holds it, without copies.

* over a socket: ``sendfile`` from the pool's tmpfs file at the model's offset (the kernel reads
  the slot's pages by reference; no user-space copy, no per-client buffer);
* on the shared-memory path: a ``MODEL_IN_SLOT`` frame naming the slot, and the client copies
  the model out itself before it acknowledges.

A model in private memory (not in a slot) is sent with ``sendall`` and counted as a copy.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from hearth.functions.fedavg import wire
from hearth.functions.fedavg.roundstate import RoundState, RoundTable


class Broadcast:
    """Sends published models; holds a read-only descriptor of the pool file for ``sendfile``."""

    def __init__(self, table: RoundTable, pool: Any):
        self.table = table
        self._fd = os.open(pool.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self._fd)

    def send(self, sock: socket.socket, r: RoundState, shm: bool = False) -> None:
        if r.model is None:
            wire.send_error(
                sock, "round failed", "; ".join(r.errors.values())[:2000] or "no update"
            )
            return
        n = len(r.model)
        by_file = not shm and r.model_file is not None
        # counted before the bytes go out: the client's ACK may arrive before this thread runs
        with self.table.lock:
            r.stats.bytes_sent += n
            if by_file:
                r.stats.bytes_sendfile += n
            elif not shm:
                r.stats.bytes_copied += n  # private memory: the kernel copies it per client
        if shm and r.model_slot is not None:
            slot, off = r.model_slot
            msg = {"slot": slot.index, "gen": slot.gen, "offset": off, "length": n}
            # the client copies the model out of the slot itself
            wire.send_control(sock, wire.MODEL_IN_SLOT, {**msg, "round": r.stats.round})
            return
        sock.sendall(wire.frame(wire.MODEL, n))
        if r.model_file is None:
            sock.sendall(r.model)
            return
        off, _ = r.model_file
        sent = 0
        while sent < n:
            k = os.sendfile(sock.fileno(), self._fd, off + sent, n - sent)
            if k == 0:
                raise wire.WireError("client went away during the model download")
            sent += k
