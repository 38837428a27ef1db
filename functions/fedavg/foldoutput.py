"""What an :class:`~hearth.functions.fedavg.fold.Accumulator` hands on: its sum as a packed
``partial`` (in place, for the parent), the model divided in place (the accumulator's buffer
*is* the published model until the broadcast releases it), or the model divided into other
buffers.

Why in place: a model-sized copy per round is as much memory traffic as folding one more
update, and a second model-sized buffer would break the server's memory bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hearth.functions.fedavg import foldpasses as passes
from hearth.functions.fedavg.pack import Header, Layout, write_header


class AccumulatorOutput:
    """Output methods of the accumulator (a mixin: the state lives in ``Accumulator``)."""

    layout: Layout
    acc_dtype: np.dtype
    total: int
    reserve: int
    chunk: int
    threads: int
    count: int
    n: int
    divided: bool
    model_held: bool
    buffers: list[memoryview]
    _live: int

    @property
    def value(self) -> np.ndarray:  # pragma: no cover - defined by Accumulator
        raise NotImplementedError

    def can_finalize_in_place(self) -> bool:
        """True when the model has the accumulator's exact byte layout (every layer of the
        accumulator's dtype), so dividing in place turns the accumulator into the model."""
        olay = self.layout.output()
        isz = self.acc_dtype.itemsize
        return all(ly.dtype == self.acc_dtype for ly in olay.layers) and all(
            bo == eo * isz for bo, eo in zip(olay.byte_offsets, olay.elem_offsets, strict=True)
        )

    def finalize_in_place(self, round: int | None = None) -> memoryview:
        """Divide by Σn in place and write a ``model`` header in front: the live accumulator
        becomes the packed model payload (no second model-sized buffer). Folds are refused
        (:attr:`model_held`) until :meth:`release_model`; the next fold then starts a new sum."""
        if self.count == 0 or self.n == 0:
            raise ValueError("nothing folded: no model to finalize")
        if not self.can_finalize_in_place():
            raise ValueError("the model's layout differs from the accumulator's: finalize(out=)")
        if not self.divided:  # else the last fold pass divided already
            passes.divide_in_place(
                self.value, self.acc_dtype.type(self.n), self.threads, self.chunk
            )
        buf = self.buffers[self._live]
        write_header(buf, Header("model", self.n, self.layout.output(), round=round), self.reserve)
        self.model_held = True
        return buf[: self.reserve + self.total * self.acc_dtype.itemsize]

    def release_model(self) -> None:
        """The broadcast of the model held in place is over: the buffer may be written again."""
        self.model_held = False
        self.count = 0
        self.n = 0
        self.divided = False

    def partial(self, round: int | None = None) -> memoryview:
        """The live accumulator as a packed ``partial`` payload, in place (no copy of the data):
        the header is written into the reserved bytes in front of it."""
        if self.count == 0:
            raise ValueError("nothing folded yet: no partial to emit")
        if self.divided:
            raise ValueError("the sum was divided in place: it is a model, not a partial")
        buf = self.buffers[self._live]
        h = Header("partial", self.n, self.layout, round=round, acc=self.acc_dtype)
        write_header(buf, h, data_off=self.reserve)
        return buf[: self.reserve + self.total * self.acc_dtype.itemsize]

    def finalize(self, out: Any | None = None) -> list[tuple[str, np.ndarray]]:
        """Divide by Σn into the output structure (float layers keep their dtype).

        ``out`` is an optional data region laid out as ``layout.output()`` (e.g. a model payload
        in a slot); otherwise fresh arrays are allocated."""
        if self.count == 0 or self.n == 0:
            raise ValueError("nothing folded: no model to finalize")
        if self.divided:
            raise ValueError("the sum was divided in place: use finalize_in_place()")
        olay = self.layout.output()
        acc = self.value
        res = []
        denom = self.acc_dtype.type(self.n)
        for ly, bo, eo in zip(olay.layers, olay.byte_offsets, olay.elem_offsets, strict=True):
            if out is not None:
                dst = np.frombuffer(out, dtype=ly.dtype, count=ly.size, offset=bo)
            else:
                dst = np.empty(ly.size, dtype=ly.dtype)
            if ly.size:
                np.divide(acc[eo : eo + ly.size], denom, out=dst, casting="same_kind")
            res.append((ly.name, dst.reshape(ly.shape)))
        return res
