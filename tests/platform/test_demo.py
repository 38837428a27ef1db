"""`hearth demo` end to end, the full run (not `--fast`): its own node (Redis, proxy, instances),
the HTTP/queue steps, a two-round FedAvg through the platform and a trace replay with its
cold-start report; every step checked by what it prints and by the files it writes, and a clean
shutdown that leaves no process or segment behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import polars as pl
import pytest
from hearth.functions.replay import readers as R


@pytest.mark.slow
def test_full_demo_runs_every_step_and_shuts_down_cleanly(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env["COLUMNS"] = "250"  # one line per step
    out_dir = tmp_path / "out"
    shm_before = set(os.listdir("/dev/shm"))
    r = subprocess.run(
        [sys.executable, "-m", "hearth.cli", "demo", "--out", str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    for line in (
        "hello (warm): HTTP 200, same pid: True, cold=0",
        "hello async (202 → result): succeeded",
        "zero-copy view of the slot: True",
        "chain-sum → array-sum: HTTP 200",
        "fail (handler raises): HTTP 500",
        "unknown function: HTTP 404 unknown_function",
        "queue: 2000 events on a stream: 1999 processed, 1 dead-lettered",
        ", 0 pending;",
        "hello after scale-to-zero: cold=1, new pid: True",
        "round 2 on the same processes: True",
        # the FL step has the zygote its first deploy started ready, waited for on a line of
        # its own if it was not ready at once ("waiting for ..." then: a race, not asserted)
        "built-in functions' zygote: ready",
        # the deploy's zygotes (the demo functions' preload lists), waited for before the calls
        "zygote for asyncio, numpy: ready",
        "zygote for redis: ready",
        "shut down cleanly",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "Traceback" not in out + r.stderr
    # a clean run leaves no state directory behind (its report is in --out)
    m = re.search(r"state (/\S+)", out)
    assert m, out
    assert not os.path.exists(m.group(1)), m.group(1)
    # FedAvg: the platform's aggregate equals exact FedAvg (float32 sums over 12 clients)
    m = re.search(r"max rel\. error vs exact FedAvg ([0-9.e+-]+)", out)
    assert m, out
    assert float(m.group(1)) < 1e-5
    # replay: every invocation sent came back 200, and the written records say the same
    m = re.search(r"replay \+ cold-start report: (\d+) sent, (\d+) ok", out)
    assert m, out
    sent, ok = int(m.group(1)), int(m.group(2))
    assert sent >= 150 and ok == sent  # 10 s at 20/s
    rec = R.read_requests(out_dir / "replay" / "records.csv")
    assert rec.height == sent and (rec["status"] == 200).all()
    assert rec["requestID"].n_unique() == sent  # the gateway's invocation ids
    # the cold-start report was built from Hearth's own cold starts (Huawei columns) + the replay
    cold = pl.read_csv(out_dir / "coldstarts.csv")
    assert "totalCost_cold_start" in cold.columns and cold.height >= 5
    fl = cold.filter(pl.col("funcName").str.starts_with("demo-fl"))  # the FedAvg tree's instances
    # each forked from that zygote: none waited for it (or gave up on it) and took the pool
    assert fl.height >= 4 and not fl["fromPool"].any(), fl
    assert "replay-workload" in cold["funcName"].to_list()
    # X-Hearth-Cold marks a call that caused a start (the admitter's verdict), not one served
    # by a new instance: another instance may serve it first. The demo exports the log once no
    # start is in flight, and no start failed, so each cold call's start is in Hearth's own
    # cold-start log (which also holds starts no request waited for: the autoscaler's).
    started = set(cold.filter(pl.col("funcName") == "replay-workload")["requestID"])
    assert "cold start of replay-workload failed" not in r.stderr, r.stderr[-3000:]
    assert 1 <= rec["cold"].sum() <= len(started), (rec["cold"].sum(), started)
    # every instance that served the replay, cold or warm, was started and logged by the node
    assert set(rec["instance"]) <= started
    assert (out_dir / "report" / "report.html").stat().st_size > 1000
    stats = json.loads((out_dir / "report" / "stats.json").read_text())
    assert stats["traces"], stats
    # the slot pool (named after the node's port) went away with the node; other segments may
    # come and go meanwhile (other nodes on this machine)
    port = re.search(r"gateway http://127\.0\.0\.1:(\d+)", out).group(1)
    leftovers = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.endswith(f"-{port}")}
    assert not leftovers


# imported by every zygote of the node (HEARTH_ZYGOTE_PRELOAD): the built-ins' one never comes up
HANGING_BUILTINS = """
import sys
import time

if any("fedavg" in a for a in sys.argv):
    time.sleep(300)
"""


def test_the_demo_waits_for_the_builtins_zygote_only_as_long_as_it_said(tmp_path, redis_url):
    """The FL step's wait for the built-ins' zygote is bounded and says what it waited for; a
    zygote not ready by then is named, and the demo goes on (its starts take the warm pool)."""
    import io

    from hearth.demo_steps import Step, builtins_zygote_ready
    from hearth.functions.fedavg.tree import plan_tree
    from hearth.localnode import start_node
    from rich.console import Console

    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "hang_demo_builtins.py").write_text(HANGING_BUILTINS)
    path = os.pathsep.join(p for p in (str(mods), os.environ.get("PYTHONPATH")) if p)
    env = {"HEARTH_ZYGOTE_PRELOAD": "hang_demo_builtins", "PYTHONPATH": path}
    (spec,) = plan_tree({"node-0": 2}, fan_in=2, levels=1, prefix="dz").function_specs(
        model_bytes=1 << 16
    )
    text = io.StringIO()
    steps = Step(Console(file=text, width=250))
    with start_node(tmp_path / "dz", redis_url=redis_url, env=env) as node:
        node.client.deploy(spec.to_dict())
        builtins_zygote_ready(node.client, steps, timeout_s=1.0)
    out = text.getvalue()
    assert "waiting for the built-in functions' zygote" in out and "at most 1 s" in out, out
    assert "built-in functions' zygote starting after 1." in out, out
    assert "the demo goes on" in out and not steps.rows, out


def test_the_demo_does_not_wait_for_a_zygote_on_a_node_without_zygotes(tmp_path, redis_url):
    """HEARTH_RUNNER=process: no zygote will ever be ready, so the FL step neither waits nor
    warns (before: 'waiting ... at most 120 s', then a yellow 'zygote gone')."""
    import io

    from hearth.demo_steps import Step, builtins_zygote_ready
    from hearth.functions.fedavg.tree import plan_tree
    from hearth.localnode import start_node
    from rich.console import Console

    (spec,) = plan_tree({"node-0": 2}, fan_in=2, levels=1, prefix="dp").function_specs(
        model_bytes=1 << 16
    )
    text = io.StringIO()
    steps = Step(Console(file=text, width=250))
    with start_node(tmp_path / "dp", redis_url=redis_url, env={"HEARTH_RUNNER": "process"}) as node:
        node.client.deploy(spec.to_dict())
        builtins_zygote_ready(node.client, steps, timeout_s=30.0)
    assert text.getvalue() == "" and not steps.rows, text.getvalue()
