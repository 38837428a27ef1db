"""`make test`'s runner (scripts/run_tests.py): which pytest runs it starts for PYTEST_ARGS, and
that parts run for real, each streamed with its prefix and logged, and that either one
failing fails the whole."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_tests", ROOT / "scripts" / "run_tests.py")
rt = importlib.util.module_from_spec(_spec)
sys.modules["run_tests"] = rt  # dataclasses look their module up
_spec.loader.exec_module(rt)


def test_plan_splits_the_parts_off_unless_paths_are_named():
    parts = rt.plan(["-k", "vecsearch", "-m", "not slow"])
    assert [p.name for p in parts] == ["suite", "cluster", "functions"]
    suite, cluster, functions = parts
    assert "--ignore=tests/cluster" in suite.argv and "tests/cluster" not in suite.argv
    assert "--ignore=tests/security" in suite.argv and "--ignore=tests/functions" in suite.argv
    assert cluster.argv[-2:] == ["tests/cluster", "tests/security"]
    assert functions.argv[-3:] == ["tests/functions", "tests/charts", "tests/controller"]
    assert not any("--ignore" in a for p in (cluster, functions) for a in p.argv)
    # every test folder runs in exactly one part
    folders = sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name[0] != "_")
    ran = [d.split("/")[1] for p in parts[1:] for d in p.argv if d.startswith("tests/")]
    ignored = [a.split("=tests/")[1] for a in suite.argv if a.startswith("--ignore=")]
    assert sorted(ran) == sorted(ignored)
    assert set(folders) - set(ignored) and not set(ran) - set(folders)
    for p in parts:  # the user's options reach every part
        k = p.argv.index("-k")
        assert p.argv[k : k + 4] == ["-k", "vecsearch", "-m", "not slow"]
    for named in (["tests/functions"], ["-x", "tests/platform/test_config.py::test_x"]):
        one = rt.plan(named)
        assert len(one) == 1 and one[0].argv[-len(named) :] == named
        assert not any("--ignore" in a for a in one[0].argv)
    assert len(rt.plan([], serial=True)) == 1
    # pytest_cputime's HEARTH_CPUTIME_OUT: one file per part, never one written twice
    assert rt._per_part("/t/phases.jsonl", "cluster") == "/t/phases-cluster.jsonl"


def test_report_starts_at_the_first_section_coloured_or_not():
    log = "..F.  [100%]\n\x1b[31m=== FAILURES ===\x1b[0m\nboom\n=== 1 failed ===\n"
    assert rt.report(log).startswith("\x1b[31m=== FAILURES") and "..F." not in rt.report(log)
    assert rt.report("no sections\n") == "no sections\n"


def test_summary_is_pytests_closing_line_even_with_a_stray_message_after_it():
    closing = "297 passed, 2 warnings in 430.51s (0:07:10)"
    stray = (
        "Loop <_UnixSelectorEventLoop running=False closed=True> that handles pid 4947 is closed"
    )
    assert rt.summary(f"....\n{closing}\n{stray}\n") == closing
    assert (
        rt.summary("F.\n==== 1 failed, 1 passed in 2.00s ====\n") == "1 failed, 1 passed in 2.00s"
    )
    assert rt.summary("Traceback ...\nImportError: x\n") == "ImportError: x"
    assert rt.summary("") == "(no output)"


def test_combine_never_hides_a_failure():
    assert rt.combine([0, 0]) == 0
    assert rt.combine([0, 1]) == 1 and rt.combine([1, 0]) == 1
    assert rt.combine([2, 1]) == 2  # the first failure
    assert rt.combine([5, 0]) == 0  # one part selected nothing (-k), the other ran
    assert rt.combine([5, 5]) == 5
    assert rt.combine([5, 1]) == 1


def test_two_real_parts_stream_log_and_fail_together(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # two bare pytests start faster
    proj = tmp_path / "proj"
    (proj / "a").mkdir(parents=True)
    (proj / "b").mkdir()
    (proj / "a" / "test_a.py").write_text("def test_ok():\n    print('hello a')\n")
    (proj / "b" / "test_b.py").write_text("def test_bad():\n    assert 1 == 2, 'b broke'\n")
    logs = tmp_path / "logs"
    parts = [
        rt.Part("suite", ["-q", "-p", "no:cacheprovider", "a"]),
        rt.Part("cluster", ["-q", "-p", "no:cacheprovider", "b"]),
    ]
    assert rt.run(parts, cwd=proj, logdir=logs) == 1
    out = capfd.readouterr().out
    assert "[suite]   1 passed" in out and "[cluster] FAILED b/test_b.py::test_bad" in out
    assert "######## cluster failed (exit 1)" in out and "######## suite" not in out
    assert out.rstrip().splitlines()[-1].startswith("[cluster] exit 1: ")
    assert "1 passed" in (logs / "suite.log").read_text()
    assert "b broke" in (logs / "cluster.log").read_text()
