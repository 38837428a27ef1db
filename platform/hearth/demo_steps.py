"""The demo's console lines (`Step`) and its bounded waits for a node's zygotes, each said on a
line of its own: the deploy's (the demo functions' preload lists) before the first calls, the
built-in functions' before the FL round."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console

from hearth.agent.zygote import BUILTINS_KEY, POOL_RUNTIME, zygote_plan
from hearth.agent.zygote_server import START_TIMEOUT_S
from hearth.spec import FunctionSpec

# how long a step waits for a zygote: the zygote's own start timeout
ZYGOTE_READY_S = START_TIMEOUT_S


class Step:
    def __init__(self, console: Console):
        self.console = console
        self.rows: list[tuple[str, str, str]] = []

    def ok(self, what: str, result: str, ms: float | None = None) -> None:
        self.rows.append((what, result, f"{ms:.1f}" if ms is not None else ""))
        self.console.print(
            f"  [green]✓[/] {what}: {result}"
            + (f"  [dim]({ms:.1f} ms)[/]" if ms is not None else "")
        )


def zygote_ready(
    c: Any, steps: Step, key: str, what: str, why: str, timeout_s: float = ZYGOTE_READY_S
) -> None:
    """Wait (bounded, said on the console) until the node reports zygote `key` ready, so the
    next step's first start is a fork of it and the zygote's own start (its imports) shows on
    a line of its own instead of inside that start's scheduling phase. `why` says what takes
    the time. Past `timeout_s`, or if the zygote failed, the demo goes on: its starts then take
    the warm pool or a new process. Nothing to wait for on a node without zygotes
    (HEARTH_RUNNER=process)."""
    t0 = time.perf_counter()
    status = c.status()
    if status.get("runner") != "zygote":
        return
    state = status["zygotes"].get(key, {}).get("state", "gone")
    if state == "ready":
        steps.ok(what, "ready", 0.0)
        return
    steps.console.print(f"  waiting for the {what} ({why}) to be ready, at most {timeout_s:g} s …")
    while state == "starting" and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.05)
        state = c.status()["zygotes"].get(key, {}).get("state", "gone")
    ms = (time.perf_counter() - t0) * 1000
    if state == "ready":
        steps.ok(what, "ready", ms)
    else:
        steps.console.print(
            f"  [yellow]![/] {what} {state} after {ms / 1000:.1f} s: the demo goes on, its"
            " instances start without it"
        )


def zygotes_ready(c: Any, steps: Step, specs: Iterable[FunctionSpec]) -> None:
    """Each zygote a deploy of `specs` started for their preload lists, in turn: the first
    calls then start as a user's do on a node that has been up a moment (a fork of a zygote)."""
    plans = {zygote_plan(spec)[:2] for spec in specs}
    for key, mods in sorted(plans):
        if key not in (POOL_RUNTIME, BUILTINS_KEY):
            why = f"imports {', '.join(mods)} once for the instances it forks"
            zygote_ready(c, steps, key, f"zygote for {', '.join(mods)}", why)


def builtins_zygote_ready(c: Any, steps: Step, timeout_s: float = ZYGOTE_READY_S) -> None:
    """The FL step's wait: on a machine's first run the built-ins' zygote compiles FedAvg's
    numba kernels (22.3 s, docs/platform.md), which the round would otherwise count as its
    first aggregator's start."""
    why = "numpy, vecsearch, FedAvg's numba kernels; compiled on a first run"
    zygote_ready(c, steps, BUILTINS_KEY, "built-in functions' zygote", why, timeout_s)
