"""What a serving process (`hearth up`: a node, or the front gateway) does to itself: raise its
descriptor limit, take its start-up heap out of the collector's reach, and wait for a signal.
Apart from `up.py` so the front's process does not import the node's parts to get them."""

from __future__ import annotations

import asyncio

from hearth.gateway.heap import HeapCollector, tune


class StartupError(RuntimeError):
    pass


def freeze_heap() -> None:
    """Move everything allocated while starting (modules, the agent) out of the collector's
    reach, so a full collection walks only what was allocated since. Why: under overload a full
    collection ran about every second, each pausing the gateway's loop for 0.1-0.5 s (replay at
    2,000/s, 2026-12-06), and the backlog of each pause made clients open more connections,
    which made the next pause longer still."""
    import gc

    gc.collect()
    gc.freeze()
    tune()  # full collections by a HeapCollector, not while the loop is behind (gateway.heap)


def collect_heap() -> HeapCollector:
    """Start the process's `HeapCollector` (after `freeze_heap`, on the running loop)."""
    collector = HeapCollector()
    collector.start()
    return collector


def raise_fd_limit() -> None:
    """Every open client connection is a descriptor: use the hard limit, so thousands of idle
    clients meet the gateway's own limits (429/408) rather than EMFILE."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def until_signal() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
