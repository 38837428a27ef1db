"""The whole serving path on "Kubernetes", with only the API server emulated: the controller
(watching the emulator) syncs a Function into the registry a real node agent (`hearth up`,
HEARTH_INSTANCES=pods) serves from; a request at zero is held by the agent, whose published
load makes the controller create an instance pod; a stand-in kubelet runs each pod's command
(`python -m hearth.runtime.pod`) as a real process that joins the agent over the node socket;
the held request is then answered over the data plane. With no load the pod is removed again,
and when no pod can be created the held request gets a clear 503."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hearth.client import ClientError
from hearth.controller.crd import PLURAL
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s import KubernetesController
from hearth.controller.k8s.pods import LABEL_FUNCTION
from hearth.controller.k8s.refs import READABLE_LABEL
from hearth.controller.k8s.registry_sync import LoadReader, RegistrySync
from hearth.localnode import start_node
from k8s_client import create_function
from k8s_emulator import Emulator
from kubernetes import client
from realnode import wait_for


class Kubelet:
    """Runs each pod bound to the node as the process its manifest names, with its env (the
    hostPath socket dir mapped to this test's directory); a pod is Ready when the runtime's
    ready file exists; a deleted pod's process gets SIGTERM (then SIGKILL)."""

    def __init__(self, emu: Emulator, node: str, sock_dir: Path, tmp: Path) -> None:
        self.emu, self.node, self.sock_dir, self.tmp = emu, node, sock_dir, tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.stop = threading.Event()
        emu.ready = lambda pod: (self.tmp / pod["metadata"]["name"] / "registered").exists()
        self.t = threading.Thread(target=self._loop, daemon=True)

    def _env(self, pod: dict) -> dict[str, str] | None:
        (c,) = pod["spec"]["containers"]
        env = {**os.environ}
        for e in c["env"]:
            vf = e.get("valueFrom") or {}
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "fieldRef" in vf:
                assert vf["fieldRef"]["fieldPath"] == "metadata.name"
                env[e["name"]] = pod["metadata"]["name"]
            else:  # a Secret/ConfigMap key, read when the container is created
                kind, ref = (
                    ("secrets", vf["secretKeyRef"])
                    if "secretKeyRef" in vf
                    else ("configmaps", vf["configMapKeyRef"])
                )
                data = (self.emu.objects(kind).get(ref["name"]) or {}).get("data") or {}
                if ref["key"] in data:
                    v = data[ref["key"]]
                    env[e["name"]] = base64.b64decode(v).decode() if kind == "secrets" else v
                elif not ref.get("optional"):
                    return None  # CreateContainerConfigError: the container is not created
        assert c["command"] == ["python", "-m", "hearth.runtime.pod"]
        assert env["HEARTH_NODE_SOCKET_DIR"] == "/run/hearth"  # the mount: mapped here
        env["HEARTH_NODE_SOCKET_DIR"] = str(self.sock_dir)
        env["HEARTH_READY_FILE"] = str(self.tmp / pod["metadata"]["name"] / "registered")
        return env

    def _loop(self) -> None:
        while not self.stop.is_set():
            pods = self.emu.objects("pods")
            for name, pod in pods.items():
                if pod["spec"].get("nodeName") == self.node and name not in self.procs:
                    env = self._env(pod)
                    if env is None:
                        continue
                    self.procs[name] = subprocess.Popen(
                        [sys.executable, "-m", "hearth.runtime.pod"],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
            for name, p in list(self.procs.items()):
                if name not in pods and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            self.emu.kubelet_sync()
            self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.t.join(5)
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()


# how long the agent holds a request for a pod to join (HEARTH_POD_JOIN_TIMEOUT): ample for
# the stand-in kubelet's pod processes to start and join on a loaded machine
JOIN_TIMEOUT_S = 20
# where no pod can ever join, the held request's 503 comes only at that bound: a short one
NO_POD_JOIN_TIMEOUT_S = 4


@pytest.fixture
def cluster(tmp_path, redis_url):
    yield from _cluster(tmp_path, redis_url, JOIN_TIMEOUT_S)


@pytest.fixture
def cluster_without_pods(tmp_path, redis_url):
    """`cluster` whose agent holds a request at most NO_POD_JOIN_TIMEOUT_S for a pod to join."""
    yield from _cluster(tmp_path, redis_url, NO_POD_JOIN_TIMEOUT_S)


def _cluster(tmp_path, redis_url, join_timeout_s: float):
    sock_dir = tmp_path / "node-socket"
    node = start_node(
        tmp_path / "agent",
        redis_url=redis_url,
        dataplane="unix",
        env={
            "HEARTH_NODE_SOCKET_DIR": str(sock_dir),
            "HEARTH_INSTANCES": "pods",
            "HEARTH_NODE": "node-a",
            "HEARTH_POD_JOIN_TIMEOUT": str(join_timeout_s),
        },
    )
    emu = Emulator(nodes=[("node-a", "4", "8Gi")]).start()
    kubelet = Kubelet(emu, "node-a", sock_dir, tmp_path / "pods")
    kubelet.t.start()
    api = emu.api_client()
    ctl = KubernetesController(
        api,
        "default",
        core=DecisionCore(stable_window_s=3, panic_window_s=1, scale_to_zero_grace_s=2),
        resync_s=0.3,
        watch_timeout_s=2,
        registry=RegistrySync(redis_url, "default"),
        loads=LoadReader(redis_url, max_age_s=0.2),
    )
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    t.start()
    yield node, emu, api, ctl
    stop.set()
    t.join(15)
    kubelet.close()
    api.close()
    emu.stop()
    node.stop()


def instance_pods(emu, fn):
    return [
        p for p in emu.objects("pods").values() if p["metadata"]["labels"].get(LABEL_FUNCTION) == fn
    ]


def create(api, name, **extra):
    spec = {
        "handler": "hearth.functions.examples.handlers:hello",
        "max_instances": 2,
        "timeout_s": 60,
        # kept 5 s after use: long enough for status to show it Ready, short for the test
        "keep_alive": {"ttl_s": 5},
        **extra,
    }
    create_function(api, name, spec)


def test_request_at_zero_starts_a_pod_that_joins_and_answers(cluster):
    node, emu, api, ctl = cluster
    create(api, "hello")
    wait_for(
        lambda: any(f["name"] == "hello" for f in node.client.functions()), 60, "registry sync"
    )
    assert instance_pods(emu, "hello") == []  # at zero
    r = node.client.invoke("hello", b'{"name": "zero"}', "application/json", timeout=60)
    assert r.status == 200 and "zero" in r.body.decode()
    (pod,) = instance_pods(emu, "hello")
    inst = node.client.status()["functions"]["hello"]["instances"]
    assert [i["id"] for i in inst] == [pod["metadata"]["name"]] and inst[0]["pid"] is None
    wait_for(
        lambda: (emu.objects(PLURAL)["hello"].get("status") or {}).get("readyInstances") == 1,
        60,
        "status Ready",
    )
    # no load: scaled back to zero, the pod's process drained and gone from the agent
    wait_for(lambda: instance_pods(emu, "hello") == [], 90, "scale to zero")
    wait_for(
        lambda: not node.client.status()["functions"]["hello"]["instances"], 60, "agent forgot it"
    )


def test_no_pod_can_start_gives_a_clear_503(cluster_without_pods):
    """The held request's 503 comes at the agent's join bound (here NO_POD_JOIN_TIMEOUT_S: no
    pod can join however long it waits; with the other tests' 20 s this test waited 20.9 s in a
    clean-clone run) and names the function; the Function's condition says why no pod came."""
    node, emu, api, ctl = cluster_without_pods
    emu.reject_pod_creates = "exceeded quota: pods"
    create(api, "nopods")
    wait_for(
        lambda: any(f["name"] == "nopods" for f in node.client.functions()), 60, "registry sync"
    )
    with pytest.raises(ClientError) as e:
        node.client.invoke("nopods", b"{}", "application/json", timeout=60)
    assert e.value.status == 503
    body = json.loads(e.value.body) if isinstance(e.value.body, (bytes, str)) else e.value.body
    assert body["error"] == "no_instance" and "nopods" in body["detail"]
    assert f"within {NO_POD_JOIN_TIMEOUT_S}s" in body["detail"]  # the agent's bound, not another

    def condition() -> dict | None:  # the controller's report of its refused create
        st = emu.objects(PLURAL)["nopods"].get("status") or {}
        c = next(iter(st.get("conditions", [])), None)
        return c if c and c["reason"] == "PodCreateFailed" else None

    cond = wait_for(condition, 60, "the Function's condition: PodCreateFailed")
    assert "exceeded quota" in cond["message"]


ENV_FN = """import os


def handle(event):
    return {k: os.environ.get(k) for k in ("DB_PASSWORD", "MODE", "PLAIN")}
"""


def test_env_and_invoke_token_from_secret_and_config_map(cluster, tmp_path):
    """The Secret's token guards the function on the agent; the pod's env gets the Secret's and
    ConfigMap's values from the kubelet; the agent's admin view shows neither."""
    node, emu, api, ctl = cluster
    token, db = "tok-" + os.urandom(8).hex(), "db-" + os.urandom(8).hex()
    code = tmp_path / "code"
    code.mkdir()
    (code / "envfn.py").write_text(ENV_FN)
    create(
        api,
        "envfn",
        handler="envfn:handle",
        code_path=str(code),
        env={"PLAIN": "p"},
        env_value_from={
            "DB_PASSWORD": {"secret_key_ref": {"name": "fn-secrets", "key": "db"}},
            "MODE": {"config_map_key_ref": {"name": "fn-config", "key": "mode"}},
        },
        invoke_token_secret_ref={"name": "fn-secrets", "key": "token"},
    )

    def reason():
        st = emu.objects(PLURAL)["envfn"].get("status") or {}
        return next((c["reason"] for c in st.get("conditions", []) if c["type"] == "Ready"), None)

    wait_for(lambda: reason() == "SecretNotFound", 60, "the missing Secret reported")
    assert "envfn" not in node.client.status()["functions"]  # not served without its token
    core = client.CoreV1Api(api)
    opt_in = {"labels": {READABLE_LABEL: "true"}}  # the owner lets Functions use them
    core.create_namespaced_secret(
        "default",
        {"metadata": {"name": "fn-secrets", **opt_in}, "stringData": {"token": token, "db": db}},
    )
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "fn-config", **opt_in}, "data": {"mode": "fast"}}
    )
    wait_for(lambda: "envfn" in node.client.status()["functions"], 60, "registry sync")
    with pytest.raises(ClientError) as e:
        node.client.invoke("envfn", b"{}", "application/json", token="wrong-token-1234")
    assert e.value.status == 403
    r = node.client.invoke("envfn", b"{}", "application/json", token=token, timeout=60)
    assert json.loads(r.body) == {"DB_PASSWORD": db, "MODE": "fast", "PLAIN": "p"}
    shown = json.dumps(node.client.request("GET", "/v1/functions/envfn", admin=True).json())
    assert token not in shown and db not in shown and '"invoke_token": "***"' in shown
    assert token not in json.dumps(emu.objects("pods")) and db not in json.dumps(
        emu.objects("pods")
    )
