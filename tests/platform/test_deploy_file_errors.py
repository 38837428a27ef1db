"""`hearth deploy FILE` with a file that is not a spec: one `error:` line naming the file (and
the line or field), exit code 1, never a traceback. Run as the real CLI, in a child process;
every case fails before any request, so no node is needed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hearth_proc import run_cli


def deploy(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEARTH_URL": "http://127.0.0.1:9", "HEARTH_ADMIN_TOKEN": "x" * 16}
    return run_cli(["deploy", str(path)], env)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\xff\xfename: ok\nhandler: m:f\n", "line 1: not UTF-8 text (byte 0xff at offset 0)"),
        (b"name: ok\nhandler: m:f\nenv: {A: \xe9t\xe9}\n", "line 3: not UTF-8 text (byte 0xe9"),
    ],
)
def test_a_spec_file_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path, content, says):
    f = tmp_path / "fn.yaml"
    f.write_bytes(content)
    r = deploy(f)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {f}: {says}"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("field", ["claim_idle_s", "backoff_s", "backoff_max_s"])
@pytest.mark.parametrize("value", [".inf", "1e300", "86401"])
def test_a_stream_triggers_durations_are_at_most_a_day(tmp_path, field, value):
    # an infinite claim_idle_s was accepted, and the consumer's reclaim of a dead consumer's
    # entries then failed on every pass (Redis: invalid min-idle-time): events held forever
    f = tmp_path / "fn.yaml"
    f.write_text(
        "name: ok\nhandler: m:f\ntriggers:\n"
        f"  - type: redis-stream\n    stream: s\n    {field}: {value}\n"
    )
    r = deploy(f)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r
    says = "a finite number" if value == ".inf" else "less than or equal to 86400"
    assert r.stderr == (f"error: {f}: triggers.0.redis-stream.{field}: Input should be {says}\n"), (
        r.stderr
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("timeout_s", ".nan"), ("timeout_s", ".inf"), ("keep_alive", "{ttl_s: .nan}")]
    + [("keep_alive", "{ttl_s: .inf}"), ("keep_alive", "{ttl_s: -.inf}")],
)
def test_a_number_that_is_not_finite_is_refused_as_such(tmp_path, field, value):
    # a NaN timeout was refused as "less than or equal to 86400"; an infinite or NaN keep-alive
    # was taken (a NaN idle time is never reached: the function never scaled in)
    f = tmp_path / "fn.yaml"
    f.write_text(f"name: ok\nhandler: m:f\n{field}: {value}\n")
    r = deploy(f)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r
    where = field if field == "timeout_s" else "keep_alive.ttl_s"
    assert r.stderr == f"error: {f}: {where}: Input should be a finite number\n", r.stderr
