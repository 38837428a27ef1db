"""Per-node shared-memory slot pool: payloads are written once and read through views.

The pool lives in one segment file per node (layout, creator identity and stale-segment
cleanup: :mod:`hearth.dataplane.segment`). The file is sparse: tmpfs only allocates pages that
are written, so the default layout
(256 x 64 KiB, 64 x 1 MiB, 16 x 16 MiB, 4 x 256 MiB = 1.3 GiB virtual) costs nothing until
used and fits a 233 MB ResNet-152 update in one slot.

Slot layout convention: an optional msgpack metadata block of ``meta_len`` bytes at slot
offset 0; the payload starts at :func:`payload_offset` ``(meta_len)`` = ``meta_len`` rounded
up to 64, so ``np.frombuffer`` views of the payload are 64-byte aligned.

Concurrency: every table update holds a ``threading.Lock`` and an exclusive ``flock`` on the
segment fd (cross-process). Allocation is first-fit within a class; the header keeps, per class,
a hint below which every slot is in use (lowered by each free, raised by each alloc), so an alloc
probes from there instead of scanning the class, and a full class is known at once. The module
needs no numpy: instances that never touch arrays never import it. Each free bumps the slot's
generation, so a descriptor naming an old generation raises :class:`StaleSlot` instead of
reading reused memory. A view does not take a reference: hold the slot (don't release it) while
views are in use.

Trimming: a released slot of at least ``trim_threshold`` bytes (default 16 MiB) gives its tmpfs
pages back (``MADV_REMOVE``), so the next writer of that slot pays first-touch page faults again
(about 10x slower than writing into pages that are kept). The creator's threshold is recorded in
the header and every process that attaches follows it; ``HEARTH_POOL_TRIM`` (bytes, or ``off``)
sets it when ``create`` is not given one. ``off`` keeps the pages of reused slots: steady-state
traffic (rounds of same-sized payloads) then never faults, at the cost of the pool's resident
tmpfs memory growing to what was used. ``prefault(min_size)`` allocates the pages of free slots of
the large classes up front (``MADV_POPULATE_WRITE``), so even the first writer does not fault.

Ownership: ``alloc`` makes the caller the owner; a receiver calls ``adopt`` when it takes
over a slot from a descriptor. ``reclaim_dead`` frees slots whose owner process is gone
(pid dead, zombie, or reused -- checked with the process start time). Those rules are
:mod:`hearth.dataplane.owners` (a mixin of `SlotPool`); the errors, the `Slot` handle, the
size classes and `payload_offset` are :mod:`hearth.dataplane.slots`; the segment file (its
layout, creation, identity and cleanup) is :mod:`hearth.dataplane.segment`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading

import msgpack

from hearth.dataplane.owners import SlotOwners
from hearth.dataplane.segment import (
    _CLS,
    _CLS_OFF,
    _HDR,
    _HINT_OFF,
    _TRIM_OFF,
    FREE,
    HEADER_SIZE,
    MAGIC,
    MAX_CLASSES,
    PAGE,
    ROW_SIZE,
    ROW_U32,
    ROW_U64,
    SHM_DIR,
    USED,
    VERSION,
    _check_name,
    _Me,
    _my_start,
    _unlink,
    create_segment,
)
from hearth.dataplane.slots import (
    DEFAULT_CLASSES,
    DEFAULT_TRIM_THRESHOLD,
    MAX_SLOT_BYTES,
    PayloadTooLarge,
    PoolError,
    PoolExhausted,
    Slot,
    StaleSlot,
    _human,
    _trim_from_env,
    payload_offset,
)

TYPE_CHECKING = False  # no typing import on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

    from hearth.dataplane.descriptor import Descriptor

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


class _PoolLock:
    """Thread lock + exclusive ``flock`` on the segment fd (cross-process), as a cheap context."""

    __slots__ = ("_fd", "_t")

    def __init__(self, fd: int):
        self._fd = fd
        self._t = threading.Lock()

    def __enter__(self) -> None:
        self._t.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._t.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._t.release()


class SlotPool(SlotOwners):
    """A per-node shared-memory slot pool (see module docstring). Use create/attach."""

    def __init__(self, name: str, fd: int, mm: mmap.mmap, *, creator: bool, trim: int):
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self._fd = fd
        self._mm = mm
        self._mv = memoryview(mm)
        self._creator = creator
        self.trim_threshold = trim
        self._lock = _PoolLock(fd)
        (magic, version, cpid, cstart, ncls, nslots, toff, doff, total) = _HDR.unpack_from(mm, 0)
        if magic != MAGIC or version != VERSION:
            raise PoolError(
                f"{self.path} is not a Hearth slot pool of this build (magic {magic!r}, format"
                f" version {version}; this build reads {VERSION})"
            )
        self.creator_pid, self.creator_start = cpid, cstart
        self.total_size = total
        self.classes: list[tuple[int, int, int, int]] = [
            _CLS.unpack_from(mm, _CLS_OFF + i * _CLS.size) for i in range(ncls)
        ]
        self.nslots = nslots
        # scalar access through typed memoryviews:
        # row i = u32[12i..12i+5] = state, refcount, gen, owner, length, handed by;
        # u64[6i+3] = owner start, u64[6i+4] = handed-by start (ROW_U32, ROW_U64)
        tbytes = self._mv[toff : toff + nslots * ROW_SIZE]
        self._u32 = tbytes.cast("I")
        self._u64 = tbytes.cast("Q")
        self._hint = self._mv[_HINT_OFF : _HINT_OFF + 4 * MAX_CLASSES].cast("I")
        # per-slot geometry (process-local, derived from the header)
        caps, offs, klass = [], [], []
        for k, (size, count, _first, off) in enumerate(self.classes):
            for j in range(count):
                caps.append(size)
                offs.append(off + j * size)
                klass.append(k)
        self._caps = caps
        self._offs = offs
        self._class_of = klass
        self._closed = False

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str,
        classes: list[tuple[int, int]] | None = None,
        *,
        trim_threshold: int | None = None,
    ) -> SlotPool:
        """Create the node pool ``/dev/shm/<name>`` (0600).

        ``classes`` is a list of ``(slot_size, count)``; sizes are rounded up to the page
        size. Leftovers of a dead previous creator of the same name are removed; a segment
        whose creator is alive raises ``FileExistsError``. ``trim_threshold`` (default:
        ``HEARTH_POOL_TRIM``, else 16 MiB; :data:`TRIM_OFF` never trims) is recorded in the
        header, so processes that attach release slots the same way.
        """
        _check_name(name)
        trim = _trim_from_env() if trim_threshold is None else max(1, int(trim_threshold))
        classes = sorted(DEFAULT_CLASSES if classes is None else classes)
        if not classes or len(classes) > MAX_CLASSES:
            raise ValueError(f"classes: need 1..{MAX_CLASSES} (size, count) pairs, got {classes}")
        norm = []
        for size, count in classes:
            if size <= 0 or count <= 0:
                raise ValueError(f"classes: size and count must be positive, got ({size}, {count})")
            if size > MAX_SLOT_BYTES:  # a slot's length is a u32 in its row
                raise ValueError(
                    f"classes: a slot holds at most {MAX_SLOT_BYTES} bytes, got {size}"
                )
            norm.append((-(-size // PAGE) * PAGE, int(count)))
        fd, mm = create_segment(name, norm, trim)
        return cls(name, fd, mm, creator=True, trim=trim)

    @classmethod
    def attach(cls, name: str, *, trim_threshold: int | None = None) -> SlotPool:
        """Map an existing pool (from any process of the same user on the node).

        ``trim_threshold`` defaults to the creator's (recorded in the header; 16 MiB for
        segments that predate the record)."""
        _check_name(name)
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(f"slot pool {name!r} does not exist ({path})") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise PoolError(f"{path} is too small to be a slot pool ({size} bytes)")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if trim_threshold is None:
                trim_threshold = (
                    struct.unpack_from("<Q", mm, _TRIM_OFF)[0] or DEFAULT_TRIM_THRESHOLD
                )
            return cls(name, fd, mm, creator=False, trim=trim_threshold)
        except BaseException:
            os.close(fd)
            raise

    # -- locking ---------------------------------------------------------------------------
    def _locked(self) -> _PoolLock:
        if self._closed:
            raise PoolError(f"slot pool {self.name!r} is closed")
        return self._lock

    def _row(self, slot: int, gen: int) -> None:
        if not 0 <= slot < self.nslots:
            raise StaleSlot(f"slot {slot} out of range (pool {self.name!r} has {self.nslots})")
        u = self._u32
        b = slot * ROW_U32
        if u[b] != USED or u[b + 2] != gen:
            state = "free" if u[b] == FREE else "in use"
            raise StaleSlot(
                f"slot {slot} generation {gen} is stale (slot is {state}, generation {u[b + 2]})"
            )

    def _free_locked(self, slot: int) -> None:
        u, b = self._u32, slot * ROW_U32
        u[b] = FREE
        u[b + 1] = 0
        u[b + 2] = (u[b + 2] + 1) & 0xFFFFFFFF
        u[b + 3] = 0
        q = slot * ROW_U64
        self._u64[q + 2] = 0  # its length and who handed it over
        self._u64[q + 3] = 0
        self._u64[q + 4] = 0
        k = self._class_of[slot]
        rel = slot - self.classes[k][2]
        if rel < self._hint[k]:
            self._hint[k] = rel  # every slot below the hint stays in use
        cap = self._caps[slot]
        if cap >= self.trim_threshold:
            # give the tmpfs pages back; done under the lock so no new owner is writing yet
            try:
                self._mm.madvise(mmap.MADV_REMOVE, self._offs[slot], cap)
            except OSError:
                pass

    # -- slot API --------------------------------------------------------------------------
    def alloc(self, nbytes: int, *, exact: bool = False) -> Slot:
        """A slot of at least ``nbytes`` from the smallest class that has a free one.
        ``exact``: only from the smallest class that fits (what HTTP bodies use, so small
        requests can never hold the few large slots)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        largest = self.classes[-1][0]
        if nbytes > largest:
            raise PayloadTooLarge(
                f"payload of {nbytes} bytes exceeds the largest slot class ({_human(largest)}) "
                f"of pool {self.name!r}"
            )
        i = gen = -1
        u, hint = self._u32, self._hint
        with self._locked():
            for k, (size, count, first, _off) in enumerate(self.classes):
                if size < nbytes:
                    continue
                j = hint[k]
                while j < count and u[(first + j) * ROW_U32] != FREE:
                    j += 1
                hint[k] = j if j >= count else j + 1  # first-fit: everything below is used
                if j >= count:
                    if exact:
                        break
                    continue
                i = first + j
                b = i * ROW_U32
                u[b] = USED
                u[b + 1] = 1
                u[b + 3] = _Me.pid
                u[b + 4] = nbytes
                u[b + 5] = 0
                self._u64[i * ROW_U64 + 3] = _my_start()
                self._u64[i * ROW_U64 + 4] = 0
                gen = u[b + 2]
                break
            if i < 0:
                raise PoolExhausted(
                    f"slot pool {self.name!r} has no free slot for {nbytes} bytes ("
                    + ", ".join(
                        f"{_human(s)}: {self._used(f, c)}/{c} used"
                        for s, c, f, _ in self.classes
                        if s >= nbytes
                    )
                    + ")"
                )
        cap = self._caps[i]
        off = self._offs[i]
        return Slot(i, gen, cap, self._mv[off : off + cap], self, length=nbytes)

    def prefault(self, min_size: int) -> int:
        """Allocate the tmpfs pages of every free slot of the classes of at least ``min_size``
        bytes and map them in this process (``MADV_POPULATE_WRITE``), so writers here never take
        first-touch faults. Only lasting if those slots are not trimmed on release (see
        ``trim_threshold``). Costs that much resident memory; returns the bytes populated.
        Other processes still map the (already allocated) pages on first access."""
        done = 0
        with self._locked():
            for size, count, first, off in self.classes:
                if size < min_size:
                    continue
                for j in range(count):
                    if self._u32[(first + j) * ROW_U32] == FREE:
                        self._mm.madvise(MADV_POPULATE_WRITE, off + j * size, size)
                        done += size
        return done

    def capacity(self, slot: int) -> int:
        """Bytes a slot can hold (its class size); lock-free."""
        return int(self._caps[slot])

    def view(self, slot: int, gen: int, length: int, offset: int = 0) -> memoryview:
        """A writable view of ``length`` bytes at ``offset`` in the slot (no copy).

        Lock-free: the generation check is the same with or without the lock, because the
        view outlives any lock anyway -- keep your reference until you are done with it.
        """
        if self._closed:
            raise PoolError(f"slot pool {self.name!r} is closed")
        self._row(slot, gen)
        cap = self._caps[slot]
        if offset < 0 or length < 0 or offset + length > cap:
            raise ValueError(
                f"range offset={offset} length={length} exceeds slot {slot} capacity {cap}"
            )
        base = self._offs[slot] + offset
        return self._mv[base : base + length]

    def slot(self, slot: int, gen: int) -> Slot:
        """A :class:`Slot` handle for an allocated slot (e.g. one received by descriptor)."""
        with self._locked():
            self._row(slot, gen)
            length = self._u32[slot * ROW_U32 + 4]
        cap, off = self._caps[slot], self._offs[slot]
        return Slot(slot, gen, cap, self._mv[off : off + cap], self, length=length)

    def incref(self, slot: int, gen: int) -> int:
        """Add a reference (e.g. before fanning the slot out to a second receiver)."""
        with self._locked():
            self._row(slot, gen)
            rc = self._u32[slot * ROW_U32 + 1] + 1
            self._u32[slot * ROW_U32 + 1] = rc
            return rc

    def release(self, slot: int, gen: int) -> int:
        """Drop a reference; at zero the slot is freed and its generation bumped."""
        with self._locked():
            self._row(slot, gen)
            rc = self._u32[slot * ROW_U32 + 1] - 1
            if rc <= 0:
                self._free_locked(slot)
                return 0
            self._u32[slot * ROW_U32 + 1] = rc
            return rc

    def set_length(self, slot: int, gen: int, length: int) -> None:
        """Record the used length (informational: descriptors carry their own)."""
        with self._locked():
            self._row(slot, gen)
            self._u32[slot * ROW_U32 + 4] = length

    def _used(self, first: int, count: int) -> int:
        w = ROW_U32
        return count - self._u32[first * w : (first + count) * w : w].tolist().count(FREE)

    def stats(self) -> dict[str, Any]:
        """Per class: total, free, used slots and used bytes (payload lengths)."""
        with self._locked():
            state = self._u32[::ROW_U32].tolist()
            length = self._u32[4::ROW_U32].tolist()
        classes = {}
        all_used = all_bytes = 0
        for size, count, first, _ in self.classes:
            used = [i for i in range(first, first + count) if state[i] == USED]
            nbytes = sum(length[i] for i in used)
            all_used += len(used)
            all_bytes += nbytes
            classes[str(size)] = {
                "slot_size": size,
                "total": count,
                "used": len(used),
                "free": count - len(used),
                "used_bytes": nbytes,
            }
        return {
            "name": self.name,
            "path": self.path,
            "virtual_bytes": self.total_size,
            "slots": self.nslots,
            "used": all_used,
            "used_bytes": all_bytes,
            "classes": classes,
        }

    # -- payload helpers (slot layout convention) -----------------------------------------
    def put(self, data: Any = None, meta: dict | None = None, *, nbytes: int | None = None) -> Slot:
        """Allocate a slot, write the msgpack ``meta`` block and copy ``data`` (if given).

        ``data`` may be bytes, a memoryview or any buffer, e.g. a numpy array (written once,
        straight into the slot; a non-contiguous array is made contiguous first). Pass ``nbytes`` instead of ``data`` to reserve space and
        fill ``slot.payload`` yourself (e.g. from a socket).
        """
        mb = msgpack.packb(meta) if meta is not None else b""
        if data is not None:
            src = memoryview(data)
            if not src.c_contiguous:
                import numpy as np  # only reached by someone who passed an array

                src = memoryview(np.ascontiguousarray(data))
            src = src.cast("B")
            nbytes = src.nbytes
        elif nbytes is None:
            nbytes = 0
        slot = self.alloc(payload_offset(len(mb)) + nbytes)
        slot.meta_len = len(mb)
        slot.length = nbytes
        if mb:
            slot.buf[: len(mb)] = mb
        if data is not None and nbytes:
            slot.payload[:] = src
        return slot

    def payload(self, d: Descriptor) -> memoryview:
        """The payload view named by a descriptor (raises StaleSlot if it is old)."""
        return self.view(d.slot, d.gen, d.length, payload_offset(d.meta_len))

    def meta(self, d: Descriptor) -> Any:
        """The decoded metadata block named by a descriptor (None if there is none)."""
        if not d.meta_len:
            return None
        return msgpack.unpackb(self.view(d.slot, d.gen, d.meta_len, 0))

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap (if no views are still exported) and close the fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for v in (self._u32, self._u64, self._hint):
            v.release()
        try:
            self._mv.release()
            self._mm.close()
        except BufferError:
            pass  # views still alive: the mapping goes away with the last of them
        try:
            os.close(self._fd)
        except OSError:
            pass

    def destroy(self) -> None:
        """Close and unlink the segment (processes still attached keep their mapping)."""
        path = self.path
        self.close()
        _unlink(path)

    def __enter__(self) -> SlotPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlotPool({self.name!r}, slots={self.nslots}, virtual={_human(self.total_size)})"
