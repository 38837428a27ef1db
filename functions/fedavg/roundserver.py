"""The round endpoint: clients send updates over a stream socket, the aggregation tree folds them
as they arrive, and every client gets the new global model from one slot.

Why a dedicated endpoint and not the HTTP gateway: a round moves N models in and N models out,
so every copy counts. Here an update is read by the kernel straight into a pre-faulted
shared-memory slot (the one copy of its bytes on the server), checked for NaN/Inf while each
received range is still in cache, and folded by the tree while the other clients' updates are
still in flight. The top divides in place, so the model *is* the accumulator's slot, and each
client gets it with ``sendfile`` from the pool file: no user-space copy and no per-client buffer.

Memory (a 1-level tree, the default on one node): ``fan_in`` receive slots plus one
accumulator that becomes the model -- fan_in + 1 models. A client whose update waits for a
slot is simply not read (TCP flow control). A pass over updates known finite hands its slots
to the next updates as soon as it starts, and they write behind its read frontier (credits,
``recvslots``). The next round's first fold waits until every client has acknowledged the
previous model (its pages are being sent by reference).

Warm across rounds: the slots are never handed back to the pool between rounds, so their
pages stay mapped and the hot path (receive, scan, fold) takes no page fault after round 1;
each round reports the faults its threads took (``getrusage(RUSAGE_THREAD)``).

The parts, one module each: ``roundstate`` (rounds, clients, statistics), ``recvslots`` (the
kept receive slots), ``roundingest`` (socket or shared memory -> slot, checked), ``roundfold``
(the fold thread, publishing), ``broadcast`` (model -> client from its slot), ``roundconn``
(client sessions). This module wires them and owns the threads.

Threads: one acceptor, one per client connection (blocking reads release the GIL), one fold
thread. The endpoint listens on loopback unless told otherwise and requires the round token
in each client's HELLO; it accepts at most ``clients`` connections and updates of at most
``max_update_bytes``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from typing import Any

import numpy as np
from hearth.functions.fedavg.broadcast import Broadcast
from hearth.functions.fedavg.fold import UpdateRejected
from hearth.functions.fedavg.recvslots import RecvSlots
from hearth.functions.fedavg.roundconn import Sessions
from hearth.functions.fedavg.roundfold import Folder
from hearth.functions.fedavg.roundingest import Ingest
from hearth.functions.fedavg.roundstate import RoundStats, RoundTable
from hearth.functions.fedavg.tree import plan_tree
from hearth.functions.fedavg.warm import keep_heap, reserve_heap, thread_faults


class RoundServer:
    """Runs FedAvg rounds for ``clients`` connected clients (see the module docstring)."""

    def __init__(
        self,
        clients: int,
        *,
        pool: Any,
        token: str,
        max_update_bytes: int,
        host: str = "127.0.0.1",
        port: int = 0,
        fan_in: int = 4,
        levels: int = 1,
        acc_dtype: Any = np.float32,
        initial: Any = None,
        hello_timeout: float = 30.0,
        allow_shm: bool = True,
        round_timeout: float | None = None,
        fold_threads: int | None = None,
        handover: bool = False,
    ):
        if clients < 1:
            raise ValueError(f"clients: need at least 1, got {clients}")
        if len(token) < 16:
            raise ValueError("token: use at least 16 characters")
        self.clients, self.pool = clients, pool
        if fold_threads is None:
            # while a pass folds, all fan_in slots wait for it and no client can copy: nothing
            # else of the round runs, so the pass takes both cores (2 x faster, measured)
            fold_threads = min(2, os.cpu_count() or 1)
        self.max_update_bytes = int(max_update_bytes)
        self.fan_in = fan_in
        self.plan = plan_tree(clients, fan_in=max(2, fan_in), levels=levels)
        self._stop = threading.Event()
        self.table = RoundTable(clients, round_timeout=round_timeout)
        self.folder = Folder(
            self.table,
            self.plan,
            pool=pool,
            acc_dtype=acc_dtype,
            fan_in=fan_in,
            stop=self._stop,
            threads=fold_threads,
        )
        self.table.on_deadline = self.folder.deadline
        self.agg, self.top = self.folder.agg, self.folder.top
        self.slots = RecvSlots(pool, fan_in, self.max_update_bytes)
        self.folder.arriving = self.slots.arriving
        ingest = Ingest(self.table, self.slots, self.folder, self.max_update_bytes)
        if handover:
            # a pass over checked updates lends their slots to the next ones as it reads them.
            # Off by default: no gain measured on a quiet machine (7 Dec 2026, docs/fedavg.md),
            # and its safety rests on passes over one slot never overlapping (one fold per slot)
            for role in self.plan.entry_roles():
                self.agg.aggs[role.name].reader = self.slots.reading
        self.broadcast = Broadcast(self.table, pool)
        self.sessions = Sessions(
            self.table,
            self.slots,
            self.folder,
            ingest,
            self.broadcast,
            pool_name=pool.name,
            token=token,
            hello_timeout=hello_timeout,
            allow_shm=allow_shm,
            stop=self._stop,
        )
        self._threads: list[threading.Thread] = []
        self._sock = socket.create_server((host, port), backlog=clients + 4)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        if initial is not None:
            self.folder.publish_initial(initial)

    @property
    def stats(self) -> deque[RoundStats]:
        """The last rounds' statistics, oldest first (round 0 is the initial model)."""
        return self.table.stats

    @property
    def fold_thread_id(self) -> int | None:
        return self.folder.thread_id

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> RoundServer:
        threads = (
            (lambda: self.sessions.accept_loop(self._sock), "accept"),
            (self.folder.loop, "fold"),
        )
        for target, name in threads:
            t = threading.Thread(target=target, name=f"fedavg-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        # everything is built: the heap's kept reserve starts here, so the per-round objects
        # of every round (1 included) land on written pages (no faults; see warm.keep_heap)
        reserve_heap()
        return self

    def close(self) -> None:
        """Stop serving and hand every slot back to the pool."""
        self._stop.set()
        self.folder.stop()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the acceptor (close alone does not)
        except OSError:
            pass
        self._sock.close()
        self.sessions.shutdown_all()
        for t in self._threads + self.sessions.threads:
            t.join(timeout=5)
        self.slots.close()
        self.folder.close()
        self.broadcast.close()

    def __enter__(self) -> RoundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def slots_held(self) -> int:
        """Receive slots currently lent to updates (0 between rounds)."""
        return self.slots.held()

    def wait_round(self, round_id: int, timeout: float = 60.0) -> RoundStats:
        """Block until every client acknowledged round ``round_id``'s model."""
        return self.table.wait_acked(round_id, timeout)


__all__ = ["RoundServer", "RoundStats", "UpdateRejected", "keep_heap", "thread_faults"]
