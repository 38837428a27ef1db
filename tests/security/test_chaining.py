"""H5, M4, M6, M7: calls between functions on one node.

A chained call lends the caller's slot without letting the callee write into it; the callee's
invoke token applies; the agent times chained calls out; descriptors carry the sender's real id, so
a function cannot hand work to another one while posing as the agent; two invocations that share an
invocation id get their own replies; M5: a reply outlives the instance that made it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hearth.config import Settings
from hearth.redis_server import free_port
from hearth.spec import FunctionSpec
from hearth.up import Platform
from sec_helpers import HERE, deploy


def _call(node, name: str, body: dict) -> dict:
    return node.client.invoke(name, json.dumps(body).encode(), "application/json").json()


def test_chained_call_leaves_the_callers_payload_alone(private_node):
    deploy(private_node, "upper", "upper")
    deploy(private_node, "twice", "chain_twice", concurrency=2)
    r = private_node.client.invoke("twice", b"hello hearth").json()
    assert r == {
        "original": "hello hearth",
        "first": "HELLO HEARTH",
        "second": "HELLO HEARTH",
        "payload_after": "hello hearth",
    }


def test_chained_call_needs_the_targets_invoke_token(private_node):
    deploy(private_node, "vault", "size", invoke_token="vault-invoke-token")
    deploy(private_node, "caller", "chain_to", concurrency=2)
    assert _call(private_node, "caller", {"target": "vault"})["status"] == 401
    wrong = _call(private_node, "caller", {"target": "vault", "token": "not-the-token"})
    assert wrong["status"] == 403
    ok = _call(private_node, "caller", {"target": "vault", "token": "vault-invoke-token"})
    assert ok["status"] == 200 and json.loads(ok["body"]) == {"bytes": 1}


def test_chained_call_times_out_at_the_agent(private_node):
    private_node.client.deploy(
        {
            "name": "stuck",
            "handler": "hearth.functions.examples.handlers:sleep",
            "timeout_s": 1,
        }
    )
    deploy(private_node, "waiter", "chain_to", concurrency=2, timeout_s=60)
    quick = {"target": "stuck", "body": '{"seconds": 0}', "ctype": "application/json"}
    assert _call(private_node, "waiter", quick)["status"] == 200  # both started: no cold start
    t0 = time.monotonic()  # in the time below
    r = _call(
        private_node,
        "waiter",
        {"target": "stuck", "body": '{"seconds": 20}', "ctype": "application/json"},
    )
    assert r["status"] == 504, r
    assert time.monotonic() - t0 < 15  # the callee's 1 s timeout, not its 20 s of sleep


def test_a_function_cannot_pose_as_the_agent(private_node, tmp_path):
    marker = tmp_path / "victim-calls"
    marker.write_text("")
    deploy(private_node, "victim", "marker", env={"MARKER_FILE": str(marker)}, min_instances=1)
    deploy(private_node, "forger", "forge")
    for _ in range(100):  # the victim's instance is up and registered
        if private_node.client.status()["functions"]["victim"]["instances"]:
            break
        time.sleep(0.1)
    assert private_node.client.invoke("victim", b"real").status == 200
    assert private_node.client.invoke("forger", b"").json()["sent"] > 0
    time.sleep(1.0)  # a forged call, if served, would be written by now
    assert marker.read_text().split() == ["real"]
    assert private_node.client.invoke("victim", b"again").status == 200  # still serving


@pytest.mark.parametrize("n", [8])
async def test_invocations_sharing_an_id_get_their_own_replies(redis_url, tmp_path, n):
    s = Settings(
        port=free_port(),
        redis_url=redis_url,
        state=tmp_path / "state",
        dataplane_mode="unix",
        admin_token="shared-id-token-0123456789",
    )
    spec = FunctionSpec.model_validate(
        {
            "name": "upper",
            "handler": "sec_handlers:upper",
            "code_path": str(HERE),
            "concurrency": n,
            "max_instances": 1,
        }
    )
    async with Platform(s, deploy=[spec]) as p:
        assert p.agent is not None
        same = "5f0c4e1a-0000-4000-8000-000000000001"  # e.g. one stream entry delivered twice
        bodies = [f"event-{i}".encode() for i in range(n)]
        outs = await asyncio.gather(
            *(p.agent.invoke("upper", b, invocation_id=same, timeout=20) for b in bodies)
        )
        assert [o.body for o in outs] == [b.upper() for b in bodies]


def test_a_clients_short_timeout_does_not_kill_the_instance(private_node):
    """?timeout= shorter than the function's own: the client gets its 504, the instance lives
    on (else any client could stop instances at will) and its capacity comes back."""
    from hearth.client import ClientError

    private_node.client.deploy(
        {
            "name": "napper",
            "handler": "hearth.functions.examples.handlers:sleep",
            "max_instances": 1,
            "timeout_s": 30,
        }
    )
    first = private_node.client.invoke("napper", b'{"seconds": 0}', "application/json").json()
    with pytest.raises(ClientError) as e:
        private_node.client.invoke("napper", b'{"seconds": 1}', "application/json", timeout=0.2)
    assert e.value.status == 504
    after = private_node.client.invoke("napper", b'{"seconds": 0}', "application/json").json()
    assert after["pid"] == first["pid"]  # the same instance, not a replacement
    with pytest.raises(ClientError) as e:
        private_node.client.invoke("napper", b"{}", "application/json", timeout=0.001)
    assert e.value.status == 400  # below the minimum: it could only ever time out


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_reply_survives_its_instance_exiting_before_the_agent_reads_it(private_node, tmp_path):
    """M5, made deterministic: the handler stops the agent (SIGSTOP), replies and exits; with
    the instance gone, dead processes' slots are reclaimed (what the agent does when it sees an
    exit, or every few seconds) before the agent, resumed, reads the reply. The client gets the
    handler's 200: the reply slot was handed to the agent before it was sent."""
    import os
    import signal
    import threading

    from hearth.dataplane.shm import SlotPool

    deploy(private_node, "quitter", "reply_then_exit")
    deploy(private_node, "upper", "upper")
    agent = private_node.proc.pid
    pid_file = tmp_path / "instance.pid"
    out: dict = {}

    def call() -> None:
        try:
            body = {"agent": agent, "pid_file": str(pid_file)}
            r = private_node.client.request(
                "POST",
                "/v1/functions/quitter:invoke",
                json.dumps(body).encode(),
                content_type="application/json",
                ok=tuple(range(100, 600)),
            )
            out["status"], out["body"] = r.status, r.body
        except Exception as e:  # reported by the assert below
            out["error"] = repr(e)

    t = threading.Thread(target=call)
    t.start()
    try:
        for _ in range(600):  # the handler has stopped the agent and its instance has exited
            if pid_file.exists() and pid_file.read_text():
                pid = int(pid_file.read_text())
                if _proc_state(agent) == "T" and _proc_state(pid) in (None, "Z"):
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"agent state {_proc_state(agent)}, instance pid file {pid_file.exists()}")
        port = private_node.url.rsplit(":", 1)[1]
        pool = SlotPool.attach(f"hearth-local-{port}")
        try:
            pool.reclaim_dead()  # the dead instance's slots are freed before the agent reads
        finally:
            pool.close()
    finally:
        os.kill(agent, signal.SIGCONT)
        t.join(60)
    assert out.get("status") == 200, out
    assert json.loads(out["body"]) == {"answer": 42}
    # the agent took the instance's death in its stride: the node serves on
    assert private_node.client.invoke("upper", b"still here").body == b"STILL HERE"


def test_a_request_slot_lent_to_a_chained_call_outlives_its_callers_timeout(private_node, tmp_path):
    """A caller lends its own request slot to a chained call (`ctx.invoke(g, event.payload)`),
    then overruns its timeout and is killed, while the callee still reads the slot. The slot
    stays allocated until the chained call is over: calls of another function made meanwhile
    get other slots, and the callee reads the caller's bytes, never theirs (the slot was freed
    at the caller's exit and handed to the next request: the callee read another function's
    payload)."""
    from concurrent.futures import ThreadPoolExecutor

    from hearth.client import ClientError

    marker = tmp_path / "read-by-callee"
    marker.write_text("")
    deploy(
        private_node,
        "slow-reader",
        "slow_reader",
        env={"MARKER_FILE": str(marker), "READ_AFTER_S": "3"},
        timeout_s=30,
    )
    deploy(private_node, "lender", "lend_slowly", timeout_s=1)
    private_node.client.deploy(
        {
            "name": "holder",
            "handler": "hearth.functions.examples.handlers:sleep",
            "concurrency": 8,
            "timeout_s": 30,
        }
    )
    assert private_node.client.invoke("holder", b'{"seconds": 0}', "application/json").status == 200
    assert private_node.client.invoke("slow-reader", b"warm").status == 200  # up and warm
    secret = json.dumps({"seconds": 5, "pad": "SECRET-OF-ANOTHER-FUNCTION"}).encode()
    with ThreadPoolExecutor(8) as pool:
        with pytest.raises(ClientError) as e:
            private_node.client.invoke("lender", b"lent-by-the-caller")
        assert e.value.status == 504  # the lender is killed; the callee reads on for ~2 s
        time.sleep(0.3)  # its exit handled
        held = [
            pool.submit(private_node.client.invoke, "holder", secret, "application/json")
            for _ in range(8)
        ]
        for _ in range(100):
            if marker.read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        assert all(f.result().status == 200 for f in held)
    lines = marker.read_text().splitlines()
    assert "SECRET" not in marker.read_text(), lines
    assert lines[-1] == "lent-by-the-caller", lines
