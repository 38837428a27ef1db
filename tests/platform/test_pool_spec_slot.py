"""Pool starts leave no spec slot behind, end to end (real node, warm pool, data plane, slot
pool): the runner records the slot it wrote each pool instance's spec into and the agent frees
it at the instance's report or its exit (#19). The slot is the agent's, which `reclaim_dead`
never frees: a slot not recorded stays in use for the agent's lifetime, one per start."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from hearth.client import ClientError
from joining import join_node
from realnode import wait_for
from test_pod_join import SPEC, instances, pod, pods_node  # noqa: F401  (a fixture)

H = "hearth.functions.examples.handlers"


def _post(h, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        h.url + path, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _pool_ready(h) -> None:
    h.wait(lambda: h.client.status().get("warm_pool_ready", 0) >= 1, 60, "a pooled instance")


def _used(client) -> int:
    return client.status()["pool"]["used"]


def _back_to(h, base: int) -> None:
    """The slot pool's use returns to `base` (replies and reports are freed asynchronously)."""
    try:
        h.wait(lambda: _used(h.client) <= base, 10, f"pool use back to {base}")
    except AssertionError:
        raise AssertionError(f"slots left in use: {_used(h.client)} > {base}") from None


def _from_pool(h, name: str) -> bool:
    recs = h.client.request("GET", "/v1/coldstarts", admin=True).json()["coldstarts"]
    return any(r["function"] == name and r.get("from_pool") for r in recs)


def test_pool_starts_that_become_ready_or_fail_leave_no_spec_slot(hearth_auto):
    h = hearth_auto
    _pool_ready(h)
    base = _used(h.client)
    for k in range(3):
        _pool_ready(h)
        h.deploy(name=f"specslot-ok-{k}", handler=f"{H}:hello")
        assert _post(h, f"/v1/functions/specslot-ok-{k}:invoke", b'{"name": "x"}')[0] == 200
        assert _from_pool(h, f"specslot-ok-{k}")
    for k in range(3):
        _pool_ready(h)
        h.deploy(name=f"specslot-bad-{k}", handler=f"{H}:no_such_handler")
        status, body = _post(h, f"/v1/functions/specslot-bad-{k}:invoke", b'{"name": "x"}')
        assert (status, body["error"]) == (502, "cold_start_failed")
    _back_to(h, base)


def test_pool_starts_whose_instance_ends_before_its_report_leave_no_spec_slot(
    hearth_auto, tmp_path
):
    """The instance exits during its import, or is stopped there (its function undeployed):
    it never reports, and its exit frees the spec slot."""
    h = hearth_auto
    (tmp_path / "specslot_exiter.py").write_text(
        "import os\nos._exit(3)\ndef f(e):\n    return 1\n"
    )
    (tmp_path / "specslot_slow.py").write_text(
        "import time\ntime.sleep(3)\ndef f(e):\n    return 1\n"
    )
    _pool_ready(h)
    base = _used(h.client)
    for k in range(2):
        _pool_ready(h)
        h.deploy(name=f"specslot-exit-{k}", handler="specslot_exiter:f", code_path=str(tmp_path))
        assert _post(h, f"/v1/functions/specslot-exit-{k}:invoke", b"{}")[0] >= 500
    _pool_ready(h)
    h.deploy(name="specslot-slow", handler="specslot_slow:f", code_path=str(tmp_path))
    call = threading.Thread(target=_post, args=(h, "/v1/functions/specslot-slow:invoke", b"{}"))
    call.start()
    try:
        h.wait(lambda: _used(h.client) > base, 10, "the spec slot written")
        h.client.request("DELETE", "/v1/functions/specslot-slow", admin=True)  # raises if refused
    finally:
        call.join(30)
    _back_to(h, base)


def test_a_pool_pod_specialised_leaves_no_spec_slot(pods_node, tmp_path):  # noqa: F811
    node = pods_node
    ready = tmp_path / "ready-pool"
    p = pod(node.sock_dir, "specslot-pool-pod", None, ready)
    try:
        wait_for(ready.exists, 60, "the pool pod joined")
        base = _used(node.client)
        node.client.deploy({**SPEC, "name": "specslot-pod"})
        r = node.client.invoke("specslot-pod", b'{"name": "pooled"}', "application/json")
        assert r.status == 200
        assert "specslot-pool-pod" in [i["id"] for i in instances(node, "specslot-pod")]
        try:
            wait_for(lambda: _used(node.client) <= base, 10, "pool use back to its baseline")
        except AssertionError:
            raise AssertionError(f"slots in use: {_used(node.client)} > {base}") from None
    finally:
        p.kill()
        p.wait()


def test_a_pool_pod_killed_in_its_import_keeps_its_slots_until_it_has_ended(tmp_path, redis_url):
    """A pool pod is specialised for a function whose import outlasts the start's bound (here
    8 s: HEARTH_START_TIMEOUT_S and the function's timeout_s; 30 s by default):
    the agent kills the pod, in its import, and its call fails. Its process is stopped there
    (SIGSTOP), as a runtime busy in an import may not act on the kill at once: the agent keeps
    the slots it gave it (its spec's, its call's request) while the process lives, and frees
    them once it has ended (SIGCONT: the runtime reads the kill, an EOF on its join
    connection, and exits by itself). Before 7 Dec 2026 the agent closed the join connection and
    freed them at once, while the pod could still write its ready report into the spec slot
    (reused meanwhile) or a reply into the request's: this test failed at `held`."""
    env = {"HEARTH_INSTANCES": "pods", "HEARTH_START_TIMEOUT_S": "8"}
    node = join_node(tmp_path, redis_url, env, warm_pool=1)  # (`pods_node`, a shorter bound)
    started = tmp_path / "podkill_slow.py.importing"
    (tmp_path / "podkill_slow.py").write_text(
        "import pathlib, time\npathlib.Path(__file__ + '.importing').touch()\ntime.sleep(90)\n"
        "def f(e):\n    return 1\n"
    )
    ready = tmp_path / "ready-pool"
    p = pod(node.sock_dir, "podkill-pool-pod", None, ready)
    got: list[int] = []

    def invoke() -> None:
        try:
            got.append(node.client.invoke("podkill", b"{}", "application/json").status)
        except ClientError as e:
            got.append(e.status)

    call = threading.Thread(target=invoke)
    try:
        wait_for(ready.exists, 60, "the pool pod joined")
        base = _used(node.client)
        spec = {**SPEC, "name": "podkill", "handler": "podkill_slow:f", "timeout_s": 8}
        node.client.deploy({**spec, "code_path": str(tmp_path)})
        call.start()
        wait_for(started.exists, 30, "the pod in its import")
        os.kill(p.pid, signal.SIGSTOP)
        wait_for(
            lambda: "killing instance podkill-pool-pod" in node.log_path.read_text(),
            60,
            "the agent's kill (the start's bound)",
        )
        held = []
        for _ in range(10):
            held.append(_used(node.client) - base)
            time.sleep(0.1)
        assert p.poll() is None
        assert min(held) >= 2, f"slots freed under a pod still alive: {held} over the baseline"
        os.kill(p.pid, signal.SIGCONT)
        assert p.wait(10) == 0  # it read the kill (EOF) and exited
        call.join(30)
        assert got and got[0] >= 500
        try:
            wait_for(lambda: _used(node.client) <= base, 10, "pool use back to its baseline")
        except AssertionError:
            raise AssertionError(f"slots in use: {_used(node.client)} > {base}") from None
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait()
        if call.is_alive():
            call.join(30)
        node.stop()
