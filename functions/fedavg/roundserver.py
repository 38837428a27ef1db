"""The round endpoint: clients send updates over a stream socket, the aggregation tree folds them
as they arrive, and every client gets the new global model from one slot.

Why a dedicated endpoint and not the HTTP gateway: a round moves N models in and N models out,
so every copy counts. Here an update is read by the kernel straight into a pre-faulted
shared-memory slot (the one copy of its bytes on the server), checked for NaN/Inf while each
received range is still in cache (:class:`~hearth.functions.fedavg.fold.StreamScan`), and
folded by the tree while the other clients' updates are still in flight. The top divides in
place, so the model *is* the accumulator's slot, and each client gets it with ``sendfile``
from the pool file: no user-space copy and no per-client buffer.

Memory (a 1-level tree, the default on one node): ``fan_in`` receive slots plus one
accumulator that becomes the model -- fan_in + 1 models. A client whose update waits for a
slot is simply not read (TCP flow control). The next round's first fold waits until every
client has acknowledged the previous model (its pages are being sent by reference).

Warm across rounds: the slots are never handed back to the pool between rounds, so their
pages stay mapped and the hot path (receive, scan, fold) takes no page fault after round 1;
each round reports the faults its threads took (``/proc/thread-self/stat``).

Threads: one acceptor, one per client connection (blocking reads release the GIL), one fold
thread. The endpoint listens on loopback unless told otherwise and requires the round token
in each client's HELLO; it accepts at most ``clients`` connections and updates of at most
``max_update_bytes``.
"""

from __future__ import annotations

import hmac
import os
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import numpy as np
from hearth.functions.fedavg import wire
from hearth.functions.fedavg.aggregation import Aggregation, Ingested
from hearth.functions.fedavg.fold import StreamScan, UpdateRejected
from hearth.functions.fedavg.pack import PREFIX, Header, PackError
from hearth.functions.fedavg.rounds import RoundError
from hearth.functions.fedavg.tree import plan_tree
from hearth.functions.fedavg.warm import keep_heap, process_faults, thread_faults

SCAN_CHUNK = 1 << 20  # bytes per socket read while receiving an update (the scan reads it hot)
PAGE = os.sysconf("SC_PAGE_SIZE")


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
class _Round:
    stats: RoundStats
    published: threading.Event = field(default_factory=threading.Event)
    model: Any = None  # memoryview of the packed model
    model_file: tuple[int, int] | None = None  # (offset in the pool file, length)
    model_slot: tuple[Any, int] | None = None  # (slot, offset in it): the shared-memory path
    errors: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    sending: set[str] = field(default_factory=set)  # clients the model was (being) sent to
    released: bool = False  # the accumulator holding the model may be written again
    submitted: set[str] = field(default_factory=set)
    expected: int = 0
    forced: bool = False  # the round's deadline passed: publish what was folded
    proc0: tuple[int, int] = (0, 0)


class _RecvSlot:
    """A receive slot lent to one update; ``release`` gives it back to the server, not the pool
    (the pages stay mapped for the next round)."""

    __slots__ = ("slot", "view", "_free", "granted_at", "waited")

    def __init__(self, slot: Any, view: memoryview, free: queue.Queue):
        self.slot, self.view, self._free = slot, view, free
        self.granted_at = 0.0
        self.waited = 0.0

    def release(self) -> None:
        self._free.put(self)


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
    ):
        if clients < 1:
            raise ValueError(f"clients: need at least 1, got {clients}")
        if len(token) < 16:
            raise ValueError("token: use at least 16 characters")
        self.clients, self.token, self.pool = clients, token, pool
        self.max_update_bytes = int(max_update_bytes)
        self.fan_in = fan_in
        self.hello_timeout = hello_timeout
        self.allow_shm = allow_shm  # loopback clients of the same user may use the pool
        self.round_timeout = round_timeout  # seconds from a round's first update to its close
        self.plan = plan_tree(clients, fan_in=max(2, fan_in), levels=levels)
        # one accumulator per aggregator ("precheck": updates arrive validated) that becomes the
        # model in place, all in pool slots so the model can be sent with sendfile
        self.agg = Aggregation(
            self.plan,
            pool=pool,
            acc_dtype=acc_dtype,
            check="precheck",
            keep=1,
            acc_in_pool=True,
            publish_in_place=True,
        )
        self.top = self.agg.aggs[self.plan.top.name]
        self._fd = os.open(pool.path, os.O_RDONLY)  # sendfile source (the pool's tmpfs file)
        self._free: queue.Queue[_RecvSlot] = queue.Queue()
        self._slots: list[_RecvSlot] = []
        for _ in range(max(1, fan_in)):
            slot = pool.alloc(self.max_update_bytes)
            view = slot.buf[: self.max_update_bytes]
            np.frombuffer(view, np.uint8)[::PAGE] = 0  # pre-fault: the receive never faults
            rs = _RecvSlot(slot, view, self._free)
            self._slots.append(rs)
            self._free.put(rs)
        self._fold_q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._rounds: dict[int, _Round] = {}
        self._current: _Round | None = None  # the round being folded (or last published)
        self._conns: dict[str, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self.stats: list[RoundStats] = []
        self.fold_thread_id: int | None = None
        self._stop = threading.Event()
        self._sock = socket.create_server((host, port), backlog=clients + 4)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        if initial is not None:
            self._publish_initial(initial)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> RoundServer:
        for target, name in ((self._accept_loop, "accept"), (self._fold_loop, "fold")):
            t = threading.Thread(target=target, name=f"fedavg-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        """Stop serving and hand every slot back to the pool."""
        self._stop.set()
        self._fold_q.put(None)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the acceptor (close alone does not)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns.values())
            self._cond.notify_all()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        for rs in self._slots:
            rs.slot.release()
        self._slots.clear()
        self.agg.close()
        os.close(self._fd)

    def __enter__(self) -> RoundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def slots_held(self) -> int:
        """Receive slots currently lent to updates (0 between rounds)."""
        return len(self._slots) - self._free.qsize()

    def wait_round(self, round_id: int, timeout: float = 60.0) -> RoundStats:
        """Block until every client acknowledged round ``round_id``'s model."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                r = self._rounds.get(round_id)
                if r is not None and r.stats.t_all_acked:
                    return r.stats
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"round {round_id} was not acknowledged within {timeout}s")
                self._cond.wait(left)

    # -- rounds -------------------------------------------------------------------------------
    def _round(self, round_id: int) -> _Round:
        with self._lock:
            r = self._rounds.get(round_id)
            if r is None:
                r = self._rounds[round_id] = _Round(RoundStats(round_id))
                self.stats.append(r.stats)
                r.expected = self.clients  # less the clients that leave during the round
                r.stats.clients = r.expected
                if self.round_timeout:
                    t = threading.Timer(self.round_timeout, self._force, args=(round_id,))
                    t.daemon = True
                    t.start()
                r.proc0 = process_faults()
                for old in [k for k in self._rounds if k < round_id - 4]:
                    del self._rounds[old]
            return r

    def _publish_initial(self, model: Any) -> None:
        """Round 0: the initial model, held in the accumulator like any published model."""
        self.agg.start_round(0, min_fraction=1.0 / self.clients)
        errs = self.agg.submit_models([(model, 1, "initial", None)])
        if errs[0] is not None:
            raise ValueError(f"initial model: {errs[0]}")
        rnd = self.agg.round
        assert rnd is not None
        self.agg.expire(now=rnd.deadline + 1)
        r = self._round(0)
        self._set_model(r)

    def _set_model(self, r: _Round) -> None:
        model = self.agg.model(r.stats.round)
        r.model = model.payload
        where = self.agg.slot_of(model.payload)
        if where is not None:
            slot, off = where
            r.model_slot = (slot, off)
            r.model_file = (wire.slot_file_offset(self.pool, slot.index) + off, len(model.payload))
        r.stats.t_published = time.monotonic()
        with self._lock:
            self._current = r
            self._check_acked(r)
        r.published.set()

    def _check_acked(self, r: _Round) -> None:
        """(lock held) Every connected client has acknowledged the model: the round is over."""
        if r.stats.t_all_acked or r.model is None:
            return
        waiting = set(self._conns) - r.acked
        if not waiting:
            r.stats.t_all_acked = time.monotonic()
            p0 = r.proc0
            p1 = process_faults()
            r.stats.process_faults = (p1[0] - p0[0], p1[1] - p0[1])
            self._cond.notify_all()

    def _wait_released(self, prev: _Round | None) -> None:
        """Before a new round writes the accumulator: the previous model's readers are done."""
        if prev is None:
            return
        deadline = time.monotonic() + (self.round_timeout or float("inf"))
        with self._cond:
            # pages sent with sendfile are read by reference until the client has read them;
            # the initial model (round 0) is kept until every client has it to start from
            while not self._stop.is_set() and (
                any(c in self._conns and c not in prev.acked for c in prev.sending)
                or (
                    prev.stats.round == 0
                    and len(prev.acked) < self.clients
                    and time.monotonic() < deadline
                )
            ):
                self._cond.wait(1.0)
            prev.released = True
        self.top.release_model()

    # -- folding ------------------------------------------------------------------------------
    def _fold_loop(self) -> None:
        self.fold_thread_id = threading.get_native_id()
        while not self._stop.is_set():
            item = self._fold_q.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < max(1, self.fan_in):
                try:
                    nxt = self._fold_q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._fold_q.put(None)
                    break
                batch.append(nxt)
            f0 = thread_faults()
            for rid in sorted({b[0] for b in batch}):
                self._fold_round(rid, [b for b in batch if b[0] == rid])
            f1 = thread_faults()
            r = self._rounds.get(batch[0][0])
            if r is not None:
                fs = r.stats
                fs.fold_faults = (
                    fs.fold_faults[0] + f1[0] - f0[0],
                    fs.fold_faults[1] + f1[1] - f0[1],
                )

    def _force(self, round_id: int) -> None:
        """Round deadline: publish what was folded (the fold thread decides, in order)."""
        self._fold_q.put((round_id, None, True))
        with self._lock:
            r = self._rounds.get(round_id)
            if r is not None:
                r.forced = True

    def _fold_round(self, rid: int, batch: list[tuple[int, Ingested | None, bool]]) -> None:
        r = self._round(rid)
        batch = [b for b in batch if b[1] is not None]  # None: a client left or the deadline
        if not batch:
            self._maybe_publish(r)
            return
        cur = self.agg.round
        if cur is None or cur.round_id != rid:
            prev = self._current
            self._wait_released(prev)
            try:
                # any sound update is a quorum when the round has to close early
                self.agg.start_round(rid, min_fraction=1.0 / self.clients)
            except RoundError as e:
                for _rid, it, _ok in batch:
                    self._refuse(r, it, str(e))
                return
        for validated in (True, False):
            items = [it for _rid, it, ok in batch if ok == validated]
            if not items:
                continue
            names = [it.client for it in items]
            errs = self.agg.submit_many(items, validated=validated)
            for name, e in zip(names, errs, strict=True):
                if e is not None:
                    r.errors[name] = str(e)
                    r.stats.rejected += 1
                else:
                    r.stats.folded += 1
        self._maybe_publish(r)

    def _refuse(self, r: _Round, it: Ingested, why: str) -> None:
        r.errors[it.client] = why
        r.stats.rejected += 1
        if it.slot is not None:
            it.slot.release()
            it.slot = None
        self._maybe_publish(r)

    def _maybe_publish(self, r: _Round) -> None:
        if r.published.is_set():
            return
        done = r.stats.folded + r.stats.rejected
        if done < len(r.submitted) or (done < r.expected and not r.forced):
            return  # updates in flight, or clients still to submit (before the deadline)
        try:
            self.agg.model(r.stats.round)
        except RoundError:
            rnd = self.agg.round
            if rnd is not None and rnd.round_id == r.stats.round and r.stats.folded:
                self.agg.expire(now=rnd.deadline + 1)  # close with the updates that were sound
        try:
            self.agg.model(r.stats.round)
        except RoundError:
            r.published.set()  # nothing to publish: the clients get the errors
            with self._lock:
                self._cond.notify_all()
            return
        self._set_model(r)

    # -- connections --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _addr = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)

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
        with self._lock:
            if name in self._conns:
                raise wire.WireError(f"client {name!r} is already connected")
            if len(self._conns) >= self.clients:
                raise wire.WireError(f"the round endpoint takes {self.clients} clients")
            self._conns[name] = sock
        sock.settimeout(None)
        shm = bool(msg.get("shm")) and self.allow_shm and wire.is_loopback(sock)
        return name, shm

    def _serve(self, sock: socket.socket) -> None:
        wire.tune(sock)
        name = None
        try:
            try:
                name, shm = self._hello(sock)
            except (PermissionError, wire.WireError, ValueError, OSError) as e:
                wire.send_error(sock, "hello refused", str(e))
                return
            with self._lock:
                cur = self._current
                nxt = (cur.stats.round + 1) if cur is not None else 1
                latest = (
                    cur if cur is not None and cur.model is not None and not cur.released else None
                )
                if latest is not None:
                    latest.sending.add(name)
            welcome: dict[str, Any] = {"clients": self.clients, "round": nxt}
            welcome["model"] = latest is not None
            if shm:
                # the slots this client will write and read: it maps them before round 1
                held = [(rs.slot.index, rs.slot.gen) for rs in self._slots]
                welcome["pool"] = self.pool.name
                welcome["slots"] = held + [(s.index, s.gen) for s in self.agg._slots.values()]
            wire.send_control(sock, wire.WELCOME, welcome)
            if latest is not None:
                self._send_model(sock, latest, shm)
            granted: _RecvSlot | None = None
            while not self._stop.is_set():
                kind, length = wire.read_frame(sock)
                if kind == wire.UPDATE:
                    self._receive_update(sock, name, length, shm)
                elif kind == wire.SLOT_REQUEST and shm and granted is None:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    granted = self._grant(sock, int(msg.get("length", -1)))
                elif kind == wire.UPDATE_IN_SLOT and granted is not None:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    rs, granted = granted, None
                    self._update_in_slot(sock, name, rs, msg)
                elif kind == wire.ACK:
                    msg = msgpack.unpackb(wire.read_control(sock, length))
                    self._ack(name, int(msg.get("round", -1)))
                elif kind == wire.BYE:
                    return
                else:
                    raise wire.WireError(f"unexpected {wire.KIND_NAMES[kind]} frame")
        except (wire.WireError, OSError, ValueError) as e:
            if not self._stop.is_set():
                wire.send_error(sock, "protocol error", str(e))
        finally:
            self._drop(name, sock)

    def _drop(self, name: str | None, sock: socket.socket) -> None:
        try:
            sock.close()
        except OSError:
            pass
        if name is None:
            return
        with self._lock:
            if self._conns.get(name) is sock:
                del self._conns[name]
            rounds = list(self._rounds.values())
            for r in rounds:
                if not r.published.is_set() and name not in r.submitted:
                    r.expected -= 1  # it will not submit in this round any more
                self._check_acked(r)
        for r in rounds:
            if not r.published.is_set():
                self._maybe_publish_async(r)

    def _maybe_publish_async(self, r: _Round) -> None:
        # a departed client may complete a round: let the fold thread decide, in order
        self._fold_q.put((r.stats.round, None, True))

    def _ack(self, name: str, round_id: int) -> None:
        with self._lock:
            r = self._rounds.get(round_id)
            if r is None:
                return
            r.acked.add(name)
            self._check_acked(r)

    def _check_length(self, length: int) -> None:
        if length > self.max_update_bytes or length < PREFIX.size:
            raise wire.WireError(
                f"update of {length} bytes: this endpoint takes at most {self.max_update_bytes}"
            )

    def _grant(self, sock: socket.socket, length: int) -> _RecvSlot:
        """Shared-memory path: lend a receive slot the client writes its update into."""
        self._check_length(length)
        t = time.monotonic()
        rs = self._free.get()  # backpressure, as for socket updates
        rs.granted_at = t
        rs.waited = time.monotonic() - t
        wire.send_control(sock, wire.SLOT_GRANT, {"slot": rs.slot.index, "gen": rs.slot.gen})
        return rs

    def _update_in_slot(self, sock: socket.socket, name: str, rs: _RecvSlot, msg: Any) -> None:
        length = int(msg.get("length", -1))
        if (msg.get("slot"), msg.get("gen")) != (rs.slot.index, rs.slot.gen):
            rs.release()
            raise wire.WireError("UPDATE_IN_SLOT names a slot this client was not granted")
        try:
            self._check_length(length)
        except wire.WireError:
            rs.release()
            raise
        f0 = thread_faults()
        view = rs.view[:length]
        _magic, _v, _r, hlen, data_off = PREFIX.unpack_from(view, 0)
        h = self._checked_header(view, hlen, data_off, length, name, rs)
        scan = StreamScan(h.layout, h.n if isinstance(h.n, int) else 1, self.top.acc_dtype)
        scan.feed(view[data_off:], length - data_off)  # the update is not trusted: check it
        self._received(sock, name, rs, view, h, scan, rs.granted_at, rs.waited, f0, True)

    def _checked_header(
        self, view: memoryview, hlen: int, data_off: int, length: int, name: str, rs: _RecvSlot
    ) -> Header:
        try:
            if data_off > length or PREFIX.size + hlen > data_off:
                raise PackError("update header does not fit the frame")
            h = wire.read_update_header(view, hlen)
        except PackError as e:
            rs.release()
            raise wire.WireError(f"bad update header: {e}") from None
        if data_off + h.layout.data_nbytes != length or h.kind != "update":
            rs.release()
            raise wire.WireError("the frame length does not match the update's layout")
        if h.client != name:
            rs.release()
            raise wire.WireError(f"the update names client {h.client!r}; this is {name!r}")
        return h

    def _receive_update(self, sock: socket.socket, name: str, length: int, shm: bool) -> None:
        self._check_length(length)
        t_frame = time.monotonic()
        f0 = thread_faults()
        rs = self._free.get()  # backpressure: wait for a free pre-faulted slot
        waited = time.monotonic() - t_frame
        view = rs.view[:length]
        # the header first (it names the round and the layout), then the data, scanned as it lands
        wire.recv_into_exact(sock, view[: PREFIX.size])
        _magic, _v, _r, hlen, data_off = PREFIX.unpack_from(view, 0)
        if data_off > length or PREFIX.size + hlen > data_off:
            rs.release()
            raise wire.WireError("update header does not fit the frame")
        wire.recv_into_exact(sock, view[PREFIX.size : data_off])
        h = self._checked_header(view, hlen, data_off, length, name, rs)
        scan = StreamScan(h.layout, h.n if isinstance(h.n, int) else 1, self.top.acc_dtype)
        data = view[data_off:]
        got = 0
        while got < len(data):
            k = sock.recv_into(data[got:], min(SCAN_CHUNK, len(data) - got))
            if k == 0:
                rs.release()
                raise wire.WireError(f"peer closed the connection after {got} update bytes")
            got += k
            scan.feed(data, got)
        self._received(sock, name, rs, view, h, scan, t_frame, waited, f0, shm)

    def _received(
        self,
        sock: socket.socket,
        name: str,
        rs: _RecvSlot,
        view: memoryview,
        h: Header,
        scan: StreamScan,
        t_start: float,
        waited: float,
        f0: tuple[int, int],
        shm: bool,
    ) -> None:
        """An update is complete in its slot: count it, queue it for the fold, and answer the
        client with the round's model once it is published."""
        length = len(view)
        rid = int(h.round or 0)
        r = self._round(rid)
        f1 = thread_faults()
        with self._lock:
            st = r.stats
            if not st.t_first_update or t_start < st.t_first_update:
                st.t_first_update = t_start
            r.submitted.add(name)
            st.bytes_received += length
            # the one copy of the update's bytes: the kernel's (socket -> slot) or the client's
            # own write into the granted slot
            st.bytes_copied += length
            st.receive_wait_s += waited
            st.recv_faults = (st.recv_faults[0] + f1[0] - f0[0], st.recv_faults[1] + f1[1] - f0[1])
            st.t_all_received = max(st.t_all_received, time.monotonic())
        node = self.plan.nodes[0][0]
        self._fold_q.put((rid, Ingested(view, node, name, rs), scan.complete))
        r.published.wait()
        if self._stop.is_set():
            return
        err = r.errors.get(name)
        if err is not None:
            wire.send_error(sock, "update rejected", err)
            self._ack(name, rid)
            return
        with self._lock:
            r.sending.add(name)
        self._send_model(sock, r, shm)

    def _send_model(self, sock: socket.socket, r: _Round, shm: bool = False) -> None:
        if r.model is None:
            wire.send_error(
                sock, "round failed", "; ".join(r.errors.values())[:2000] or "no update"
            )
            return
        n = len(r.model)
        by_file = not shm and r.model_file is not None
        # counted before the bytes go out: the client's ACK may arrive before this thread runs
        with self._lock:
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


__all__ = ["RoundServer", "RoundStats", "UpdateRejected", "keep_heap", "thread_faults"]
