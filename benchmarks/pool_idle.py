"""Warm-pool starts after a realistic idle, for the cold-start benchmark.

The benchmark's own pool starts (`warm_pool_ms`) come one round of its loop apart: each pool
instance is refilled right after the start before it and waits 170-230 ms start to start
(8 Dec 2026: docs/runs/2026-12-08/floor6-probe-period.log). A pool instance in real use waits
seconds or minutes for its start, and 0.8 s more idle before each start read 5.3-7.8 ms against
3.0 beside it (8 Dec 2026, 01:03, the host in its slow state: floor6-probe-*.log). So this adds
a second set of starts, right after the benchmark's (the same host state, seconds apart,
and the benchmark's own starts keep their history), whose pool instance has been idle
for `idle_s` (2 s with --quick, 5 s without) before its start:

  idle pool start   deploy a never-run function, poll the node's status until it shows a ready
                    pool instance (every 10 ms: the refill after the start before), then nothing
                    (no request, no poll) until `idle_s` after that poll's answer, then the
                    same timed request as the benchmark's pool starts (`timed_call`); only
                    starts the cold-start records mark `from_pool` count
  idle              measured, not assumed: the request's first write - the answer of the first
                    status poll that showed the instance ready (at least its idle: the ready
                    report came before that answer, and after the send of the poll before it,
                    `bracket_ms` earlier at most)
  idle floor        the pool floor (pool_floor.py) after the same idle: one sample, then
                    `idle_s` with nothing sent to the floor's processes, then the sample that
                    counts; after the host wake samples, so neither set delays the other's idle

`--idle-s 0` is the control: the same procedure with no idle read 1.41-2.24 ms against 1.66-2.51
beside it (8 Dec 2026: docs/runs/2026-12-08/idle6-ctl0-*.log), 2.0 s 2.21-4.44 against 1.78-2.08
with nothing else on the machine and 6.9-14.6 against 2.0-3.1 with other work on it
(idle6-cs-*.log): the difference is the idle's, not the procedure's.

Nothing is sent to a pool instance while it waits (the agent sends its instances no pings; its
decision core refills the pool only when an instance leaves it, and stops only functions'
instances, after their keep-alive of 60 s; a waiting pool instance switched 0 times in 5 s:
idle6-pool-instance-idle.log), so the idle is what a waiting pool instance sees.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

QUICK = (2.0, 4)  # idle_s, samples with --quick
FULL = (5.0, 6)
POLL_S = 0.01  # the status poll's period while a pool instance is being refilled
LEGEND = (
    "warm_pool_idle_ms: pool starts whose instance waited warm_pool_idle_s (its ready report -> "
    "the request's write, measured), as in real use; warm_pool_ms's start soon after it (the "
    "loop's ~0.2 s period); pool_floor_idle_ms: the floor after the same idle"
)


class Poll(NamedTuple):
    sent: float  # epoch s, before the status request
    answered: float  # epoch s, its answer read
    ready: bool  # it showed a ready pool instance


class ReadySeen(NamedTuple):
    """When a pool instance's ready report reached the node, as the status polls bracket it."""

    after: float | None  # the send of the last poll that showed none ready (None: the first did)
    by: float  # the answer of the first poll that showed it ready


def bracket(polls: list[Poll]) -> ReadySeen:
    """The ready moment's bracket from the polls (in order, the last one ready)."""
    if not polls or not polls[-1].ready:
        raise ValueError("no poll showed a ready pool instance")
    before = [p.sent for p in polls if not p.ready]
    return ReadySeen(before[-1] if before else None, polls[-1].answered)


def wait_ready(is_ready: Callable[[], bool], timeout: float = 60) -> ReadySeen:
    """Polls `is_ready` every POLL_S until it is true; the bracket of the moment it became so."""
    polls: list[Poll] = []
    end = time.monotonic() + timeout
    while True:
        sent = time.time()
        ready = is_ready()
        polls.append(Poll(sent, time.time(), ready))
        if ready:
            return bracket(polls)
        if time.monotonic() > end:
            raise RuntimeError("the warm pool did not refill")
        time.sleep(POLL_S)


class IdleStart(NamedTuple):
    name: str
    first_ms: float  # the request's write -> the handler's first line
    wrote: float  # the request's first write, epoch s
    idle_s: float  # the request's write - the ready instance's first sighting (at least)
    bracket_ms: float | None  # how much earlier the ready report may have come (None: unknown)


def idle_start(
    name: str,
    is_ready: Callable[[], bool],
    call: Callable[[], tuple[float, float]],
    idle_s: float,
) -> IdleStart:
    """One start of `name` (deployed) after its pool instance has waited `idle_s`: `call()` is
    the timed request, giving (ms to the first line, its first write's epoch s)."""
    seen = wait_ready(is_ready)
    time.sleep(max(0.0, seen.by + idle_s - time.time()))
    first_ms, wrote = call()
    return IdleStart(
        name,
        first_ms,
        wrote,
        wrote - seen.by,
        None if seen.after is None else (seen.by - seen.after) * 1000,
    )


def idle_starts(
    node: Any,
    n: int,
    idle_s: float,
    spec_of: Callable[[int], tuple[dict, bytes, str]],
    timed_call: Callable[[Any, str, bytes, str], Any],
    records: Callable[[Any, list[str]], dict[str, dict]],
) -> tuple[list[IdleStart], dict[str, dict]]:
    """n idle starts on `node` (a LocalNode with a warm pool), with cold_start.py's parts:
    `spec_of(k)` the k-th one's spec and request (deployed here), `timed_call` its timed
    request, `records` the cold-start records (given with the starts, by function name)."""

    def ready() -> bool:
        return node.client.status().get("warm_pool_ready", 0) >= 1

    out = []
    for k in range(n):
        spec, body, ctype = spec_of(k)
        node.client.deploy(spec)

        def call(name: str = spec["name"], body: bytes = body, ctype: str = ctype) -> tuple:
            got = timed_call(node, name, body, ctype)
            return got.first_ms, got.t - got.first_ms / 1000  # ms, the first write (epoch s)

        out.append(idle_start(spec["name"], ready, call, idle_s))
    return out, records(node, [s.name for s in out])


def floor_idle_samples(call: Callable[[], float], n: int, idle_s: float) -> list[float]:
    """n floor samples (ms), each after `idle_s` with nothing sent to the floor's processes; a
    first call, not kept, starts the first one's idle (they may have waited longer before)."""
    call()
    out = []
    for _ in range(n):
        time.sleep(idle_s)
        out.append(call())
    return out


def _med(xs: list[float], nd: int = 2) -> float:
    return round(statistics.median(xs), nd) if xs else float("nan")


# where a pool start went (the idle starts', and the paired starts' of --rev): the client's
# write, the agent's start request, the spec sent, the instance's import start and end, its
# ready stamp, the handler's first line (all on the wall clock of one machine)
STEPS = (
    "client_to_agent",
    "agent_to_spec_sent",
    "spec_to_import",
    "import",
    "imported_to_ready",
    "ready_to_first_line",
)


def step_times(wrote: float, first_ms: float, rec: dict) -> list[float]:
    """One pool start's `STEPS`, in ms: the request's write (epoch s), ms from it to the
    handler's first line, and its cold-start record. Shared with the paired starts (--rev)."""
    p = rec["phases"]
    t = [wrote, p["requested"], p["spawned"], p["process_started"], p["code_imported"]]
    t += [p["ready"], wrote + first_ms / 1000]
    return [(y - x) * 1000 for x, y in zip(t, t[1:], strict=False)]


def steps(starts: list[tuple[float, float, dict | None]]) -> dict[str, float]:
    """Median ms of each step over the starts that came from the pool: (the request's write,
    ms to the first line, its cold-start record)."""
    out: dict[str, list[float]] = {s: [] for s in STEPS}
    for wrote, first_ms, rec in starts:
        if rec and rec["from_pool"]:
            for s, x in zip(STEPS, step_times(wrote, first_ms, rec), strict=True):
                out[s].append(x)
    return {s: _med(v, 3) for s, v in out.items()}


def figures(
    starts: list[IdleStart],
    records: dict[str, dict],
    short: list[tuple[float, float, dict | None]],
    warm_pool_ms: float,
    floor_ms: float,
    floor_idle: list[float],
) -> dict[str, object]:
    """The benchmark's fields for the idle starts (`records`: their cold-start records, by name;
    a start they do not mark `from_pool` is no pool start and does not count), with where the
    idle starts and the benchmark's own (`short`: see `steps`) went, step by step."""
    kept = [s for s in starts if records.get(s.name, {}).get("from_pool")]
    brackets = [s.bracket_ms for s in kept if s.bracket_ms is not None]
    fig: dict[str, object] = {
        "warm_pool_idle_ms": _med([s.first_ms for s in kept]),
        "warm_pool_idle_samples": [round(s.first_ms, 2) for s in kept],  # ms, in order
        "warm_pool_idle_s": _med([s.idle_s for s in kept], 3),
        "warm_pool_idle_bracket_ms": _med(brackets, 1),
        "warm_pool_idle_from_pool": f"{len(kept)}/{len(starts)}",
        "pool_floor_idle_ms": _med(floor_idle),
        "pool_floor_idle_samples": [round(x, 2) for x in floor_idle],
    }
    fig["ratio_warm_pool_idle_vs_short"] = round(fig["warm_pool_idle_ms"] / warm_pool_ms, 2)
    fig["ratio_pool_floor_idle_vs_short"] = round(fig["pool_floor_idle_ms"] / floor_ms, 2)
    fig["warm_pool_idle_steps"] = steps([(s.wrote, s.first_ms, records.get(s.name)) for s in kept])
    fig["warm_pool_short_steps"] = steps(short)
    return fig
