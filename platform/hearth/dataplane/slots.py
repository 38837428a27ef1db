"""The slot pool's vocabulary: its size classes and trim setting, its errors, the payload layout
convention (`payload_offset`) and the handle of an allocated slot (`Slot`). Apart from the pool
(:mod:`hearth.dataplane.shm`) so that what names a slot or a pool error does not carry the
allocator; like it, no typing import on the runtime's path (issue #19)."""

from __future__ import annotations

import os

from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.records import Record

TYPE_CHECKING = False  # no typing import on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

    from hearth.dataplane.shm import SlotPool

#: free the tmpfs pages of slots at least this big when they are released
DEFAULT_TRIM_THRESHOLD = 16 << 20
#: ``trim_threshold`` that never trims (pages of released slots are kept for the next writer)
TRIM_OFF = (1 << 63) - 1

# Small slots are many: every queued invocation holds its request slot. tmpfs allocates pages
# lazily, so the count costs address space, not memory.
DEFAULT_CLASSES: list[tuple[int, int]] = [
    (64 << 10, 4096),
    (1 << 20, 256),
    (16 << 20, 16),
    (64 << 20, 32),  # ResNet-18-sized models (45 MB): an FL tree holds several per aggregator
    (256 << 20, 4),
]
#: the largest slot class (a slot's length is a u32 in its row)
MAX_SLOT_BYTES = 1 << 31


class PoolError(RuntimeError):
    """Base class of slot-pool errors."""


class PoolExhausted(PoolError):
    """No free slot can hold the requested size right now."""


class PayloadTooLarge(PoolError, ValueError):
    """The payload is larger than the largest slot class."""


class StaleSlot(PoolError):
    """The descriptor names a slot generation that was freed (and maybe reused)."""


def payload_offset(meta_len: int) -> int:
    """Where the payload starts in a slot: after the metadata block, 64-byte aligned."""
    return (meta_len + 63) & ~63


def _trim_from_env() -> int:
    """``HEARTH_POOL_TRIM``: a byte threshold, or ``off``; unset -> the default (16 MiB)."""
    raw = os.environ.get("HEARTH_POOL_TRIM", "").strip().lower()
    if not raw:
        return DEFAULT_TRIM_THRESHOLD
    if raw in ("off", "never", "none"):
        return TRIM_OFF
    try:
        return max(1, int(raw))
    except ValueError:
        raise ValueError(f"HEARTH_POOL_TRIM must be a byte count or 'off', not {raw!r}") from None


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


class Slot(Record):
    """An allocated slot. ``buf`` is a writable view of the whole slot (``capacity`` bytes)."""

    _fields = ("index", "gen", "capacity", "buf", "pool", "length", "meta_len")
    _hidden = ("pool",)

    def __init__(
        self,
        index: int,
        gen: int,
        capacity: int,
        buf: memoryview,
        pool: SlotPool | None = None,
        length: int = 0,
        meta_len: int = 0,
    ) -> None:
        self.index = index
        self.gen = gen
        self.capacity = capacity
        self.buf = buf
        self.pool = pool
        self.length = length
        self.meta_len = meta_len

    @property
    def payload(self) -> memoryview:
        """The payload region (after the metadata block), ``length`` bytes."""
        off = payload_offset(self.meta_len)
        return self.buf[off : off + self.length]

    def descriptor(self, dst: int, src: int, kind: int = Kind.INVOKE, **fields: Any) -> Descriptor:
        """A descriptor naming this slot (length/meta_len from the slot unless given)."""
        base: dict[str, Any] = {"length": self.length, "meta_len": self.meta_len, **fields}
        return Descriptor(dst=dst, src=src, slot=self.index, gen=self.gen, kind=kind, **base)

    def release(self) -> None:
        assert self.pool is not None
        self.pool.release(self.index, self.gen)
