"""`hearth demo --fast` end to end: its own node (Redis, proxy, instances), every step checked
by what it prints, and a clean shutdown that leaves no process or segment behind."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_every_step_and_shuts_down_cleanly(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env["COLUMNS"] = "200"  # one line per step
    shm_before = set(os.listdir("/dev/shm"))
    r = subprocess.run(
        [sys.executable, "-m", "hearth.cli", "demo", "--fast", "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
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
        "shut down cleanly",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "Traceback" not in out + r.stderr
    leftovers = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("hearth-")}
    assert not leftovers  # the slot pool went away with the node
