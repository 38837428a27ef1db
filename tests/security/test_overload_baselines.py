"""The overload benchmark's relay baseline and its per-process counts (issue #16): the relay
answers every call through its worker process, the benchmark counts that worker's wake-ups per
request under its own role, and the worker ends with the front (no stray process)."""

from __future__ import annotations

import http.client
import time

from benchmark_module import load_benchmark

servers = load_benchmark("replay_servers")
processes = load_benchmark("replay_processes")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_relay_baseline_answers_through_its_worker_and_counts_its_wakeups():
    url, proc = servers.start_noop_server(relay=True)
    try:
        before = processes.sched_snapshot(proc.pid)
        workers = [pid for pid, (role, *_) in before.items() if role == "worker"]
        assert len(workers) == 1 and before[proc.pid][0] == "server", before
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        n = 40
        for i in range(n):  # one at a time: each call wakes the worker once
            conn.request("POST", "/v1/functions/noop:invoke", body=b'{"i": %d}' % i)
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b"{}")
        conn.close()
        shares = processes.process_shares(before, processes.sched_snapshot(proc.pid), n, 1.0)
        assert shares["worker"]["processes"] == 1
        # about one wake-up per call (a margin of 2x below); the front's are counted apart
        assert shares["worker"]["wakeups_per_request"] >= 0.5, shares
        assert {"server", "worker", "sender"} <= set(shares)
    finally:
        proc.terminate()
        proc.wait(15)
    deadline = time.monotonic() + 10
    while _alive(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(workers[0]), "the relay's worker outlived its front"


def test_the_hearth_gateway_of_the_benchmark_leaves_no_state_directory():
    """start_hearth_gateway's node (the replay workload deployed and called once) removes its
    state directory when stopped. Before: each run left a /tmp/hearth-bench-* directory."""
    node = servers.start_hearth_gateway(shed=False, dataplane="unix")
    try:
        state = node.state
        assert (state / "hearth-up.log").exists()
    finally:
        node.stop()
    assert not state.exists()
