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


#: descriptors a node agent's process keeps room for besides its join connections: its local
#: instances' pipes and sockets, Redis, the proxy daemon, the gateway's listener and clients
AGENT_OWN_FDS = 1024


def fd_limit(soft: int, hard: int, max_joined: int | None, infinity: int = -1) -> int:
    """The soft RLIMIT_NOFILE to run with: the hard limit (every open client connection is a
    descriptor: thousands of idle clients then meet the gateway's own limits, 429/408, rather
    than EMFILE). A node agent (`max_joined`: HEARTH_MAX_JOINED) must have room for that many
    join connections and `AGENT_OWN_FDS` of its own, else a join past the limit fails with
    EMFILE instead of `join_limit`: StartupError naming both numbers then."""
    need = (max_joined or 0) + AGENT_OWN_FDS
    if hard == infinity:  # (the kernel caps it: never set the soft limit to infinity)
        return max(soft, need) if max_joined is not None else soft
    if max_joined is not None and hard < need:
        raise StartupError(
            f"HEARTH_MAX_JOINED={max_joined} join connections and {AGENT_OWN_FDS} descriptors of "
            f"the node agent's own need {need} open files, but the hard RLIMIT_NOFILE is {hard}: "
            "raise it (ulimit -Hn, a container's nofile limit) or lower HEARTH_MAX_JOINED"
        )
    return hard


def raise_fd_limit(max_joined: int | None = None) -> None:
    """Set the soft descriptor limit `fd_limit` decides (a node agent passes `max_joined`)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = fd_limit(soft, hard, max_joined, resource.RLIM_INFINITY)
    if want != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def until_signal() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
