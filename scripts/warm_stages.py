"""Where a warm no-op invoke's time goes at 500/s open loop, stage by stage, from the kernel's
side (issue #19). A node of this tree runs the no-op function (one instance); the lean client
(`lean_load.py`) sends it 500 requests/s; an eBPF program (bcc, in-kernel filtering, events
kept in a map and read at the end, so nothing is streamed while the load runs) records the
``sendto``/``recvfrom``/``epoll_wait`` entries and exits and the scheduler's wake-ups and
switches of the client, the agent and the instance. Each request is then followed from the
client's ``sendto`` through the agent's read, its descriptor ``sendto``, the instance's wake-up,
read and reply, the agent's wake-up and HTTP write, to the client's wake-up and read, and the
median of each stage is printed, for all requests and split by where the scheduler woke the
client for its answer (the agent's vCPU, where it waits for the agent to sleep, or the other,
halted one, which an inter-processor interrupt wakes).

Tracing costs: the p50 the client sees under it is printed beside the stages (0.52 vs 0.46 ms
untraced, 7 Dec 2026). Needs root and bcc. A diagnostic, not a benchmark (no baseline, no
target): so it lives in scripts/, not benchmarks/; it uses the benchmarks' node set-up and client.

    .venv/bin/python scripts/warm_stages.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gateway_targets import NOOP  # noqa: E402
from hearth.localnode import start_node  # noqa: E402
from instance_cpu import instance_pid  # noqa: E402

SENDTO, RECVFROM, EPOLL_WAIT = 44, 45, 232  # x86-64 system call numbers
LOG_MAX = 400_000
AGENT, INSTANCE, CLIENT = 1, 2, 3
ENTER, EXIT, WAKEUP, ON_CPU, OFF_CPU = 1, 2, 3, 4, 5

BPF_TEXT = r"""
struct ev { u64 ts; u32 tid; u32 kind; s64 a; s64 b; u32 cpu; u32 pad; };
BPF_HASH(tids, u32, u32, 256);
BPF_ARRAY(logv, struct ev, LOG_MAX);
BPF_ARRAY(idx, u64, 1);
static inline void put(struct ev *e) {
  int z = 0; u64 *p = idx.lookup(&z); if (!p) return;
  u64 i = __sync_fetch_and_add(p, 1); if (i >= LOG_MAX) return;
  int k = i; struct ev *slot = logv.lookup(&k); if (slot) *slot = *e; }
static inline int wanted(long nr) { return nr == 44 || nr == 45 || nr == 232; }
TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
  if (!wanted(args->id)) return 0;
  u32 tid = bpf_get_current_pid_tgid(); if (!tids.lookup(&tid)) return 0;
  struct ev e = {}; e.ts = bpf_ktime_get_ns(); e.tid = tid; e.kind = 1; e.a = args->id;
  e.cpu = bpf_get_smp_processor_id(); put(&e); return 0; }
TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
  if (!wanted(args->id)) return 0;
  u32 tid = bpf_get_current_pid_tgid(); if (!tids.lookup(&tid)) return 0;
  struct ev e = {}; e.ts = bpf_ktime_get_ns(); e.tid = tid; e.kind = 2; e.a = args->id;
  e.b = args->ret; e.cpu = bpf_get_smp_processor_id(); put(&e); return 0; }
TRACEPOINT_PROBE(sched, sched_wakeup) {
  u32 tid = args->pid; if (!tids.lookup(&tid)) return 0;
  struct ev e = {}; e.ts = bpf_ktime_get_ns(); e.tid = tid; e.kind = 3; e.a = args->target_cpu;
  e.cpu = bpf_get_smp_processor_id(); put(&e); return 0; }
TRACEPOINT_PROBE(sched, sched_switch) {
  u32 n = args->next_pid, p = args->prev_pid;
  struct ev e = {}; e.ts = bpf_ktime_get_ns(); e.cpu = bpf_get_smp_processor_id();
  if (tids.lookup(&n)) { e.tid = n; e.kind = 4; put(&e); }
  if (tids.lookup(&p)) { e.tid = p; e.kind = 5; e.b = args->prev_state; put(&e); }
  return 0; }
""".replace("LOG_MAX", str(LOG_MAX))

# a request's path: (stage name, process, event kind, system call or None)
STEPS = [
    ("client sendto", CLIENT, ENTER, SENDTO),
    ("agent on CPU", AGENT, ON_CPU, None),
    ("agent read the request", AGENT, EXIT, RECVFROM),
    ("agent sendto descriptor", AGENT, ENTER, SENDTO),
    ("descriptor sent", AGENT, EXIT, SENDTO),
    ("instance on CPU", INSTANCE, ON_CPU, None),
    ("instance read it", INSTANCE, EXIT, RECVFROM),
    ("instance sendto reply", INSTANCE, ENTER, SENDTO),
    ("agent on CPU again", AGENT, ON_CPU, None),
    ("agent read the reply", AGENT, EXIT, RECVFROM),
    ("agent sendto answer", AGENT, ENTER, SENDTO),
    ("client on CPU", CLIENT, ON_CPU, None),
    ("client read the answer", CLIENT, EXIT, RECVFROM),
]

CLIENT_CODE = """
import json, sys, time
sys.path.insert(0, {bench!r})
import lean_load
lean_load.run_open_loop({url!r}, 1.0, 500)  # warm-up, untraced
time.sleep(1.5)
r = lean_load.run_open_loop({url!r}, {seconds}, 500)
lat = sorted(r["lat"])
print(json.dumps({{"n": r["n"], "errors": r["errors"], "p50_ms": lat[len(lat) // 2] * 1e3}}))
"""


def follow(rows: list[tuple], roles: dict[int, int]) -> list[tuple[list, list]]:
    """Each request's stage times and CPUs (None for an on-CPU step its process skipped: it
    was running already), from one client ``sendto`` to the next."""
    reqs, cur = [], None
    for ts, tid, kind, a, _b, cpu in rows:
        role = roles.get(tid)
        if role == CLIENT and kind == ENTER and a == SENDTO:
            if cur and len(cur[0]) == len(STEPS):
                reqs.append(cur)
            cur = ([ts], [cpu])
            continue
        if cur is None or len(cur[0]) >= len(STEPS):
            continue
        while True:
            _, who, want, _nr = STEPS[len(cur[0])]
            if want == ON_CPU and role == who and kind in (ENTER, EXIT):
                cur[0].append(None)
                cur[1].append(None)
                continue
            break
        _, who, want, nr = STEPS[len(cur[0])]
        if role == who and kind == want and (nr is None or a == nr):
            cur[0].append(ts)
            cur[1].append(cpu)
    return reqs


def report(reqs: list[tuple[list, list]], label: str) -> dict:
    out = {"label": label, "requests": len(reqs)}
    if not reqs:
        return out
    out["total_us"] = round(statistics.median(r[0][-1] - r[0][0] for r in reqs) / 1e3, 1)
    print(f"{label}: {len(reqs)} requests, client sendto -> answer read p50 {out['total_us']} us")
    for i in range(1, len(STEPS)):
        ds = []
        for times, _ in reqs:
            j = i - 1
            while times[j] is None:
                j -= 1
            if times[i] is not None:
                ds.append(times[i] - times[j])
        if ds:
            us = round(statistics.median(ds) / 1e3, 1)
            out[STEPS[i][0]] = us
            print(f"  {STEPS[i - 1][0]:>24} -> {STEPS[i][0]:<24} p50 {us:7.1f} us  (n {len(ds)})")
    return out


def main() -> int:
    from bcc import BPF

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    a = ap.parse_args()
    node = start_node(None, dataplane="auto")  # a private state directory, removed at stop
    client: subprocess.Popen | None = None
    try:
        node.client.deploy(NOOP)
        node.client.invoke("noop", b"")
        url = f"{node.url}/v1/functions/noop:invoke"
        b = BPF(text=BPF_TEXT)
        code = CLIENT_CODE.format(bench=str(ROOT / "benchmarks"), url=url, seconds=a.seconds)
        client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(1.2)  # the warm-up's instance is up: trace from here
        for pid, role in (
            (node.proc.pid, AGENT),
            (instance_pid(node), INSTANCE),
            (client.pid, CLIENT),
        ):
            for tid in os.listdir(f"/proc/{pid}/task"):
                b["tids"][ctypes.c_uint32(int(tid))] = ctypes.c_uint32(role)
        seen = json.loads(client.communicate(timeout=a.seconds + 120)[0].strip().splitlines()[-1])
        n = min(b["idx"][ctypes.c_int(0)].value, LOG_MAX)
        log = b["logv"]
        rows = sorted(
            (e.ts, e.tid, e.kind, e.a, e.b, e.cpu) for e in (log[ctypes.c_int(i)] for i in range(n))
        )
        roles = {k.value: v.value for k, v in b["tids"].items()}
    finally:
        if client is not None and client.poll() is None:
            client.kill()  # timed out: the load client goes with the node
            client.wait()
        node.stop()
    print(f"client under tracing: {seen}; {n} events")
    reqs = follow(rows, roles)
    ans, on = 10, 11  # the agent's answer sendto, the client's wake onto a CPU
    out = {"benchmark": "warm_stages", "client": seen}
    out["all"] = report(reqs, "all requests")
    same = [r for r in reqs if r[1][on] is not None and r[1][on] == r[1][ans]]
    other = [r for r in reqs if r[1][on] is not None and r[1][on] != r[1][ans]]
    out["client_on_agents_cpu"] = report(same, "client woken on the agent's vCPU")
    out["client_on_other_cpu"] = report(other, "client woken on the other vCPU")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
