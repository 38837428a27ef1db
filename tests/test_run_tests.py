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


def test_a_terminated_runner_started_with_sigint_ignored_still_tears_its_parts_down(tmp_path):
    """A runner started in the background (SIGINT ignored, inherited by its children) and then
    terminated: its parts get the SIGINT it passes on and run their teardown, instead of being
    killed at GRACE_S (before: the part slept on, ignoring it)."""
    import os
    import signal
    import subprocess
    import time

    proj = tmp_path / "proj"
    (proj / "a").mkdir(parents=True)
    started, torn = tmp_path / "started", tmp_path / "torn-down"
    (proj / "a" / "test_a.py").write_text(
        "import pathlib, time, pytest\n"
        "@pytest.fixture\n"
        "def held():\n"
        "    yield\n"
        f"    pathlib.Path({str(torn)!r}).touch()\n"
        "def test_sleeps(held):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(120)\n"
    )
    code = (
        "import signal, sys, importlib.util\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job is started\n"
        f"spec = importlib.util.spec_from_file_location('run_tests', {str(ROOT / 'scripts' / 'run_tests.py')!r})\n"
        "rt = importlib.util.module_from_spec(spec); sys.modules['run_tests'] = rt\n"
        "spec.loader.exec_module(rt)\n"
        "parts = [rt.Part(n, ['-q', '-p', 'no:cacheprovider', 'a']) for n in ('one', 'two')]\n"
        f"sys.exit(rt.run(parts, cwd=rt.Path({str(proj)!r}), logdir=rt.Path({str(tmp_path / 'logs')!r})))\n"
    )
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    runner = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its group: the runner and its parts, ended together below
    )
    try:
        t0 = time.monotonic()
        while not started.exists():
            assert runner.poll() is None and time.monotonic() - t0 < 60, "the parts never started"
            time.sleep(0.05)
        time.sleep(0.5)  # (both parts in their test)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(60) == 130  # well before GRACE_S (120 s): the parts stopped
        assert torn.exists()  # and ran their fixtures' teardown
    finally:
        try:  # a failed run: no part left sleeping
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        runner.wait()
