"""`hearth publish`, `hearth queues`, `hearth dlq ...` against the real redis-server."""

from __future__ import annotations

import json

import msgpack
from hearth.cli import app
from typer.testing import CliRunner

cli = CliRunner()


def run(*args: str, input: str | None = None):
    return cli.invoke(app, list(args), input=input)


def test_publish_json_file_and_errors(redis_url, redis_client, tmp_path):
    res = run(
        "publish",
        "orders",
        "--data",
        '{"sku": "A1", "qty": 2}',
        "-H",
        "tenant=acme",
        "--redis",
        redis_url,
    )
    assert res.exit_code == 0, res.output
    eid = res.output.strip()
    ((got, f),) = redis_client.xrange("orders")
    assert got.decode() == eid and msgpack.unpackb(f[b"d"]) == {"sku": "A1", "qty": 2}
    assert msgpack.unpackb(f[b"m"])["headers"] == {"tenant": "acme"}
    p = tmp_path / "blob.bin"
    p.write_bytes(b"\x00\x01")
    res = run("publish", "orders", "--file", str(p), "--count", "2", "--redis", redis_url)
    assert res.exit_code == 0 and len(res.output.split()) == 2
    assert redis_client.xrange("orders")[-1][1][b"ct"] == b"application/octet-stream"
    res = run("publish", "orders", "--data", "hi", "--raw", "--redis", redis_url)
    assert res.exit_code == 0 and redis_client.xrange("orders")[-1][1][b"d"] == b"hi"

    for args, msg in [
        (["--data", "{oops"], "error: --data: not valid JSON"),
        (["--data", "1", "--file", "x"], "error: give exactly one of --data or --file"),
        (["--file", str(tmp_path / "missing")], "error: --file: cannot read"),
    ]:
        res = run("publish", "orders", *args, "--redis", redis_url)
        assert res.exit_code == 1 and res.output.startswith(msg), res.output
    res = run("publish", "bad name", "--data", "1", "--redis", redis_url)
    assert res.exit_code == 1 and "error: stream name 'bad name' is invalid" in res.output
    res = run("publish", "x", "--data", "1", "--redis", "redis://127.0.0.1:1/0")
    assert res.exit_code == 1 and res.output.startswith("error: cannot reach Redis")
    assert "Traceback" not in res.output


def test_queues_and_dlq_commands(redis_url, redis_client):
    redis_client.xgroup_create("orders", "hearth-shop", id="0", mkstream=True)
    redis_client.xadd("orders", {"d": msgpack.packb(1)})
    dead = {
        b"error": b"status 500: ValueError: nope",
        b"kind": b"failed",
        b"deliveries": b"5",
        b"function": b"shop",
        b"source_stream": b"orders",
        b"source_group": b"hearth-shop",
        b"source_id": b"1-0",
        b"failed_at": b"0",
        b"fields": msgpack.packb({b"d": msgpack.packb({"n": 9})}),
    }
    dl_id = redis_client.xadd("orders:dlq", dead).decode()
    res = run("queues", "--redis", redis_url)
    assert res.exit_code == 0, res.output
    header, row = res.output.splitlines()[:2]
    assert header.split()[:7] == ["STREAM", "GROUP", "FUNCTION", "LENGTH", "PENDING", "LAG", "DEAD"]
    assert row.split()[:7] == ["orders", "hearth-shop", "-", "1", "0", "1", "1"]
    res = run("queues", "--json", "--redis", redis_url)
    assert json.loads(res.output.splitlines()[0])["backlog"] == 1

    res = run("dlq", "ls", "orders", "--redis", redis_url)
    assert res.exit_code == 0 and "orders:dlq: 1 dead letter(s)" in res.output
    assert (
        "ValueError: nope" in res.output
        and '{"n": 9}' in res.output
        and "deliveries=5" in res.output
    )
    res = run("dlq", "replay", "orders", "--id", "9-9", "--redis", redis_url)
    assert res.exit_code == 1 and "error: no entry '9-9'" in res.output
    res = run("dlq", "replay", "orders:dlq", "--redis", redis_url)
    assert res.exit_code == 0 and f"{dl_id} -> " in res.output
    assert redis_client.xlen("orders") == 2 and redis_client.xlen("orders:dlq") == 0
    assert msgpack.unpackb(redis_client.xrange("orders")[-1][1][b"d"]) == {"n": 9}
    redis_client.xadd("orders:dlq", dead)
    res = run("dlq", "purge", "orders", "--redis", redis_url, input="n\n")
    assert res.exit_code == 1 and redis_client.xlen("orders:dlq") == 1
    res = run("dlq", "purge", "orders", "--yes", "--redis", redis_url)
    assert res.exit_code == 0 and "purged 1" in res.output and not redis_client.exists("orders:dlq")


def test_redis_url_from_environment(redis_url, redis_client, monkeypatch):
    monkeypatch.setenv("HEARTH_REDIS_URL", redis_url)
    assert run("publish", "e", "--data", "[1]").exit_code == 0
    assert redis_client.xlen("e") == 1
    monkeypatch.delenv("HEARTH_REDIS_URL")
    res = run("queues")
    assert res.exit_code == 1 and "error: no Redis configured" in res.output


def test_dlq_bad_input_is_one_line_not_a_traceback(redis_url, redis_client):
    import subprocess
    import sys

    redis_client.xadd("orders:dlq", {"error": "x", "deliveries": "not-a-number", "failed_at": "?"})

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "hearth.cli", *args, "--redis", redis_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = run("dlq", "ls", "orders")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for args in (
        ("dlq", "replay", "orders", "--id", "bogus"),
        ("dlq", "purge", "orders", "--id", "bogus", "-y"),
    ):
        r = run(*args)
        assert (
            r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
        ), r.stderr
        assert r.stderr.count("\n") == 1
