"""Checking an update for NaN/Inf while its bytes arrive.

Why while arriving: a received range is still in cache right after the socket wrote it, so the
check costs almost nothing there, and an update that arrives checked can be folded in place
with no validation pass of its own (``Accumulator.fold_batch(validated=True)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hearth.functions.fedavg.foldkernels import FAST, HAVE_NUMBA, k_scan
from hearth.functions.fedavg.pack import Layout


class StreamScan:
    """Checks ``n·w`` of an update for NaN/Inf while its bytes arrive, one received range at a
    time (the range is still in cache), so the fold needs no validation pass of its own.

    ``feed(data, upto)`` scans the elements whose bytes lie in ``[done, upto)`` of the update's
    data region; it returns the element index of a bad value's chunk, or None. ``usable`` is
    False for layouts the fused kernel does not cover (the fold then validates as usual)."""

    def __init__(self, layout: Layout, n: int, acc_dtype: Any = np.float32):
        self.runs = layout.runs
        self.scale = np.dtype(acc_dtype).type(n)
        self.usable = HAVE_NUMBA and all(r.dtype in FAST for r in self.runs)
        self.done = 0  # bytes of the data region already scanned
        self.nbytes = layout.data_nbytes
        self.bad: int | None = None

    def feed(self, data: memoryview, upto: int) -> int | None:
        if not self.usable or self.bad is not None:
            return self.bad
        for r in self.runs:
            isz = r.dtype.itemsize
            lo, hi = r.byte_offset, r.byte_offset + r.count * isz
            s_b, e_b = max(lo, self.done), min(hi, upto)
            s, e = -(-(s_b - lo) // isz), (e_b - lo) // isz
            if e <= s:
                continue
            src = np.frombuffer(data, dtype=r.dtype, count=r.count, offset=lo)
            if k_scan(src, self.scale, s, e):
                self.bad = r.elem_offset + s
                return self.bad
        # a value straddling `upto` is scanned with the next range
        self.done = max(self.done, self._complete(upto))
        return None

    def _complete(self, upto: int) -> int:
        for r in self.runs:
            isz = r.dtype.itemsize
            lo, hi = r.byte_offset, r.byte_offset + r.count * isz
            if lo <= upto < hi:
                return lo + (upto - lo) // isz * isz
        return upto

    @property
    def complete(self) -> bool:
        """Every byte of the data region was scanned and every value is finite."""
        return self.usable and self.bad is None and self.done >= self.nbytes
