"""pytest plugin: wall and CPU time of each test phase, for finding where the suite's time goes on
a shared machine (wall time there says more about the neighbours than about the test).

    PYTHONPATH=scripts make test PYTEST_ARGS="-p pytest_cputime"
    (HEARTH_CPUTIME_OUT=phases.jsonl also writes one JSON line per phase)

CPU is this process's (threads included: in-process servers) plus that of the child processes
reaped during the phase: a module-scoped `hearth up` node's CPU (its instances included) shows up
in the teardown that stops it. The summary lists the phases with the most wall time, with their
CPU and the load average when they began; a phase with much wall and little CPU is waiting."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

_rows: list[dict] = []


def _cpu() -> tuple[float, float]:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _measure(item: pytest.Item, phase: str):
    w0, (s0, c0), load = time.monotonic(), _cpu(), os.getloadavg()[0]
    yield
    w1, (s1, c1) = time.monotonic(), _cpu()
    _rows.append(
        {
            "id": item.nodeid,
            "phase": phase,
            "wall": round(w1 - w0, 3),
            "cpu_self": round(s1 - s0, 3),
            "cpu_children": round(c1 - c0, 3),
            "load": round(load, 2),
        }
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _measure(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _measure(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _measure(item, "teardown")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _rows:
        return
    out = os.environ.get("HEARTH_CPUTIME_OUT")
    if out:
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _rows)
    tr = terminalreporter
    wall = sum(r["wall"] for r in _rows)
    own = sum(r["cpu_self"] for r in _rows)
    kids = sum(r["cpu_children"] for r in _rows)
    tr.write_sep("=", "wall and CPU per phase (pytest_cputime)")
    tr.write_line(f"all phases: wall {wall:.0f} s, CPU {own:.0f} s own + {kids:.0f} s children")
    tr.write_line("   wall    own  child  load  phase     test")
    for r in sorted(_rows, key=lambda r: -r["wall"])[:40]:
        tr.write_line(
            f"{r['wall']:7.1f} {r['cpu_self']:6.1f} {r['cpu_children']:6.1f} {r['load']:5.1f}"
            f"  {r['phase']:9} {r['id']}"
        )
