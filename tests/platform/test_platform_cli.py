"""The CLI against a running node: deploy from YAML, ls, invoke, rm; errors are one line."""

from __future__ import annotations

import os

from hearth_proc import run_cli


def hearth(h, *args, input=None):
    env = {
        **os.environ,
        "HEARTH_URL": h.url if h else "http://127.0.0.1:9",
        "HEARTH_ADMIN_TOKEN": h.client.token if h else "x",
    }
    return run_cli(args, env, input)


def test_cli_deploy_invoke_ls_rm(hearth_auto):
    r = hearth(hearth_auto, "deploy", "examples/hello.yaml")
    assert r.returncode == 0, r.stderr
    assert "deployed hello" in r.stdout
    r = hearth(hearth_auto, "invoke", "hello", "--data", '{"name": "CLI"}')
    assert r.returncode == 0 and "hello, CLI" in r.stdout
    r = hearth(hearth_auto, "ls")
    assert "hello" in r.stdout and "hearth.functions.examples.handlers:hello" in r.stdout
    r = hearth(hearth_auto, "invoke", "hello", "--async", "--data", "{}")
    assert r.returncode == 0 and len(r.stdout.strip()) >= 16
    r = hearth(hearth_auto, "status")
    assert r.returncode == 0 and "data plane" in r.stdout
    r = hearth(hearth_auto, "rm", "hello")
    assert r.returncode == 0
    r = hearth(hearth_auto, "invoke", "hello")
    assert r.returncode == 1 and r.stderr.startswith("error: 404 unknown_function")


def test_cli_user_function_from_code_path(hearth_auto):
    r = hearth(hearth_auto, "deploy", "examples/my_function.yaml")
    assert r.returncode == 0, r.stderr
    r = hearth(hearth_auto, "invoke", "wordcount", "--data", "the quick brown fox")
    assert r.returncode == 0 and '"words": 4' in r.stdout


def test_cli_invoke_verbose_says_cold_then_warm_on_stderr(hearth_auto):
    """`invoke -v`: the result on stdout as without it, and one line on stderr saying whether
    the call started an instance, which one served it, the handler's time and the round trip
    (the README's tour calls its first invoke a cold start; only this shows it)."""
    hearth_auto.deploy(name="cli-verbose", handler="hearth.functions.examples.handlers:hello")
    lines = []
    for _ in range(2):
        r = hearth(hearth_auto, "invoke", "cli-verbose", "-v", "--data", '{"name": "V"}')
        assert r.returncode == 0, r.stderr
        assert '"greeting": "hello, V"' in r.stdout and "#" not in r.stdout, r.stdout
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("# HTTP 200 · "), r.stderr
        lines.append(r.stderr)
    first, second = (ln.split(" · ") for ln in lines)
    assert first[1] == "cold start" and second[1] == "warm", lines
    assert first[2] == second[2] and first[2].startswith("instance "), lines  # the same one
    assert first[3].startswith("handler ") and first[4].startswith("round trip "), lines
    r = hearth(hearth_auto, "invoke", "cli-verbose", "--data", "{}")  # without -v: nothing
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhandler: nope\n")
    r = hearth(None, "deploy", str(bad))
    assert (
        r.returncode == 1
        and r.stderr.count("\n") == 1
        and "handler" in r.stderr
        and "Traceback" not in r.stderr
    )
    r = hearth(None, "ls")
    assert (
        r.returncode == 1 and "cannot reach the gateway" in r.stderr and "Traceback" not in r.stderr
    )
    r = hearth(None, "invoke", "x", "--data", "a", "--file", "b")
    assert r.returncode == 1 and "not both" in r.stderr


def test_coldstarts_export_is_read_by_the_trace_reader(hearth_auto, tmp_path):
    hearth_auto.deploy(name="cs-probe", handler="hearth.functions.examples.handlers:noop")
    hearth_auto.client.invoke("cs-probe", b"")
    out = tmp_path / "own.csv"
    r = hearth(hearth_auto, "coldstarts", "export", "--out", str(out))
    assert r.returncode == 0, r.stderr
    from hearth.functions.replay.readers import read_coldstarts

    df = read_coldstarts([out])
    row = df.filter(df["funcName"] == "cs-probe").row(0, named=True)
    parts = (
        row["podAllocationCost"]
        + row["deployCodeCost"]
        + row["deployDependencyCost"]
        + row["schedulingCost"]
    )
    assert (
        abs(row["totalCost_cold_start"] - parts) < 5e-6
    )  # the identity holds (CSV keeps 6 decimals)
    assert row["totalCost_cold_start"] > 0
    r = hearth(hearth_auto, "coldstarts", "export", "--format", "azure")
    assert r.returncode == 1 and "huawei" in r.stderr


def test_queue_commands_find_the_nodes_redis(hearth_auto):
    env = {k: v for k, v in os.environ.items() if k != "HEARTH_REDIS_URL"}
    env["HEARTH_STATE_DIR"] = str(hearth_auto.state)  # where `hearth up` wrote redis-url (0600)
    assert (hearth_auto.state / "redis-url").stat().st_mode & 0o077 == 0
    r = run_cli(["publish", "cli-test-stream", "--data", '{"k": 1}'], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["queues"], env)
    assert r.returncode == 0, r.stderr
