"""What a serving process (`hearth up`: a node, or the front gateway) does to itself: raise its
descriptor limit, take its start-up heap out of the collector's reach, and wait for a signal.
Apart from `up.py` so the front's process does not import the node's parts to get them."""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass

from hearth.gateway.heap import HeapCollector, tune


class StartupError(RuntimeError):
    pass


def cannot_listen(host: str, port: int, e: OSError) -> StartupError:
    """The node's or the front's start failing on its gateway's address, said in one line; a
    taken port says what to do: the CLI finds the gateway by HEARTH_PORT (default 8080), so a
    node moved with --port alone is one its commands cannot reach."""
    hint = ""
    if e.errno == errno.EADDRINUSE:
        hint = " (another `hearth up`? pick a free port: --port N, and HEARTH_PORT=N for the CLI)"
    return StartupError(f"cannot listen on {host}:{port}: {e.strerror}{hint}")


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
#: the ceiling taken for a hard limit reported as infinite: Linux's default fs.nr_open (2^20).
#: Linux never reports one for RLIMIT_NOFILE (setrlimit refuses a value above fs.nr_open), and
#: an infinite soft limit is refused too, so a finite value is always set.
NOFILE_CEILING = 1 << 20


@dataclass(frozen=True)
class FdPlan:
    """What a serving process runs with: `soft` is the soft RLIMIT_NOFILE to set; `max_joined`
    the join connections its node agent allows (None: a front gateway); `warning` says why it
    is lower than HEARTH_MAX_JOINED asked; `bound_by`, what sets that bound (a refused join
    names it: the setting, or the descriptor limit that lowered it)."""

    soft: int
    max_joined: int | None
    warning: str | None = None
    bound_by: str = "HEARTH_MAX_JOINED"


def fd_plan(
    soft: int, hard: int, max_joined: int | None, pods: bool = False, infinity: int = -1
) -> FdPlan:
    """The soft RLIMIT_NOFILE is raised to the hard limit (every open client connection is a
    descriptor: thousands of idle clients then meet the gateway's own limits, 429/408, rather
    than EMFILE). Each join connection is a descriptor too, and a join past the limit failed
    with EMFILE instead of `join_limit`: a node agent keeps room for `max_joined`
    (HEARTH_MAX_JOINED) of them besides `AGENT_OWN_FDS` of its own. Where that does not fit,
    a node whose instances are pods (`pods`: HEARTH_INSTANCES=pods) cannot serve without
    them: StartupError naming the numbers. Any other node starts no pod itself and rarely
    sees one join: it runs, with the join bound lowered to what fits and a warning saying so
    (a node under `ulimit -Hn 1024` then refuses every join with `join_limit`)."""
    if hard == infinity:
        hard = NOFILE_CEILING
    if max_joined is None:
        return FdPlan(hard, None)
    need = max_joined + AGENT_OWN_FDS
    if hard >= need:
        return FdPlan(hard, max_joined)
    short = (
        f"HEARTH_MAX_JOINED={max_joined} join connections and {AGENT_OWN_FDS} descriptors of "
        f"the node agent's own need {need} open files, but the hard RLIMIT_NOFILE is {hard}"
    )
    if pods:
        raise StartupError(
            f"{short}: raise it (ulimit -Hn, a container's nofile limit) or lower HEARTH_MAX_JOINED"
        )
    fits = max(hard - AGENT_OWN_FDS, 0)
    return FdPlan(
        hard,
        fits,
        f"{short}: at most {fits} join connections at once on this node (raise the hard "
        "limit for more)",
        f"the hard RLIMIT_NOFILE of {hard}, less {AGENT_OWN_FDS} descriptors of its own; "
        f"HEARTH_MAX_JOINED={max_joined} does not fit",
    )


def raise_fd_limit(max_joined: int | None = None, pods: bool = False) -> FdPlan:
    """Set the soft descriptor limit `fd_plan` decides (a node agent passes `max_joined` and
    whether its instances are pods) and log its warning; the plan, for its join bound."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = fd_plan(soft, hard, max_joined, pods, resource.RLIM_INFINITY)
    if plan.warning:
        logging.getLogger("hearth.process").warning("%s", plan.warning)
    if plan.soft != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft, hard))
    return plan


async def until_signal() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
