"""One data-plane hop: 64-byte descriptor ping-pong between two processes, side by side.

Transports, all measured in this run with the same Python loop shape (send 64 B, read
exactly 64 B back), the ponger in a separate process:

* ``sockmap``      -- Hearth eBPF mode: Endpoint API, the kernel redirects socket-to-socket
* ``sockmap_raw``  -- the same registered sockets driven by the bare loop used for TCP
* ``unix_proxy``   -- Hearth fallback mode: Endpoint API, relayed by the daemon process
* ``unix_direct``  -- a bare AF_UNIX socketpair between the two processes (lower bound)
* ``tcp``          -- a bare loopback TCP connection (TCP_NODELAY)
* ``http``         -- an aiohttp POST of the 64 bytes to an aiohttp server (the sidecar/HTTP hop)

Prints p50/p99 per transport (the median over ``--reps`` rounds, 3 by default, for the sockmap
paths and TCP, interleaved API / bare loop / TCP in each round) and the ratios; the targets are judged through the Endpoint API: p50 <= 1.1 x
the bare sockmap loop and <= 0.8 x loopback TCP. Then one JSON line ending in ``targets`` and
``targets_met``. ``--quick``: 5,000 round trips per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from hearth.dataplane.descriptor import SIZE, Descriptor, Kind
from hearth.dataplane.endpoint import Endpoint, proxy_stats
from hearth.proxies.ebpf import ebpf_unavailable_reason

CTX = mp.get_context("spawn")
FRAME_A = Descriptor(dst=2, src=1, kind=Kind.PING).pack()
FRAME_B = Descriptor(dst=1, src=2, kind=Kind.PONG).pack()


def recv_exact(sock: socket.socket, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < SIZE:
        n = sock.recv_into(view[got:], SIZE - got)
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


# -- pongers (child processes) -----------------------------------------------------------------
def pong_endpoint(path: str, n: int, raw: bool, conn) -> None:
    ep = Endpoint.register(path, 2, reconnect=False)
    if raw:  # the registered data socket driven by the same loop as the TCP baseline
        pong_socket(ep.data_socket, n, conn)
    else:
        conn.send("ready")
        for _ in range(n):
            ep.recv_frame()
            ep.send_frame(FRAME_B)
        conn.recv()
    ep.close()


def pong_socket(sock: socket.socket, n: int, conn) -> None:
    buf = bytearray(SIZE)
    conn.send("ready")
    for _ in range(n):
        recv_exact(sock, buf)
        sock.sendall(FRAME_B)
    conn.recv()


def pong_tcp(port: int, n: int, conn) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pong_socket(s, n, conn)


def http_server(port_conn) -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_conn.send(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


# -- pingers (this process) --------------------------------------------------------------------
def ping_endpoint(ep: Endpoint, n: int, warm: int) -> np.ndarray:
    out = np.empty(n, dtype=np.int64)
    for i in range(-warm, n):
        t = time.perf_counter_ns()
        ep.send_frame(FRAME_A)
        ep.recv_frame()
        if i >= 0:
            out[i] = time.perf_counter_ns() - t
    return out


def ping_socket(sock: socket.socket, n: int, warm: int) -> np.ndarray:
    buf = bytearray(SIZE)
    out = np.empty(n, dtype=np.int64)
    for i in range(-warm, n):
        t = time.perf_counter_ns()
        sock.sendall(FRAME_A)
        recv_exact(sock, buf)
        if i >= 0:
            out[i] = time.perf_counter_ns() - t
    return out


def start_daemon(path: str, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hearth.proxies.daemon", "--socket", path, "--mode", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if "mode=" not in line:
        proc.kill()
        raise RuntimeError(f"proxy daemon ({mode}) did not start")
    return proc


def run_proxy(
    mode: str, n: int, warm: int, tmp: str, raw: bool = False, reps: int = 1, between=None
) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """``reps`` rounds against one daemon, each a fresh ponger through the Endpoint API and,
    with ``raw``, one driving the same registered sockets with the bare loop; ``between()``
    runs after each round (the TCP baseline), so every transport sees the same machine load.
    Returns (API runs, bare runs, the daemon's stats)."""
    path = os.path.join(tmp, f"{mode}.sock")
    daemon = start_daemon(path, mode)
    api: list[np.ndarray] = []
    bare: list[np.ndarray] = []
    try:
        for _ in range(reps):
            for use_raw in (False, True) if raw else (False,):
                parent, child = CTX.Pipe()
                pr = CTX.Process(target=pong_endpoint, args=(path, n + warm, use_raw, child))
                pr.start()
                parent.recv()
                ep = Endpoint.register(path, 1, reconnect=False)
                if use_raw:
                    bare.append(ping_socket(ep.data_socket, n, warm))
                else:
                    api.append(ping_endpoint(ep, n, warm))
                parent.send("bye")
                pr.join(10)
                ep.close()
            if between is not None:
                between()
        return api, bare, proxy_stats(path)
    finally:
        daemon.terminate()
        daemon.wait(10)


def ping_child(sock: socket.socket, parent, pr, n: int, warm: int) -> np.ndarray:
    """Once the ponger process `pr` says it is ready on `parent`: `n` timed round trips (after
    `warm`) on `sock`; then the ponger is let go and `sock` closed."""
    parent.recv()
    lat = ping_socket(sock, n, warm)
    parent.send("bye")
    pr.join(10)
    sock.close()
    return lat


def run_unix_direct(n: int, warm: int) -> np.ndarray:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent, child = CTX.Pipe()
    pr = CTX.Process(target=pong_socket, args=(b, n + warm, child))
    pr.start()
    b.close()
    return ping_child(a, parent, pr, n, warm)


def run_tcp(n: int, warm: int) -> np.ndarray:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    parent, child = CTX.Pipe()
    pr = CTX.Process(target=pong_tcp, args=(lst.getsockname()[1], n + warm, child))
    pr.start()
    s, _ = lst.accept()
    lst.close()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ping_child(s, parent, pr, n, warm)


def run_http(n: int, warm: int) -> np.ndarray:
    import aiohttp

    parent, child = CTX.Pipe()
    pr = CTX.Process(target=http_server, args=(child,), daemon=True)
    pr.start()
    port = parent.recv()

    async def go() -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        url = f"http://127.0.0.1:{port}/echo"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            for i in range(-warm, n):
                t = time.perf_counter_ns()
                async with s.post(url, data=FRAME_A) as r:
                    body = await r.read()
                if i >= 0:
                    out[i] = time.perf_counter_ns() - t
                assert len(body) == SIZE
        return out

    try:
        return asyncio.run(go())
    finally:
        pr.kill()
        pr.join(10)


def summarize(runs: list[np.ndarray]) -> dict:
    """p50/p99/mean of each run; the figure is the median over the runs (p50 of each listed)."""
    us = [r / 1000.0 for r in runs]

    def med(f) -> float:
        return round(float(np.median([f(u) for u in us])), 2)

    return {
        "n": int(runs[0].size),
        "runs": len(runs),
        "p50_us": med(lambda u: np.percentile(u, 50)),
        "p99_us": med(lambda u: np.percentile(u, 99)),
        "mean_us": med(np.mean),
        "p50_us_each": [round(float(np.percentile(u, 50)), 2) for u in us],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 round trips instead of 20,000")
    ap.add_argument("-n", type=int, default=None, help="round trips per transport")
    ap.add_argument("--reps", type=int, default=3, help="runs per transport (median reported)")
    args = ap.parse_args()
    n = args.n or (5_000 if args.quick else 20_000)
    warm = max(200, n // 20)
    reps = max(1, args.reps)
    tmp = tempfile.mkdtemp(prefix="hhop-")
    results: dict[str, dict] = {}
    notes: dict[str, str] = {}
    try:
        why = ebpf_unavailable_reason()
        tcp_runs: list[np.ndarray] = []
        if why is None:
            api, bare, st = run_proxy(
                "ebpf",
                n,
                warm,
                tmp,
                raw=True,
                reps=reps,
                between=lambda: tcp_runs.append(run_tcp(n, warm)),
            )
            results["sockmap"] = summarize(api)
            # proof that the messages went through the BPF redirect, not the daemon
            results["sockmap"]["bpf_counted"] = st["per_dst"].get("2", {}).get("msgs", 0) + st[
                "per_dst"
            ].get("1", {}).get("msgs", 0)
            results["sockmap"]["daemon_relayed"] = st["daemon_relayed"]
            results["sockmap_raw"] = summarize(bare)
        else:
            notes["sockmap"] = f"skipped: {why}"
            tcp_runs = [run_tcp(n, warm) for _ in range(reps)]
        api, _, _ = run_proxy("unix", n, warm, tmp)
        results["unix_proxy"] = summarize(api)
        results["unix_direct"] = summarize([run_unix_direct(n, warm)])
        results["tcp"] = summarize(tcp_runs)
        results["http"] = summarize([run_http(n, warm)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"hop latency, 64-byte descriptor ping-pong between two processes, {n} round trips")
    print(f"{'transport':<12} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}")
    for k, v in results.items():
        print(f"{k:<12} {v['p50_us']:>9.2f} {v['p99_us']:>9.2f} {v['mean_us']:>9.2f}")
    for k, v in notes.items():
        print(f"{k:<12} {v}")
    ratios = {}
    base = "sockmap" if "sockmap" in results else "unix_proxy"
    b50 = results[base]["p50_us"]
    for other in ("tcp", "http", "unix_direct", "unix_proxy"):
        if other != base:
            ratios[f"{base}_p50_over_{other}_p50"] = round(b50 / results[other]["p50_us"], 3)
    targets: dict[str, bool] = {}
    if base == "sockmap":
        raw50 = results["sockmap_raw"]["p50_us"]
        # transport vs transport: the same bare send/recv loop on both sides
        ratios["sockmap_raw_p50_over_tcp_p50"] = round(raw50 / results["tcp"]["p50_us"], 3)
        ratios["sockmap_p50_over_sockmap_raw_p50"] = round(b50 / raw50, 3)
        ratios["http_p50_over_sockmap_p50"] = round(results["http"]["p50_us"] / b50, 1)
        # issue 19: the Endpoint API within 1.1x of the bare loop and at most 0.8x of TCP
        targets["api_le_1.1_bare_sockmap"] = ratios["sockmap_p50_over_sockmap_raw_p50"] <= 1.1
        targets["api_le_0.8_tcp"] = ratios["sockmap_p50_over_tcp_p50"] <= 0.8
    print("ratios:")
    for k, v in ratios.items():
        print(f"  {k}: {v}")
    print(
        json.dumps(
            {
                "benchmark": "hop_latency",
                "round_trips": n,
                **results,
                "ratios": ratios,
                "targets": targets,
                "targets_met": bool(targets) and all(targets.values()),
                "notes": notes,
            }
        )
    )


if __name__ == "__main__":
    main()
