"""How many Python calls (and C calls) the agent makes per warm-pool start, phase by phase
(issue #19). A count does not move with the machine's load, so it is the robust measure of the
agent's CPU work on a pool start; timings (`benchmarks/cold_start.py`) confirm it.

Why it matters: a pool start is serial CPU work on one vCPU here (the client, the agent and the
pool instance take turns), so every call the agent makes between accepting the client's
connection and blocking again after sending the spec and the request, and again between the
instance's ready report and the reply's write, is on the start's path.

The node runs in this process (`hearth.up.Platform`, a warm pool of one, the zygote runner);
a client in another process makes N pool starts of the benchmark's probe function
(`cold_start.PROBE`: a new function each, deployed here and then invoked), each on a new
connection, connected and then sent the POST at once, as the benchmark does. `sys.setprofile`
counts the loop thread's calls from the listening socket's accept callback until the reply is
written and the loop blocks again (an `epoll` wait with a timeout), in phases:

    accept   the accept callback -> the request's first read (`FastTap.data_received`)
    read     the read -> the spec and request sent (the first `send`/`sendmsg` of a socket)
    send     after the send -> the loop blocks, or reads the instance's first message
    wait     from there (the ready report, any other wake) -> the reply's write
    reply    the reply's write (`FastTap._write`) -> the loop blocks
    record   the cold-start record (`ColdStartLog.record`), whenever it runs in these

`send` is the agent's own work after the send (on one vCPU, what delays the instance); `wait`
starts where the loop first blocks or first reads from the data plane, whichever comes first
(the profiler slows the agent several times over, so the instance's reports may be in before
the agent is done). The path (accept..wait) is what a start costs before its reply; the
`reply` phase (the call's books) comes after the answer left. The record (a new function's
first metric children: ~400 calls) is counted apart: the agent may reach it before or after
the reply is read, by timing alone. Per-start totals are printed too: a start now and then holds
more, a timer's or the pool refill's work (the medians leave those out).

It prints each phase's median over the starts (Python calls, C calls) and its top callees
(calls per start, averaged), so a cut shows where it came from. With ``--rev REV`` it counts
REV's ``platform/`` (by git archive) first, then this tree's, each in a process of its own, and
prints both. A diagnostic, not a benchmark: no target, no baseline kept.

    .venv/bin/python scripts/count_start_calls.py [-n 12] [--rev 54ed83c] [--top 15]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import itertools
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE: list[str] | None = None  # --trace: each start's calls in order, phase first
PHASES = ("accept", "read", "send", "wait", "reply", "record")


# -- the client (another process) ---------------------------------------------------------------
def client(url: str) -> None:
    """One line in per start ("name kind"), one line out ("status cold"): connect, then POST
    at once (the benchmark's shape: a new connection per start, the request right after)."""
    host, port = url.split("//")[1].split(":")
    for line in sys.stdin:
        name, kind = line.split()
        body, ctype = (
            (b"{}", "application/json")
            if kind == "hello"
            else (b"\0" * 4096, "application/octet-stream")
        )
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.connect()
        conn.request(
            "POST", f"/v1/functions/{name}:invoke", body=body, headers={"Content-Type": ctype}
        )
        r = conn.getresponse()
        r.read()
        conn.close()
        print(r.status, r.getheader("X-Hearth-Cold"), flush=True)


# -- the counter ---------------------------------------------------------------------------------
class Counter:
    """A `sys.setprofile` hook for the loop thread: idle until armed, then counts each phase's
    calls until the loop blocks after the reply's write."""

    def __init__(self) -> None:
        self.state = "idle"  # idle | armed | one of PHASES
        self.blocked = False  # the loop blocked once in this start (`wait` begins)
        self.py: dict[str, int] = {}
        self.c: dict[str, int] = {}
        self.names: dict[str, collections.Counter] = {}
        self.blocks: dict[str, int] = {}  # blocking waits inside each phase
        self.via = ""
        self.inside: object = None
        self.done: asyncio.Future | None = None

    def arm(self, done: asyncio.Future) -> None:
        self.py = dict.fromkeys(PHASES, 0)
        self.c = dict.fromkeys(PHASES, 0)
        self.names = {p: collections.Counter() for p in PHASES}
        self.blocks = dict.fromkeys(PHASES, 0)
        self.via = ""  # how the start was made: from the read (`_start_pooled`) or a task
        self.inside = None  # the frame of the cold-start record being counted
        self.done, self.state = done, "armed"
        if TRACE is not None:
            TRACE.clear()

    def hook(self, frame, event, arg) -> None:  # noqa: ANN001 - sys.setprofile's signature
        state = self.state
        if state == "idle":
            return
        if event == "call":
            code = frame.f_code
            name = code.co_name
            if state == "armed":
                if name != "_accept_connection":
                    return
                state = self.state = "accept"
            elif state == "accept" and name == "data_received" and "fastpath" in code.co_filename:
                state = self.state = "read"
            elif state in ("send", "wait") and name == "_write" and "fastpath" in code.co_filename:
                state = self.state = "reply"
            elif state == "send" and name == "_readable" and "async_endpoint" in code.co_filename:
                state = self.state = "wait"  # the instance's first message is read
            elif name == "_start_pooled" or (name == "acquire" and "admitter" in code.co_filename):
                self.via = self.via or ("read" if name == "_start_pooled" else "task")
            elif name == "record" and self.inside is None and "coldstarts" in code.co_filename:
                self.inside = frame
            if self.inside is not None:
                state = "record"
            self.py[state] += 1
            if TRACE is not None and len(TRACE) < 20000:
                TRACE.append(f"{state} {Path(code.co_filename).stem}:{code.co_qualname}")
            self.names[state][f"{Path(code.co_filename).stem}:{code.co_qualname}"] += 1
        elif event == "return":
            if frame is self.inside:
                self.inside = None
        elif event == "c_call":
            if state == "armed":
                return
            if self.inside is not None:
                state = "record"
            cname = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?")
            if cname == "epoll.poll" and frame.f_locals.get("timeout") != 0:
                if state in ("send", "reply"):  # the loop blocks: this phase ends
                    if state == "reply":
                        self.state = "idle"
                        if self.done is not None and not self.done.done():
                            self.done.get_loop().call_soon_threadsafe(self.done.set_result, None)
                        return
                    self.state = "wait"
                    return
                self.blocks[state] += 1
            self.c[state] += 1
            if state == "read" and cname in ("socket.send", "socket.sendmsg"):
                self.state = "send"  # the spec and the request left (one message)
            if TRACE is not None and len(TRACE) < 20000:
                TRACE.append(f"{state} C {cname}")
            self.names[state][f"C {cname}"] += 1


# -- the node (this process) ---------------------------------------------------------------------
async def run_node(n: int, state: Path, trace: Path | None = None) -> list[dict]:
    from hearth.agent.zygote import zygote_plan
    from hearth.config import Settings
    from hearth.spec import parse_spec
    from hearth.up import Platform

    # after hearth: cold_start puts this tree's platform/ first on sys.path, and the tree
    # counted is PYTHONPATH's (already imported)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cold_start import PROBE, probe_spec

    code = state / "code"
    code.mkdir()
    (code / "cb_probe.py").write_text(PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        HEARTH_STATE_DIR=str(state / "node"),
        HEARTH_PORT=str(port),
        HEARTH_ADMIN_TOKEN=secrets.token_hex(16),
        HEARTH_RUNNER="zygote",
    )
    p = Platform(Settings.from_env(), warm_pool_size=1)
    await p.start()
    cl = subprocess.Popen(
        [sys.executable, __file__, "--client", p.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    counter = Counter()
    out: list[dict] = []
    loop = asyncio.get_running_loop()
    try:
        agent = p.agent
        assert agent is not None and p.registry is not None

        async def until(cond, what: str, timeout: float = 120) -> None:  # noqa: ANN001
            t0 = time.monotonic()
            while not cond():
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"{what}: not in {timeout}s")
                await asyncio.sleep(0.05)

        sys.setprofile(counter.hook)  # this thread only: the loop's
        for k in range(n):
            spec_d, _body, _ct = probe_spec(f"cs-{k}", k, code)
            spec = parse_spec(spec_d)
            await p.registry.put(spec)
            await agent.deploy(spec)
            if k == 0:
                key = zygote_plan(spec)[0]
                await until(
                    lambda key=key: agent.runner.status().get(key, {}).get("state") == "ready",
                    "zygote",
                )
            await until(lambda: agent.status()["warm_pool_ready"] >= 1, "warm pool")
            await asyncio.sleep(0.3)  # the refill's and the deploy's loose ends settle
            kind = "hello" if k % 2 == 0 else "array_sum"
            answer = loop.run_in_executor(None, cl.stdout.readline)
            done = loop.create_future()
            cl.stdin.write(f"{spec.name} {kind}\n")
            cl.stdin.flush()
            counter.arm(done)
            try:
                await asyncio.wait_for(done, 30)
            except TimeoutError:
                print("no reply written; counting in", counter.state, file=sys.stderr)
                if TRACE is not None and trace is not None:
                    (trace / f"start-{k}.txt").write_text("\n".join(TRACE))
                raise
            if TRACE is not None and trace is not None:
                (trace / f"start-{k}.txt").write_text("\n".join(TRACE))
            status, cold = (await answer).split()
            out.append(
                {
                    "kind": kind,
                    "status": int(status),
                    "cold": cold == "1",
                    "py": counter.py,
                    "c": counter.c,
                    "blocks": counter.blocks,
                    "via": counter.via,
                    "names": {ph: dict(v) for ph, v in counter.names.items()},
                }
            )
        sys.setprofile(None)
    finally:
        sys.setprofile(None)
        cl.stdin.close()
        cl.wait(10)
        await p.stop()
    return out


def summary(runs: list[dict], top: int) -> dict:
    """Per phase: median Python and C calls per start, and the top callees (mean per start);
    `path`: the phases before the reply's write (the start's own path), summed per start."""
    ok = [r for r in runs if r["status"] == 200 and r["cold"]]

    def med(xs: list[int]) -> float:
        return statistics.median(xs) if xs else 0

    path = PHASES[:4]
    totals = [sum(r["py"][ph] for ph in path) for r in ok]
    # the top lists leave out starts whose path took over 1.5x the median: a timer or the
    # pool's refill ran inside them (their counts stay in the medians)
    typical = [r for r, t in zip(ok, totals, strict=True) if t <= 1.5 * med(totals)]
    out: dict = {"starts": len(runs), "counted": len(ok), "typical": len(typical), "phases": {}}
    for ph in PHASES:
        names: collections.Counter = collections.Counter()
        for r in typical:
            names.update(r["names"][ph])
        py = [(k, v) for k, v in names.most_common() if not k.startswith("C ")][:top]
        c = [(k, v) for k, v in names.most_common() if k.startswith("C ")][:top]
        out["phases"][ph] = {
            "py": med([r["py"][ph] for r in ok]),
            "c": med([r["c"][ph] for r in ok]),
            "top_py": [(k, round(v / len(typical), 1)) for k, v in py],
            "top_c": [(k, round(v / len(typical), 1)) for k, v in c],
        }
    first = PHASES[:3]  # accept..send: the agent's work before it leaves the CPU to the instance
    out["first_py"] = med([sum(r["py"][ph] for ph in first) for r in ok])
    out["first_c"] = med([sum(r["c"][ph] for ph in first) for r in ok])
    out["path_py"] = med([sum(r["py"][ph] for ph in path) for r in ok])
    out["path_c"] = med([sum(r["c"][ph] for ph in path) for r in ok])
    out["per_start_path_py"] = totals
    out["blocks"] = {ph: sum(r["blocks"][ph] for r in ok) for ph in PHASES}
    out["via"] = dict(collections.Counter(r["via"] for r in ok))
    return out


def show(label: str, s: dict) -> None:
    print(f"== {label}: {s['counted']}/{s['starts']} starts cold from the pool and counted")
    print(f"   (top callees: calls per start, mean over the {s['typical']} typical starts)")
    for ph, v in s["phases"].items():
        print(f"-- {ph:7} python {v['py']:>7}  C {v['c']:>7}   (median per start)")
        pairs = itertools.zip_longest(v["top_py"], v["top_c"], fillvalue=("", ""))
        for (name, x), (cname, cx) in pairs:
            print(f"     {x:>7}  {name:58.58} {cx:>7}  {cname[2:]}")
    print(f"-- accept..send python {s['first_py']}  C {s['first_c']}  (median per start)")
    print(
        f"-- path (accept..wait) python {s['path_py']}  C {s['path_c']}"
        f"  (per start: {s['per_start_path_py']})\n-- blocking waits inside phases (all starts):"
        f" {s['blocks']}; started from: {s['via']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=12, help="pool starts to count")
    ap.add_argument("--rev", help="count this git revision's platform/ too, first")
    ap.add_argument("--top", type=int, default=15, help="callees shown per phase")
    ap.add_argument("--trace", help="write each start's calls, in order, to DIR/start-K.txt")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)  # one tree's summary, to this file
    a = ap.parse_args()
    if a.client:
        return client(a.client)
    if a.json:  # one tree, in this process: PYTHONPATH names its platform/
        global TRACE
        trace = Path(a.trace) if a.trace else None
        if trace is not None:
            trace.mkdir(parents=True, exist_ok=True)
            TRACE = []
        state = Path(tempfile.mkdtemp(prefix="hearth-count-"))
        try:
            runs = asyncio.run(run_node(a.n, state, trace))
        finally:
            shutil.rmtree(state, ignore_errors=True)
        Path(a.json).write_text(json.dumps(summary(runs, a.top)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import revtree

    tmp = Path(tempfile.mkdtemp(prefix="hearth-count-rev-"))
    try:
        trees = [("this", ROOT / "platform")]
        other = revtree.platform_of(a.rev, tmp)
        if other is not None:
            trees.insert(0, (a.rev, other))
        got = {}
        for label, plat in trees:
            env = {**os.environ, "PYTHONPATH": str(plat)}
            out = tmp / f"{label}.json"
            argv = [
                sys.executable,
                __file__,
                "-n",
                str(a.n),
                "--top",
                str(a.top),
                "--json",
                str(out),
            ]
            if a.trace:
                argv += ["--trace", str(Path(a.trace) / label)]
            subprocess.run(argv, env=env, check=True)
            got[label] = json.loads(out.read_text())
            show(f"{label} ({plat})", got[label])
        if len(got) == 2:
            b, t = got[a.rev], got["this"]
            print(f"== this tree / {a.rev}, Python calls per phase (median per start):")
            for ph in PHASES:
                print(
                    f"   {ph:7} {t['phases'][ph]['py']:>7} / {b['phases'][ph]['py']:<7}"
                    f" C {t['phases'][ph]['c']:>6} / {b['phases'][ph]['c']}"
                )
            for k, what in (("first", "accept..send"), ("path", "accept..wait")):
                print(
                    f"   {what:13} {t[k + '_py']:>7} / {b[k + '_py']:<7}"
                    f" C {t[k + '_c']:>6} / {b[k + '_c']}"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
