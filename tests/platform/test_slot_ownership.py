"""A slot sent to a receiver that died before adopting it is freed by its sender; one the
receiver adopted is left to reclaim_dead (the receiver may still be using it)."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid

from hearth.dataplane.shm import SlotPool


def _adopt(name: str, slot: int, gen: int) -> None:
    p = SlotPool.attach(name)
    p.adopt(slot, gen)
    p.close()


def test_release_if_owner():
    pool = SlotPool.create(f"hearth-own-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        s = pool.alloc(100)
        assert pool.release_if_owner(s.index, s.gen) is True  # never adopted: freed
        assert pool.release_if_owner(s.index, s.gen) is False  # stale now: nothing to do
        s2 = pool.alloc(100)
        p = mp.get_context("spawn").Process(target=_adopt, args=(pool.name, s2.index, s2.gen))
        p.start()
        p.join(30)
        assert pool.release_if_owner(s2.index, s2.gen) is False  # adopted by another process
        assert pool.reclaim_dead() == 1  # ... which exited: reclaimed as a dead owner's slot
    finally:
        pool.destroy()
