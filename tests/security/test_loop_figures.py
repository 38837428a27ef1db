"""The serving process's own figures of what stalls it: each collection timed by generation
(`GcPauses`, `hearth_gc_pause_seconds`) and each lag-timer tick's lateness
(`LoopLag.on_lag`, `hearth_loop_lag_seconds`), on the node's /metrics."""

from __future__ import annotations

import asyncio
import gc
import time

from hearth.gateway.heap import GcPauses
from hearth.gateway.shed import LoopLag
from hearth.metrics import Metrics
from prometheus_client import generate_latest


def test_every_collection_is_timed_by_generation_until_uninstalled() -> None:
    m = Metrics()
    seen: list[tuple[int, float]] = []

    def observe(gen: int, s: float) -> None:
        seen.append((gen, s))
        m.gc_pause.labels(str(gen)).observe(s)

    pauses = GcPauses(observe).install()
    try:
        pauses.install()  # twice: still one callback
        assert gc.callbacks.count(pauses) == 1
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert pauses not in gc.callbacks
    assert [g for g, _ in seen][-2:] == [0, 2] and all(s >= 0 for _, s in seen)
    n = len(seen)
    gc.collect(1)
    assert len(seen) == n  # uninstalled: no more
    text = generate_latest(m.registry).decode()
    assert 'hearth_gc_pause_seconds_count{generation="2"} 1.0' in text


async def test_a_stalled_loop_shows_in_the_lag_figures() -> None:
    m = Metrics()
    lag = LoopLag(0.05)  # a tick every 5 ms
    lag.on_lag = m.loop_lag.observe
    lag.start()
    try:
        await asyncio.sleep(0.05)  # on time: ticks run
        time.sleep(0.2)  # the loop stalls: the tick due now runs >= 0.15 s late
        await asyncio.sleep(0.02)
    finally:
        lag.stop()
    text = generate_latest(m.registry).decode()
    count = next(ln for ln in text.splitlines() if ln.startswith("hearth_loop_lag_seconds_count"))
    le_100ms = next(ln for ln in text.splitlines() if 'le="0.1"' in ln)
    assert float(count.split()[-1]) >= 3
    # at least one tick later than 100 ms: the count exceeds the bucket at 0.1 s
    assert float(count.split()[-1]) - float(le_100ms.split()[-1]) >= 1


def test_shedding_off_runs_no_timer_and_observes_nothing() -> None:
    lag = LoopLag(None)
    seen: list[float] = []
    lag.on_lag = seen.append
    lag.start()
    assert not lag.running and seen == []
