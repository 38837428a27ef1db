"""`hearth fl`: simulate end to end; round start/status/close/fetch over real HTTP against a
loopback aiohttp server exposing the platform's invoke route in front of the real handlers."""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np
import pytest
from aiohttp import web
from click.testing import Result
from hearth.functions.fedavg import client, handlers
from hearth.functions.fedavg.cli import app
from hearth.functions.fedavg.localhost import LocalHost
from hearth.functions.fedavg.tree import plan_tree
from typer.testing import CliRunner

runner = CliRunner()


def test_simulate_checks_against_exact_fedavg_with_stragglers_and_bad_updates():
    r = runner.invoke(
        app,
        [
            "simulate",
            "--clients",
            "7",
            "--params",
            "3000",
            "--layers",
            "3",
            "--nodes",
            "2",
            "--fan-in",
            "2",
            "--stragglers",
            "1",
            "--bad",
            "1",
            "--rounds",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert out.count("check vs exact FedAvg (float64)") == 2 and "MISMATCH" not in out
    assert "1 rejected" in out and "deadline passed with 6/7 updates" in out
    assert "late update refused" in out
    assert "round 1 leaf" in out and "round 2 top" in out


def test_simulate_fp16_and_one_level():
    r = runner.invoke(
        app,
        [
            "simulate",
            "--clients",
            "3",
            "--params",
            "500",
            "--layers",
            "2",
            "--nodes",
            "1",
            "--fan-in",
            "4",
            "--dtype",
            "float16",
            "--rounds",
            "1",
            "--no-shm",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "dtype float16" in " ".join(r.output.split())


@pytest.mark.parametrize(
    "args, msg",
    [
        (["simulate", "--dtype", "int8"], "--dtype"),
        (["simulate", "--clients", "2", "--stragglers", "2"], "--stragglers"),
        (["plan", "--nodes", "a=x"], "--nodes: count for 'a'"),
        (["plan", "--clients", "3", "--fan-in", "1"], "fan_in"),
        (["plan", "--clients", "3", "--levels", "5"], "levels"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, msg):
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert r.output.strip().startswith("error:") and msg in r.output and "Traceback" not in r.output


def test_plan_writes_specs(tmp_path):
    r = runner.invoke(
        app, ["plan", "--nodes", "a=9,b=4", "--fan-in", "3", "--specs-dir", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert "fedavg-top.yaml" in files and len(files) == len(
        plan_tree({"a": 9, "b": 4}, fan_in=3).roles
    )


@pytest.fixture
def gateway():
    """aiohttp on loopback: POST /v1/functions/{name}:invoke -> the handlers (LocalHost)."""
    plan = plan_tree({"n0": 4, "n1": 2}, fan_in=2, levels=3)
    host = LocalHost(plan.function_specs(model_bytes=1 << 20))

    async def invoke(request: web.Request) -> web.Response:
        body = await request.read()
        res = host.invoke(request.match_info["name"], body, request.content_type)
        if res.status >= 400:
            return web.Response(status=res.status, body=res.body, content_type="application/json")
        return web.Response(
            status=res.status,
            body=res.body,
            headers={"Content-Type": res.content_type, **res.headers},
        )

    webapp = web.Application(client_max_size=1 << 30)
    webapp.router.add_post("/v1/functions/{name}:invoke", invoke)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner_ = web.AppRunner(webapp)
    loop.run_until_complete(runner_.setup())
    loop.run_until_complete(web.SockSite(runner_, sock).start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}", plan
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    loop.run_until_complete(runner_.cleanup())
    loop.close()
    host.close()
    handlers.STATE.clear()


def test_round_start_status_close_fetch_over_http(gateway, tmp_path):
    url, plan = gateway
    pf = tmp_path / "plan.json"

    def fl_round(*args: str) -> Result:
        """`hearth fl round ARGS` against the loopback gateway: every round command names the
        same --gateway and --plan-file."""
        return runner.invoke(app, ["round", *args, "--gateway", url, "--plan-file", str(pf)])

    r = fl_round("start", "1", "--nodes", "n0=4,n1=2", "--fan-in", "2", "--levels", "3")
    assert r.exit_code == 0, r.output
    assert "round 1 open on" in r.output and ":invoke" in r.output
    rng = np.random.default_rng(0)
    ups = []
    for node, k in (("n0", 4),):  # n1's first client comes through the CLI, its second straggles
        for i in range(k):
            m = [
                ("w", rng.uniform(1, 2, (8, 3)).astype(np.float32)),
                ("b", rng.uniform(1, 2, 3).astype(np.float32)),
            ]
            n = int(rng.integers(1, 100))
            ups.append((m, n))
            client.submit(url, plan.leaf_for(node, i).instance, m, n, 1, f"{node}-{i}")
    # one more update through the CLI (as a trainer would), then its resubmission
    extra = tmp_path / "u.npz"
    np.savez(extra, w=np.full((8, 3), 1.5, np.float32), b=np.full(3, 1.5, np.float32))
    submit_extra = ("submit", "1", "--model", str(extra), "--samples", "10", "--client", "cli-1")
    r = fl_round(*submit_extra, "--node", "n1", "--index", "0")
    assert r.exit_code == 0, r.output
    assert "cli-1 -> fedavg-leaf-1-0: folded 1/2" in r.output
    ups.append(([("w", np.full((8, 3), 1.5, np.float32)), ("b", np.full(3, 1.5, np.float32))], 10))
    r = fl_round(*submit_extra, "--node", "n1", "--index", "0")
    assert r.exit_code == 0 and "duplicate" in r.output
    r = fl_round(
        "submit", "1", "--model", str(tmp_path / "none.npz"), "--samples", "1", "--client", "x"
    )
    assert r.exit_code == 1 and r.output.startswith("error: --model")
    r = fl_round("status")
    assert r.exit_code == 0, r.output
    assert "leaf" in r.output and "5/6" in r.output
    fetch = ("fetch", "1", "-o", str(tmp_path / "m.npz"))
    r = fl_round(*fetch)
    assert r.exit_code == 1 and "HTTP 404" in r.output
    r = fl_round("close", "1")
    assert r.exit_code == 0, r.output
    r = fl_round(*fetch)
    assert r.exit_code == 0, r.output
    got = np.load(tmp_path / "m.npz")
    total = sum(n for _, n in ups)
    for name in ("w", "b"):
        want = sum(dict(m)[name].astype(np.float64) * n for m, n in ups) / total
        np.testing.assert_allclose(got[name], want, rtol=1e-5)
    # a late update after the round closed is refused with the reason
    with pytest.raises(client.GatewayError, match="HTTP 409.*late update"):
        client.submit(url, plan.leaf_for("n1", 1).instance, ups[0][0], 3, 1, "late")


def test_unreachable_gateway_is_a_clear_error(tmp_path):
    pf = tmp_path / "p.json"
    r = runner.invoke(
        app,
        [
            "round",
            "start",
            "1",
            "--clients",
            "2",
            "--gateway",
            "http://127.0.0.1:9",
            "--plan-file",
            str(pf),
        ],
    )
    assert r.exit_code == 1
    assert "error: cannot reach the gateway at http://127.0.0.1:9" in r.output
    r = runner.invoke(app, ["round", "status", "--plan-file", str(tmp_path / "none.json")])
    assert r.exit_code == 1 and "no plan file" in r.output
