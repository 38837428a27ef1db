"""The trace commands with a file they cannot use: one `error:` line naming the file (and the
line), exit code 1, never a traceback. Run as the real CLI, in a child process; replays are
`--plan-only` (nothing is sent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests/data/traces"
COLD = SAMPLES / "huawei_2025_notebook_excerpts/cold_starts_R2_head_day0_tail_day30.csv"
AZURE = SAMPLES / "azure_2021_doc_sample/AzureFunctionsInvocationTrace2021_doc_rows.csv"


def hearth(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
        cwd=cwd,
        timeout=180,
    )


def one_error_line(r: subprocess.CompletedProcess, starts: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {starts}"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def header_only(src: Path, dest: Path) -> Path:
    dest.write_text(src.read_text().splitlines()[0] + "\n")
    return dest


def replay(f: Path, tmp: Path) -> subprocess.CompletedProcess:
    return hearth("replay", "--plan-only", "--target", "http://127.0.0.1:9", f, cwd=tmp)


def test_a_cold_start_table_with_a_header_only(tmp_path):
    f = header_only(COLD, tmp_path / "cold.csv")
    r = hearth("coldstarts", "analyze", "--out", tmp_path / "rep", f, cwd=tmp_path)
    one_error_line(r, f"{f}: line 2: no cold starts")
    r = hearth("coldstarts", "simulate", "--out", tmp_path / "sim", f, cwd=tmp_path)
    one_error_line(r, f"{f}: line 2: no invocations")
    one_error_line(replay(f, tmp_path), f"{f}: line 2: no invocations")


def test_an_invocation_trace_with_a_header_only(tmp_path):
    f = header_only(AZURE, tmp_path / "azure.csv")
    one_error_line(replay(f, tmp_path), f"{f}: line 2: no invocations")


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("junk.parquet", b"PAR1 not really parquet PAR1", "not a readable parquet file"),
        ("junk.parquet", os.urandom(4096), "not a readable parquet file"),
        ("junk.csv", b"\x8c\xff\x00binary" * 100, "line 1, column 1: unrecognised header"),
    ],
)
def test_replay_of_a_file_that_is_neither_trace_nor_schedule(tmp_path, name, content, says):
    f = tmp_path / name
    f.write_bytes(content)
    one_error_line(replay(f, tmp_path), f"{f}: {says}")


def test_a_schedule_file_with_a_bad_value_names_its_line_and_column(tmp_path):
    sched = tmp_path / "s.csv"
    r = hearth(
        "replay",
        "--plan-only",
        "--target",
        "http://127.0.0.1:9",
        "--schedule-out",
        sched,
        AZURE,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    r = replay(sched, tmp_path)  # read back whole: the same schedule
    assert r.returncode == 0 and "schedule: 6 invocations" in r.stdout, r
    lines = sched.read_text().splitlines()
    seq, t, *rest = lines[2].split(",")
    (tmp_path / "bad.csv").write_text("\n".join([*lines[:2], ",".join([seq, "abc", *rest])]))
    one_error_line(
        replay(tmp_path / "bad.csv", tmp_path),
        f"{tmp_path / 'bad.csv'}: line 3, column 2 't': expected a number, got 'abc'",
    )
    f, *after = rest
    (tmp_path / "gap.csv").write_text("\n".join([*lines[:3], ",".join([seq, t, "", *after])]))
    one_error_line(
        replay(tmp_path / "gap.csv", tmp_path),
        f"{tmp_path / 'gap.csv'}: line 4, column 3 'function': missing value",
    )
