"""Replay accuracy: 2,000 invocations/s for 60 s (``--quick``: 15 s), open loop.

Side by side in one run, against the same no-op target:
* ``precise/raw``: Hearth's driver (sleep, yield, spin the last ~200 us; keep-alive raw
  HTTP/1.1 client);
* ``precise/aiohttp``: same pacing, aiohttp's client (the sender cost baseline);
* ``sleep/raw``: pacing with ``asyncio.sleep`` only (what a simple loader does).

Target: a bare aiohttp no-op server started here on loopback, in its own process (the
baseline); ``--hearth``: a private Hearth started here with the replay workload deployed as
the no-op function (duration 0); or ``--url`` (a running gateway; ``--function``).
Prints achieved rate, lag p50/p99/max per run; the last line is one JSON object.
Targets: achieved rate within 1% of planned, lag p99 <= 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

SERVER = r"""
import asyncio, sys
from aiohttp import web
async def invoke(request):
    await request.read()
    return web.Response(body=b"{}", content_type="application/json",
                        headers={"X-Hearth-Cold": "0", "X-Hearth-Instance": "noop-1"})
async def main():
    app = web.Application()
    app.router.add_post("/v1/functions/{tail}", invoke)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def start_noop_server() -> tuple[str, subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().strip())
    return f"http://127.0.0.1:{port}", proc


# --- LEAD HOOK --------------------------------------------------------------------------------
def start_hearth_gateway() -> tuple[str, object] | None:
    """Start a private Hearth (`hearth up` on a free port, own state dir, unix data plane),
    deploy the replay workload as the no-op target (duration 0) and return (base_url, handle).
    Returns None if it does not come up. The lead may replace this with the demo's fixture."""
    import os
    import socket
    import tempfile
    import urllib.request
    from pathlib import Path

    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    state = tempfile.mkdtemp(prefix="hearth-bench-")
    env = dict(os.environ, HEARTH_STATE_DIR=state, HEARTH_PORT=str(port), HEARTH_DATAPLANE="unix")
    hearth = [sys.executable, "-m", "hearth.cli"]
    log = open(Path(state) / "up.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [*hearth, "up", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        time.sleep(0.5)
        if proc.poll() is not None:
            return None
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            break
        except OSError:
            continue
    else:
        proc.terminate()
        return None
    spec = (
        Path(__file__).resolve().parents[1]
        / "functions"
        / "replay"
        / "specs"
        / "replay-workload.yaml"
    )
    r = subprocess.run([*hearth, "deploy", str(spec)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"hearth deploy failed: {r.stderr.strip()}", file=sys.stderr)
        proc.terminate()
        return None
    # warm up: the first invocation pays the cold start; measure the steady state only
    req = urllib.request.Request(
        url + "/v1/functions/replay-workload:invoke",
        data=b'{"duration_ms": 0}',
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    for _ in range(60):
        try:
            urllib.request.urlopen(req, timeout=60).read()
            break
        except OSError:
            time.sleep(1)
    return url, proc


# ----------------------------------------------------------------------------------------------


def run_one(
    url: str, rate: float, seconds: float, pacing: str, function: str, client: str, records=None
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
    res = asyncio.run(D.run_schedule(s.df, cfg))
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
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="15 s per run instead of 60 s")
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--url", default=None, help="target base URL (e.g. a Hearth gateway)")
    ap.add_argument(
        "--function",
        default=None,
        help="function name on the target (default noop; replay-workload with --hearth)",
    )
    ap.add_argument(
        "--hearth",
        action="store_true",
        help="start a private Hearth and replay against it (LEAD HOOK)",
    )
    ap.add_argument(
        "--records", default=None, help="write the precise run's records here (.parquet/.csv)"
    )
    ap.add_argument("--only-precise", action="store_true", help="skip the two baseline runs")
    a = ap.parse_args()
    seconds = a.seconds or (15.0 if a.quick else 60.0)

    proc = None
    target_kind = "url"
    url = a.url
    function = a.function or "noop"
    if url is None and a.hearth:
        hearth = start_hearth_gateway()
        if hearth is None:
            print(
                "error: could not start a Hearth gateway (see the state dir's up.log)",
                file=sys.stderr,
            )
            return 1
        url, proc = hearth
        target_kind = "hearth"
        function = a.function or "replay-workload"
    elif url is None:
        url, proc = start_noop_server()
        target_kind = "aiohttp-noop-loopback"
    time.sleep(0.3)
    try:
        runs = [run_one(url, a.rate, seconds, "precise", function, "raw", a.records)]
        if not a.only_precise:
            runs.append(run_one(url, a.rate, seconds, "precise", function, "aiohttp"))
            runs.append(run_one(url, a.rate, seconds, "sleep", function, "raw"))
    finally:
        if isinstance(proc, subprocess.Popen):
            import os
            import signal

            if target_kind == "hearth":  # hearth up and everything it started
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    p = runs[0]
    for r in runs:
        print(
            f"{r['run']:>16}: planned {r['planned_rate']:.1f}/s achieved {r['achieved_rate']:.1f}/s "
            f"({r['rate_error_pct']:+.2f}%), lag p50 {r['lag_ms_p50']:.3f} ms p99 {r['lag_ms_p99']:.3f} ms "
            f"max {r['lag_ms_max']:.1f} ms, response p50 {r['response_ms_p50']:.2f} ms, failed {r['failed']}"
        )
    out = {
        "benchmark": "replay_accuracy",
        "target": target_kind,
        "rate": a.rate,
        "seconds": seconds,
        "achieved_rate": p["achieved_rate"],
        "rate_error_pct": p["rate_error_pct"],
        "lag_ms_p50": p["lag_ms_p50"],
        "lag_ms_p99": p["lag_ms_p99"],
        "lag_ms_max": p["lag_ms_max"],
        "rate_within_1pct": bool(abs(p["rate_error_pct"]) <= 1.0),
        "lag_p99_le_2ms": bool(p["lag_ms_p99"] <= 2.0),
        "runs": runs,
    }
    if len(runs) > 1 and runs[0]["lag_ms_p99"] > 0:
        out["aiohttp_client_over_raw_lag_p99"] = round(
            runs[1]["lag_ms_p99"] / runs[0]["lag_ms_p99"], 2
        )
        out["sleep_pacing_over_precise_lag_p99"] = round(
            runs[2]["lag_ms_p99"] / runs[0]["lag_ms_p99"], 2
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
