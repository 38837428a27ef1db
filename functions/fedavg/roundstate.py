"""Round bookkeeping of the round endpoint: what each round cost, who submitted and who holds
its model, and which clients are connected.

One :class:`RoundTable` is shared by the connection threads and the fold thread; its lock
guards every field of every :class:`RoundState` that more than one thread writes. Nothing here
reads a socket or folds a byte.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hearth.functions.fedavg import wire
from hearth.functions.fedavg.warm import process_faults


@dataclass
class RoundStats:
    """What one round cost on the server (times are ``time.monotonic()``)."""

    round: int
    clients: int = 0
    folded: int = 0
    rejected: int = 0
    t_first_update: float = 0.0  # first UPDATE frame header read
    t_all_received: float = 0.0  # last update completely in its slot
    t_published: float = 0.0
    t_all_acked: float = 0.0
    bytes_received: int = 0  # update bytes read from sockets (into slots)
    bytes_copied: int = 0  # bytes written by copies on the server (socket -> slot included)
    bytes_sent: int = 0  # model bytes sent to clients
    bytes_sendfile: int = 0  # ... of which by sendfile from the slot (no copy)
    fold_faults: tuple[int, int] = (0, 0)  # (minor, major) taken by the fold thread
    recv_faults: tuple[int, int] = (0, 0)  # ... by the connection threads while receiving
    process_faults: tuple[int, int] = (0, 0)  # whole process, round start -> all acked
    receive_wait_s: float = 0.0  # time updates waited for a free receive slot (backpressure)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoundState:
    """One round as the endpoint sees it (fields shared between threads: under the table lock)."""

    stats: RoundStats
    published: threading.Event = field(default_factory=threading.Event)
    model: Any = None  # memoryview of the packed model
    model_file: tuple[int, int] | None = None  # (offset in the pool file, length)
    model_slot: tuple[Any, int] | None = None  # (slot, offset in it): the shared-memory path
    errors: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    sending: set[str] = field(default_factory=set)  # clients the model was (being) sent to
    holding: set[str] = field(default_factory=set)  # shm clients reading the model in its slot
    released: bool = False  # the accumulator holding the model may be written again
    submitted: set[str] = field(default_factory=set)
    expected: int = 0
    forced: bool = False  # the round's deadline passed: publish what was folded
    fold_started: bool = False  # the fold thread has folded into this round's accumulator
    failed: str | None = None  # why the server failed the round (an internal error): no model
    proc0: tuple[int, int] = (0, 0)


class RoundTable:
    """Rounds by id, the connected clients, and the round whose model is current."""

    KEEP = 4  # rounds kept behind the newest one
    KEEP_STATS = 256  # rounds whose statistics are kept (a long-running server stays bounded)

    def __init__(
        self,
        clients: int,
        *,
        round_timeout: float | None = None,
        on_deadline: Callable[[int], None] | None = None,
    ):
        self.clients = clients
        self.round_timeout = round_timeout  # seconds from a round's first update to its close
        self.on_deadline = on_deadline  # called with the round id when its timer fires
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.rounds: dict[int, RoundState] = {}
        self.current: RoundState | None = None  # the round being folded (or last published)
        self.last_failed = 0  # the newest round the server failed (joining clients skip it)
        self.conns: dict[str, Any] = {}  # client name -> its socket
        self.left: set[str] = set()  # clients that left and did not come back
        self.stats: deque[RoundStats] = deque(maxlen=self.KEEP_STATS)

    def get(self, round_id: int) -> RoundState:
        """The round ``round_id``, opened on first mention (its deadline timer starts then)."""
        with self.lock:
            r = self.rounds.get(round_id)
            if r is None:
                r = self.rounds[round_id] = RoundState(RoundStats(round_id))
                self.stats.append(r.stats)
                # less the clients that left before it (and those that leave during it)
                r.expected = max(1, self.clients - len(self.left))
                r.stats.clients = r.expected
                if self.round_timeout and self.on_deadline is not None:
                    t = threading.Timer(self.round_timeout, self.on_deadline, args=(round_id,))
                    t.daemon = True
                    t.start()
                r.proc0 = process_faults()
                for old in [k for k in self.rounds if k < round_id - self.KEEP]:
                    del self.rounds[old]
            return r

    def find(self, round_id: int) -> RoundState | None:
        with self.lock:
            return self.rounds.get(round_id)

    def check_acked(self, r: RoundState) -> None:
        """(lock held) Every connected client has acknowledged the model: the round is over."""
        if r.stats.t_all_acked or r.model is None:
            return
        if not set(self.conns) - r.acked:
            r.stats.t_all_acked = time.monotonic()
            p0, p1 = r.proc0, process_faults()
            r.stats.process_faults = (p1[0] - p0[0], p1[1] - p0[1])
            self.cond.notify_all()

    def set_current(self, r: RoundState) -> None:
        with self.lock:
            self.current = r
            self.check_acked(r)

    def ack(self, name: str, round_id: int, holds: bool = False) -> None:
        """``name`` has round ``round_id``'s model; ``holds``: it reads it in its slot (until
        :meth:`release`), so the next round may not write that slot before."""
        with self.lock:
            r = self.rounds.get(round_id)
            if r is None:
                return
            r.acked.add(name)
            if holds:
                r.holding.add(name)
            self.check_acked(r)

    def release(self, name: str, round_id: int) -> None:
        with self.lock:
            r = self.rounds.get(round_id)
            if r is not None and name in r.holding:
                r.holding.discard(name)
                self.cond.notify_all()

    def wait_acked(self, round_id: int, timeout: float) -> RoundStats:
        """Block until every client acknowledged round ``round_id``'s model, or the round ended
        without one (failed, or every update refused): nobody acknowledges a model never
        published, and a caller following the rounds in order must get past it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                r = self.rounds.get(round_id)
                if r is not None and (
                    r.stats.t_all_acked or (r.published.is_set() and r.model is None)
                ):
                    return r.stats
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"round {round_id} was not acknowledged within {timeout}s")
                self.cond.wait(left)

    def notify(self) -> None:
        with self.lock:
            self.cond.notify_all()

    # -- clients ------------------------------------------------------------------------------
    def join(self, name: str, sock: Any) -> None:
        """Admit a client by name (unique, at most ``clients`` at once) or raise WireError."""
        with self.lock:
            if name in self.conns:
                raise wire.WireError(f"client {name!r} is already connected")
            if len(self.conns) >= self.clients:
                raise wire.WireError(f"the round endpoint takes {self.clients} clients")
            self.conns[name] = sock
            self.left.discard(name)

    def latest_for(self, name: str) -> tuple[int, RoundState | None]:
        """A joining client: (the round it submits to next, the model it starts from or None);
        the client is then counted as a reader of that model."""
        with self.lock:
            cur = self.current
            nxt = max(cur.stats.round if cur is not None else 0, self.last_failed) + 1
            latest = cur if cur is not None and cur.model is not None and not cur.released else None
            if latest is not None:
                latest.sending.add(name)
        return nxt, latest

    def leave(self, name: str, sock: Any) -> list[RoundState]:
        """A client's connection ended: it no longer counts in open rounds. Returns the kept
        rounds (its departure may complete one not published yet)."""
        with self.lock:
            if self.conns.get(name) is sock:
                del self.conns[name]
                self.left.add(name)  # rounds opened from now on do not wait for it
            rounds = list(self.rounds.values())
            for r in rounds:
                if not r.published.is_set() and name not in r.submitted:
                    r.expected -= 1  # it will not submit in this round any more
                self.check_acked(r)
        return rounds

    def all_socks(self) -> list[Any]:
        with self.lock:
            self.cond.notify_all()
            return list(self.conns.values())
