"""Slot trimming policy: recorded by the creator, followed by attachers; prefault."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import DEFAULT_TRIM_THRESHOLD, TRIM_OFF

CLASSES = [(4096, 4), (1 << 20, 2)]


def _name() -> str:
    return f"hearth-test-{uuid.uuid4().hex[:10]}"


def _blocks(p: SlotPool) -> int:
    return os.stat(p.path).st_blocks * 512


def _fill_and_release(p: SlotPool) -> None:
    s = p.alloc(1 << 20)
    np.frombuffer(s.buf, np.uint8)[:] = 7
    s.release()


@pytest.mark.parametrize("trim, kept", [(1 << 20, False), (TRIM_OFF, True)])
def test_attacher_follows_the_creators_trim_threshold(trim, kept):
    p = SlotPool.create(_name(), CLASSES, trim_threshold=trim)
    try:
        q = SlotPool.attach(p.name)  # what an instance does; it releases the slots it received
        assert q.trim_threshold == trim
        _fill_and_release(q)
        assert (_blocks(p) >= 1 << 20) == kept
        s = p.alloc(1 << 20)  # the same slot comes back: pages kept (old bytes) or zeroed
        assert int(np.frombuffer(s.buf, np.uint8)[0]) == (7 if kept else 0)
        s.release()
        q.close()
    finally:
        p.destroy()


def test_env_sets_the_threshold_and_old_segments_default(monkeypatch):
    monkeypatch.setenv("HEARTH_POOL_TRIM", "off")
    p = SlotPool.create(_name(), CLASSES)
    try:
        assert p.trim_threshold == TRIM_OFF
        assert SlotPool.attach(p.name, trim_threshold=4096).trim_threshold == 4096  # explicit wins
        p._mm[1024:1032] = bytes(8)  # a segment made before the threshold was recorded
        assert SlotPool.attach(p.name).trim_threshold == DEFAULT_TRIM_THRESHOLD
    finally:
        p.destroy()
    monkeypatch.setenv("HEARTH_POOL_TRIM", "lots")
    with pytest.raises(ValueError, match="HEARTH_POOL_TRIM"):
        SlotPool.create(_name(), CLASSES)


def test_prefault_populates_free_large_slots_only():
    p = SlotPool.create(_name(), CLASSES, trim_threshold=TRIM_OFF)
    try:
        used = p.alloc(1 << 20)
        assert p.prefault(1 << 20) == 1 << 20  # the other 1 MiB slot; the used one is skipped
        assert (1 << 20) <= _blocks(p) < (1 << 20) + (64 << 10)
        s = p.alloc(1 << 20)
        assert not np.frombuffer(s.buf, np.uint8).any()  # contents untouched (zeros)
        s.release()
        used.release()
    finally:
        p.destroy()
