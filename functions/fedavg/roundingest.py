"""Ingestion at the round endpoint: an update goes from the client straight into a pre-faulted
receive slot (the one copy of its bytes on the server), is checked for NaN/Inf while each
received range is still in cache, and is queued for the fold thread as soon as it is complete.

Two ways in, both into the same slots:

* **socket** (``UPDATE``): the kernel copies the frame into the slot; the header first (it
  names the round and the layout), then the data in ``SCAN_CHUNK`` reads, each scanned as it
  lands (:class:`~hearth.functions.fedavg.streamscan.StreamScan`);
* **shared memory** (``SLOT_REQUEST`` / ``SLOT_PROGRESS`` / ``UPDATE_IN_SLOT``): a client on
  this node writes the update into a granted slot itself, saying how far it got every few MiB;
  the server scans each written range then, while the range is still in the shared cache.

Either way the update is not trusted: its header must match the frame's length and name the
connected client, and its values must be finite.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hearth.functions.fedavg import wire
from hearth.functions.fedavg.aggregation import Ingested
from hearth.functions.fedavg.pack import PREFIX, Header, PackError
from hearth.functions.fedavg.recvslots import RecvSlot, RecvSlots, socket_sink
from hearth.functions.fedavg.roundfold import Folder
from hearth.functions.fedavg.roundstate import RoundState, RoundTable
from hearth.functions.fedavg.streamscan import StreamScan
from hearth.functions.fedavg.warm import thread_faults

SCAN_CHUNK = 4 << 20  # bytes per socket read while receiving an update (scanned in cache)


@contextmanager
def _lent(rs: RecvSlot) -> Iterator[None]:
    """The slot goes back to the server on ANY error before its update is handed to the fold
    (a refused update, a dropped connection, or a bug: none may keep one of fan_in slots)."""
    try:
        yield
    except BaseException:
        rs.release()
        raise


class Ingest:
    """Receives updates into ``slots`` and queues them on ``folder``."""

    def __init__(self, table: RoundTable, slots: RecvSlots, folder: Folder, max_update_bytes: int):
        self.table, self.slots, self.folder = table, slots, folder
        self.max_update_bytes = int(max_update_bytes)
        self.node = folder.plan.nodes[0][0]  # the leaves' node (one node per endpoint)
        self.acc_dtype = folder.top.acc_dtype
        # shared-memory updates that land after their round's first pass started: the client
        # reports every this many bytes written (0: never; the update is checked whole)
        self.progress_bytes = SCAN_CHUNK

    def check_length(self, length: int) -> None:
        if length > self.max_update_bytes or length < PREFIX.size:
            raise wire.WireError(
                f"update of {length} bytes: this endpoint takes at most {self.max_update_bytes}"
            )

    # -- socket path --------------------------------------------------------------------------
    def receive(self, sock: socket.socket, name: str, length: int) -> RoundState:
        """Read an ``UPDATE`` frame's body into a slot; returns its round once queued."""
        self.check_length(length)
        t_frame = time.monotonic()
        f0 = thread_faults()
        # backpressure: wait for a free pre-faulted slot; a pass may still read it, so each
        # read waits for the credit to write its range (the pass moves it every few MiB)
        rs = self.slots.take()
        waited = time.monotonic() - t_frame
        with _lent(rs):
            view = rs.view[:length]
            # the header first (it names the round and the layout), then the data, scanned as
            # it lands
            self._credited(rs, PREFIX.size)
            wire.recv_into_exact(sock, view[: PREFIX.size])
            _magic, _v, _r, hlen, data_off = PREFIX.unpack_from(view, 0)
            if data_off > length or PREFIX.size + hlen > data_off:
                raise wire.WireError("update header does not fit the frame")
            self._credited(rs, data_off)
            wire.recv_into_exact(sock, view[PREFIX.size : data_off])
            h = self._checked_header(view, hlen, data_off, length, name)
            scan = StreamScan(h.layout, h.n if isinstance(h.n, int) else 1, self.acc_dtype)
            data = view[data_off:]
            got = wire.recv_chunks(
                sock,
                data,
                SCAN_CHUNK,
                lambda done: scan.feed(data, done),
                lambda upto: self._credited(rs, data_off + upto) - data_off,
            )
            if got < len(data):
                raise wire.WireError(f"peer closed the connection after {got} update bytes")
            return self._received(name, rs, view, h, scan, t_frame, waited, f0)

    def _credited(self, rs: RecvSlot, upto: int) -> int:
        got = rs.wait_credit(upto)
        if got < upto:
            raise wire.WireError("the round endpoint is closing")
        return got

    # -- shared-memory path -------------------------------------------------------------------
    def grant(
        self, sock: socket.socket, length: int, round_id: Any = None, credits: bool = False
    ) -> RecvSlot:
        """Lend a receive slot the client writes its update into. If its round's fold has
        started, the update cannot join the first pass (which needs no check): ask the client
        for ``SLOT_PROGRESS`` every ``progress_bytes``, so each range is checked in cache.
        ``credits``: the client follows ``SLOT_CREDIT`` frames, so it may be lent a slot that a
        pass still reads; otherwise it waits until no pass does."""
        self.check_length(length)
        r = self.table.find(round_id) if isinstance(round_id, int) else None
        progress = self.progress_bytes if r is not None and r.fold_started else 0

        def tell(rs: RecvSlot, credit: int) -> None:
            """(under the slots' lock, which every fold pass's frontier report takes) never
            blocks: a client that does not read its socket is dropped."""
            msg = {"slot": rs.slot.index, "gen": rs.slot.gen, "progress": progress}
            if credit < length:
                msg["credit"] = credit
            send = socket_sink(
                sock, lambda s, _u: wire.send_control_nowait(s, wire.SLOT_GRANT, msg)
            )
            if not send(credit):
                raise OSError("the client does not read its socket: dropped")

        sink = (
            socket_sink(
                sock, lambda s, upto: wire.send_control_nowait(s, wire.SLOT_CREDIT, {"upto": upto})
            )
            if credits
            else None
        )
        # backpressure, as for socket updates
        return self.slots.take(length, credits=credits, grant=tell, sink=sink)

    def progress(self, name: str, rs: RecvSlot, msg: Any) -> None:
        """``SLOT_PROGRESS``: the client has written the slot's first ``upto`` bytes; check the
        new range now, while it is still in the cache the client's copy left it in."""
        with _lent(rs):
            upto = msg.get("upto") if isinstance(msg, dict) else None
            if not isinstance(upto, int) or not 0 < upto <= rs.length:
                raise wire.WireError(f"SLOT_PROGRESS: upto must be in 1..{rs.length}, got {upto!r}")
            if upto > rs.credit():  # a pass still reads them: they would be another's bytes
                raise wire.WireError(f"SLOT_PROGRESS: {upto} bytes, past the slot's credit")
            f0 = thread_faults()
            view = rs.view[: rs.length]
            if rs.check is None:
                _magic, _v, _r, hlen, data_off = PREFIX.unpack_from(view, 0)
                if upto < min(data_off, rs.length):
                    return  # the header is not all there yet
                h = self._checked_header(view, hlen, data_off, rs.length, name)
                rs.check = (
                    h,
                    StreamScan(h.layout, h.n if isinstance(h.n, int) else 1, self.acc_dtype),
                )
            h, scan = rs.check
            data_off = rs.length - h.layout.data_nbytes
            if upto > data_off:
                scan.feed(view[data_off:], upto - data_off)
            f1 = thread_faults()
            st = self.table.get(int(h.round or 0)).stats
            with self.table.lock:
                st.recv_faults = (
                    st.recv_faults[0] + f1[0] - f0[0],
                    st.recv_faults[1] + f1[1] - f0[1],
                )

    def in_slot(self, name: str, rs: RecvSlot, msg: Any) -> RoundState:
        """The client wrote its update into the granted slot ``rs``: check it and queue it."""
        with _lent(rs):
            length = int(msg.get("length", -1))
            if (msg.get("slot"), msg.get("gen")) != (rs.slot.index, rs.slot.gen):
                raise wire.WireError("UPDATE_IN_SLOT names a slot this client was not granted")
            self.check_length(length)
            if rs.length and length != rs.length:
                raise wire.WireError(f"UPDATE_IN_SLOT: {length} bytes, {rs.length} requested")
            if rs.credit() < length:  # a pass still reads the rest: it cannot all be written
                raise wire.WireError("UPDATE_IN_SLOT before the whole slot was credited")
            f0 = thread_faults()
            view = rs.view[:length]
            if rs.check is None:
                _magic, _v, _r, hlen, data_off = PREFIX.unpack_from(view, 0)
                h = self._checked_header(view, hlen, data_off, length, name)
                scan = StreamScan(h.layout, h.n if isinstance(h.n, int) else 1, self.acc_dtype)
            else:
                h, scan = rs.check  # its header was checked and its data partly scanned already
            data_off = length - h.layout.data_nbytes
            # the update is not trusted: check what SLOT_PROGRESS did not cover yet (the rest
            # of the slot, in cache only for its last range) unless it can still join its
            # round's first fold pass, which writes the accumulator from scratch and so needs
            # no check first (a bad update there is refolded alone and refused)
            if scan.done or self.table.get(int(h.round or 0)).fold_started:
                scan.feed(view[data_off:], length - data_off)
            return self._received(name, rs, view, h, scan, rs.granted_at, rs.waited, f0)

    # -- both ---------------------------------------------------------------------------------
    def _checked_header(
        self, view: memoryview, hlen: int, data_off: int, length: int, name: str
    ) -> Header:
        try:
            if data_off > length or PREFIX.size + hlen > data_off:
                raise PackError("update header does not fit the frame")
            h = wire.read_update_header(view, hlen)
        except PackError as e:
            raise wire.WireError(f"bad update header: {e}") from None
        if data_off + h.layout.data_nbytes != length or h.kind != "update":
            raise wire.WireError("the frame length does not match the update's layout")
        if h.client != name:
            raise wire.WireError(f"the update names client {h.client!r}; this is {name!r}")
        return h

    def _received(
        self,
        name: str,
        rs: RecvSlot,
        view: memoryview,
        h: Header,
        scan: StreamScan,
        t_start: float,
        waited: float,
        f0: tuple[int, int],
    ) -> RoundState:
        """An update is complete in its slot: count it and queue it for the fold (from then on
        the slot is the fold's: nothing may raise after the hand-over)."""
        length = len(view)
        rid = int(h.round or 0)
        r = self.table.get(rid)
        f1 = thread_faults()
        with self.table.lock:
            st = r.stats
            if not st.t_first_update or t_start < st.t_first_update:
                st.t_first_update = t_start
            st.bytes_received += length
            # the one copy of the update's bytes: the kernel's (socket -> slot) or the client's
            # own write into the granted slot
            st.bytes_copied += length
            st.receive_wait_s += waited
            st.recv_faults = (st.recv_faults[0] + f1[0] - f0[0], st.recv_faults[1] + f1[1] - f0[1])
            st.t_all_received = max(st.t_all_received, time.monotonic())
            r.submitted.add(name)  # last: a round waits for a submitted update
        rs.land()
        self.folder.put((rid, Ingested(view, self.node, name, rs), scan.complete))
        return r
