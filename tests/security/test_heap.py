"""The gateway process's garbage collection (`hearth.gateway.heap`): no automatic full
collection; the young generations collected only while the event loop is on time; a full
collection once the loop has been calm, and at least every FULL_AT_MOST_S however late it is."""

from __future__ import annotations

import asyncio
import gc
import time

from hearth.gateway import heap


def test_collections_wait_for_a_calm_loop_but_not_for_ever():
    late, on_time = heap.LATE_S * 2, heap.LATE_S  # the limit itself is on time
    st = heap.HeapState(last_full=0.0)
    d = heap.decide(st, 1.0, on_time)
    assert d == heap.Decision(young=True, full=False)  # too soon after the last full one
    d = heap.decide(st, heap.FULL_EVERY_S, late)
    assert d == heap.Decision(young=False, full=False)  # behind: nothing collected
    t = heap.FULL_EVERY_S + 1
    assert heap.decide(st, t, on_time) == heap.Decision(young=True, full=False)  # not calm yet
    assert heap.decide(st, t + heap.CALM_S, on_time).full  # calm for CALM_S, and due
    st = heap.HeapState(last_full=0.0)
    assert not heap.decide(st, heap.FULL_AT_MOST_S - 1, late).full
    d = heap.decide(st, heap.FULL_AT_MOST_S, late)
    assert d == heap.Decision(young=False, full=True)  # behind for ever: still collected


def test_tune_turns_only_the_automatic_full_collection_off():
    before = gc.get_threshold()
    try:
        heap.tune()
        assert gc.get_threshold() == (before[0], before[1], heap.NEVER)
    finally:
        gc.set_threshold(*before)


async def test_the_collector_collects_only_while_the_loop_is_on_time(monkeypatch):
    """Real collections, counted with `gc.callbacks`: full ones while the loop is idle; none,
    and no automatic young ones either, while every loop turn blocks twice LATE_S (the loop
    behind, as under overload) and garbage cycles pile up; both again once it is on time."""
    monkeypatch.setattr(heap, "CHECK_S", 0.01)
    monkeypatch.setattr(heap, "FULL_EVERY_S", 0.02)
    monkeypatch.setattr(heap, "CALM_S", 0.03)
    seen: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "stop":
            seen.append(info["generation"])

    async def until(ok) -> None:  # polled: a loaded machine may make a few ticks late
        for _ in range(500):
            if ok():
                return
            await asyncio.sleep(0.01)

    gc.callbacks.append(count)
    collector = heap.HeapCollector()
    collector.start()
    try:
        await until(lambda: collector.collections >= 3)  # idle: on time
        assert collector.collections >= 3 and seen.count(2) >= 3, (collector.collections, seen)
        n, hog_until = collector.collections, time.monotonic() + 0.6
        time.sleep(2 * heap.LATE_S)
        for _ in range(3):  # the tick runs late: collection off from now on
            await asyncio.sleep(0)
        assert not gc.isenabled()
        del seen[:]
        while time.monotonic() < hog_until:  # every turn 2x LATE_S late, cycles piling up
            for _ in range(5000):
                a: list = []
                a.append(a)
            time.sleep(2 * heap.LATE_S)
            await asyncio.sleep(0)
        assert seen == [] and collector.collections == n and not gc.isenabled()
        assert collector.paused >= 1
        await until(lambda: collector.collections > n)
        assert collector.collections > n and gc.isenabled()  # on time again: collected again
    finally:
        collector.stop()
        gc.callbacks.remove(count)
    assert gc.isenabled()
