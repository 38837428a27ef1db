"""The names the fold's modules share: the error a bad input raises, the fold counters, the
callback types an :class:`~hearth.functions.fedavg.fold.Accumulator` takes, the default chunk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_CHUNK = 1 << 18  # elements per numpy chunk (1 MiB of float32: scratch stays in cache)
Alloc = Callable[[int], Any]  # nbytes -> writable buffer (bytearray, memoryview of a slot, ...)
# (each input's first data address, the addresses below which the pass is done with it, final)
ReadWatch = Callable[[list[int], list[int], bool], None]


class UpdateRejected(ValueError):
    """An update (or partial) cannot be folded; the accumulator is unchanged."""

    def __init__(self, message: str, client: str | None = None):
        super().__init__(message if client is None else f"update from {client!r}: {message}")
        self.client = client


@dataclass
class FoldStats:
    folded: int = 0
    rejected: int = 0
    bytes_read: int = 0
