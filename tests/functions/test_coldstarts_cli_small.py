"""The trace commands of docs/traces.md's typical session, run through the real CLI on the
inputs a new user has at hand: a node's own cold-start export of a few calls (too few to fit a
distribution) must give a report and a summary line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hearth.controller import coldstarts as CS


def hearth(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *map(str, args)], capture_output=True, text=True
    )


def two_cold_starts(path: Path) -> Path:
    """What `hearth coldstarts export` writes after the README's tour: two pool starts."""
    t = 1_700_000_000.0
    recs = []
    for i in range(2):
        stamps = [t + i, t + i + 0.001, t + i + 0.002, t + i + 0.004, t + i + 0.0045, t + i + 0.005]
        ph = dict(zip(CS.LOCAL_PHASES, stamps, strict=True))
        recs.append(
            CS.from_local_phases(
                ph, function=f"fn{i}", pod=CS.pod_id(500, 256, i), request_id=f"i{i}", origin=t
            )
        )
    CS.to_huawei_csv(recs, path)
    return path


def test_analyze_of_a_small_export_reports_the_fit_it_could_not_make(tmp_path):
    csv = two_cold_starts(tmp_path / "hearth.csv")
    p = hearth("coldstarts", "analyze", csv, "--out", tmp_path / "rep")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "hearth.csv: 2 cold starts, mean" in p.stdout
    assert "LogNormal fit: too few distinct positive cold-start times to fit" in p.stdout
    assert (tmp_path / "rep" / "report.html").is_file()


def test_synth_names_the_directory_that_holds_every_region(tmp_path):
    """`--regions 2` writes cold_start/R1 and cold_start/R2: the summary names their common
    directory (it said '... under cold_start/R1' for both regions' files)."""
    p = hearth("trace", "synth", "--out", tmp_path / "t", "--rows", 200, "--regions", 2)
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("huawei-coldstart:"))
    files = sorted((tmp_path / "t" / "cold_start").rglob("*.csv"))
    assert {f.parent.name for f in files} == {"R1", "R2"}
    assert line == f"huawei-coldstart: {len(files)} file(s) under {tmp_path / 't' / 'cold_start'}"


def test_replay_says_when_target_rps_is_above_the_traces_rate(tmp_path):
    """docs/traces.md's replay asks --target-rps 50 of a trace with fewer: the schedule keeps
    every function, and the CLI says so instead of leaving a silent shortfall."""
    assert hearth("trace", "synth", "--out", tmp_path, "--rows", 2000, "--requests").returncode == 0
    trace = tmp_path / "azure2021.csv"
    high = hearth("replay", trace, "--duration", 600, "--target-rps", 1e6, "--plan-only")
    assert high.returncode == 0, high.stderr
    assert "note: --target-rps 1e+06 is above the trace's" in high.stderr
    assert "every function is replayed" in high.stderr
    low = hearth("replay", trace, "--duration", 600, "--target-rps", 0.01, "--plan-only")
    assert low.returncode == 0, low.stderr
    assert "note:" not in low.stderr
