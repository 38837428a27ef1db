"""One replay run: a constant-rate schedule sent open loop by Hearth's replay driver (its pacing
and client as given) at a target, with the sender's own event-loop lag, the server's CPU, the
processes' shares and the node's counters read around it; its figures as one dict."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from replay_processes import cpu_s, node_counters, node_figures, process_shares, sched_snapshot


def run_one(
    url: str,
    rate: float,
    seconds: float,
    pacing: str,
    function: str,
    client: str,
    records=None,
    server_pid: int | None = None,
    node=None,
) -> dict:
    from hearth.functions.replay import driver as D
    from hearth.functions.replay import schedule as SC

    s = SC.constant_rate(rate, seconds, function=function)
    cfg = D.DriverConfig(
        target=url,
        function=function,
        progress=False,
        pacing=pacing,
        client=client,
        max_lag_ms=1e9,
        max_failure_rate=1.0,
        timeout_s=30,
    )
    loop_lag: list[float] = []
    counters0 = node_counters(node) if node is not None else {}
    cpu0 = cpu_s(server_pid)
    sched0 = sched_snapshot(server_pid) if server_pid else {}
    t0 = time.monotonic()
    res = asyncio.run(_with_loop_lag(D.run_schedule(s.df, cfg), loop_lag))
    wall = time.monotonic() - t0
    server_cpu = cpu_s(server_pid) - cpu0
    sched1 = sched_snapshot(server_pid) if server_pid else {}
    counters1 = node_counters(node) if node is not None else {}
    by_status = {  # which answers took the time: served calls, or the back-pressure too
        str(st): round(float(np.percentile(g["totalCost_worker"].to_numpy(), 99)) * 1000, 1)
        for (st,), g in res.records.filter(res.records["sent_s"].is_not_nan()).group_by("status")
    }
    if records:
        D.write_records(res.records, records)
    sm = res.summary
    return {
        "run": f"{pacing}/{client}",
        "invocations": sm["invocations"],
        "failed": sm["failed"],
        "planned_rate": round(float(sm["planned_rate"]), 2),
        "achieved_rate": round(float(sm["achieved_rate"]), 2),
        "rate_error_pct": round(float(sm["rate_error_pct"]), 3),
        "lag_ms_p50": round(sm["lag_ms_p50"], 3),
        "lag_ms_p99": round(sm["lag_ms_p99"], 3),
        "lag_ms_max": round(sm["lag_ms_max"], 3),
        "response_ms_p50": round(sm["response_ms_p50"], 3),
        "response_ms_p99": round(sm["response_ms_p99"], 3),
        "status_counts": sm["status_counts"],
        "response_ms_p99_by_status": by_status,
        "connections_opened": sm.get("connections_opened"),
        # how late the sender's own loop ran a 5 ms timer: a response is timed when this loop
        # gets to it, so this much of every response time can be the sender's, not the server's
        "client_loop_lag_ms_p99": round(float(np.percentile(loop_lag or [0.0], 99)) * 1000, 3),
        # CPU the server's main process (the gateway's loop) spent per request in this run
        "server_cpu_us_per_request": round(1e6 * server_cpu / max(sm["invocations"], 1), 1)
        if server_pid
        else None,
        # per process role (server = the gateway's process, or the bare server): cores, CPU
        # and run-queue wait per request
        "processes": process_shares(sched0, sched1, sm["invocations"], wall)
        if server_pid
        else None,
        # the node's own counters over the run (spins, starts, GC, loop lag): see node_figures
        "node": node_figures(counters0, counters1) if node is not None else None,
    }


TICK_S = 0.005


async def _with_loop_lag(coro, lags: list[float]):
    """Run `coro` while a 5 ms timer records how late the running loop wakes it (seconds)."""

    async def tick() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lags.append(max(0.0, time.perf_counter() - t - TICK_S))

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        return await coro
    finally:
        ticker.cancel()
