"""What a replay run cost, read around it from /proc and the node: CPU seconds of the server's
process; per process role (server, proxy, instances, redis, worker, sender) the cores, CPU and
run-queue wait and the context switches per request; and the node's own counters (spins,
instance starts, garbage-collector pauses, event-loop lag). Figures, not targets."""

from __future__ import annotations

import os


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) the process `pid` has used so far (0 without a pid)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: a process's role by its command line (the first match); the tree's root is the server
ROLES = (
    ("hearth.proxies.daemon", "proxy"),
    ("hearth.runtime", "instances"),
    ("redis-server", "redis"),
    ("relay-worker", "worker"),
)


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (now)."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += _tree(int(child))
    except OSError:
        pass
    return out


def _sched(pid: int) -> tuple[float, float, int, int]:
    """Seconds on a CPU and seconds runnable but waiting for one (run queue), and the context
    switches, voluntary (it blocked: a wake-up later) and involuntary (preempted), all threads."""
    run = wait = vol = invol = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                r, w, _ = f.read().split()
            run, wait = run + int(r), wait + int(w)
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
    except (OSError, ValueError):
        pass
    return run / 1e9, wait / 1e9, vol, invol


def _role(pid: int, root: int, sender: int) -> str:
    if pid == sender:
        return "sender"
    if pid == root:
        return "server"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return "other"
    return next((role for key, role in ROLES if key.encode() in cmd), "other")


def sched_snapshot(root: int | None) -> dict[int, tuple[str, float, float, int, int]]:
    """Every process of the server's tree and the sender: role, CPU s, run-queue wait s, and
    voluntary and involuntary context switches."""
    me = os.getpid()
    pids = ([*_tree(root)] if root else []) + [me]
    return {p: (_role(p, root or -1, me), *_sched(p)) for p in pids}


def process_shares(before: dict, after: dict, requests: int, seconds: float) -> dict:
    """Per role: cores used, CPU and run-queue wait per request over the run, and context
    switches per request: voluntary (the role's processes blocked, each a wake-up later) and
    involuntary (preempted). Where a served call's time goes when it is not the server's own
    work: its processes waiting for a CPU, or switched out."""
    out: dict[str, dict] = {}
    for pid, (role, run, wait, vol, invol) in after.items():
        # started during the run: all of it
        _, run0, wait0, vol0, invol0 = before.get(pid, (role, 0.0, 0.0, 0, 0))
        r = out.setdefault(
            role, {"processes": 0, "cpu_s": 0.0, "wait_s": 0.0, "vol": 0, "invol": 0}
        )
        r["processes"] += 1
        r["cpu_s"] += run - run0
        r["wait_s"] += wait - wait0
        r["vol"] += vol - vol0
        r["invol"] += invol - invol0
    n = max(requests, 1)
    return {
        role: {
            "processes": r["processes"],
            "cores": round(r["cpu_s"] / seconds, 3),
            "cpu_us_per_request": round(1e6 * r["cpu_s"] / n, 1),
            "runq_wait_us_per_request": round(1e6 * r["wait_s"] / n, 1),
            "wakeups_per_request": round(r["vol"] / n, 3),
            "preempted_per_request": round(r["invol"] / n, 3),
        }
        for role, r in sorted(out.items())
    }


#: the node's own counters read around each run (figures, not targets): its busy-polls for
#: replies, instance starts, garbage-collector pauses and event-loop lag
NODE_COUNTERS = (
    "hearth_agent_spins_total",
    "hearth_agent_spin_seconds_total",
    "hearth_cold_starts_total",
    "hearth_gc_pause_seconds_count",
    "hearth_gc_pause_seconds_sum",
    "hearth_gc_pause_seconds_bucket",
    "hearth_loop_lag_seconds_count",
    "hearth_loop_lag_seconds_bucket",
)


def node_counters(node) -> dict[str, float]:
    """The node's NODE_COUNTERS now, by sample name and labels (empty if unreadable: an older
    revision lacks some)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = node.client.request("GET", "/metrics", admin=True).body.decode()
    except Exception:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name in NODE_COUNTERS:
                labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
                key = f"{smp.name}{{{labels}}}"
                out[key] = out.get(key, 0.0) + smp.value
    return out


def node_figures(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the node did during a run: spins (hits, misses, CPU seconds), instance starts,
    collections and their pause time (and those over 5 ms), and lag-timer ticks later than
    2/5/10 ms (of all ticks; only while shedding is on)."""

    def d(name: str, where=lambda key: True) -> float:
        return sum(
            v - before.get(k, 0.0)
            for k, v in after.items()
            if k.startswith(name + "{") and where(k)
        )

    def over(name: str, le: str) -> int:  # observations above the bucket `le`
        return round(d(name + "_count") - d(name + "_bucket", lambda k: f"le={le}" in k))

    return {
        "spins_hit": round(d("hearth_agent_spins_total", lambda k: "outcome=hit" in k)),
        "spins_miss": round(d("hearth_agent_spins_total", lambda k: "outcome=miss" in k)),
        "spin_cpu_s": round(d("hearth_agent_spin_seconds_total"), 4),
        "instance_starts": round(d("hearth_cold_starts_total")),
        "gc_collections": round(d("hearth_gc_pause_seconds_count")),
        "gc_pause_s": round(d("hearth_gc_pause_seconds_sum"), 4),
        "gc_pauses_over_5ms": over("hearth_gc_pause_seconds", "0.005"),
        "lag_ticks": round(d("hearth_loop_lag_seconds_count")),
        "lag_ticks_over_ms": {
            ms: over("hearth_loop_lag_seconds", le)
            for ms, le in (("2", "0.002"), ("5", "0.005"), ("10", "0.01"))
        },
    }
