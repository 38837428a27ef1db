"""The gateway process's full collections (`hearth.gateway.heap`): never automatic, run by a
timer while the event loop is on time, and at least every FULL_AT_MOST_S however late it is."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from hearth.gateway import heap


def test_full_collections_wait_for_an_on_time_loop_but_not_for_ever():
    due = heap.full_collection_due
    assert not due(heap.FULL_EVERY_S - 0.1, 0.0)  # too soon after the last one
    assert due(heap.FULL_EVERY_S, 0.0)  # on time, and time for one
    assert not due(heap.FULL_EVERY_S * 5, heap.LATE_S * 2)  # the loop is behind: not now
    assert due(heap.FULL_AT_MOST_S, 10.0)  # ...unless the last one is too long ago
    assert due(heap.FULL_EVERY_S, heap.LATE_S)  # the limit itself is still on time


def test_tune_turns_only_the_automatic_full_collection_off():
    before = gc.get_threshold()
    try:
        heap.tune()
        assert gc.get_threshold() == (before[0], before[1], heap.NEVER)
    finally:
        gc.set_threshold(*before)


async def test_the_collector_runs_full_collections_only_while_the_loop_is_on_time(monkeypatch):
    """Real collections, counted with `gc.callbacks`: several while the loop is idle; none while
    every loop turn blocks twice LATE_S (the loop behind, as under overload)."""
    monkeypatch.setattr(heap, "CHECK_S", 0.01)
    monkeypatch.setattr(heap, "FULL_EVERY_S", 0.02)
    full: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(1)

    gc.callbacks.append(seen)
    collector = heap.HeapCollector()
    collector.start()

    async def until(ok) -> None:  # polled: a loaded machine may make a few ticks late
        for _ in range(500):
            if ok():
                return
            await asyncio.sleep(0.01)

    try:
        await until(lambda: collector.collections >= 3)  # idle: on time
        assert collector.collections >= 3 and len(full) >= 3, (collector.collections, full)
        n = collector.collections
        hog_until = time.monotonic() + 0.6
        while time.monotonic() < hog_until:  # every turn 2x LATE_S late
            time.sleep(2 * heap.LATE_S)
            await asyncio.sleep(0)
        assert collector.collections == n  # none while behind
        await until(lambda: collector.collections > n)
        assert collector.collections > n  # on time again: collected again
    finally:
        collector.stop()
        gc.callbacks.remove(seen)


@pytest.mark.parametrize("since", [heap.FULL_AT_MOST_S, heap.FULL_AT_MOST_S * 2])
def test_a_loop_behind_for_ever_still_collects(since):
    assert heap.full_collection_due(since, 1e9)
