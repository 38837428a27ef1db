"""The chart and the controller's pod manifests, run for real with `podman kube play`.

The chart (`helm template` with the project's helm) gives Redis, the node agent (its DaemonSet's
pod template), the gateway and the `helm test` pod; controller/k8s/pods.py gives the instance
and warm-pool pods, exactly as the controller creates them. All run on the project's image on a
private podman network, sharing the node's socket and slot-pool host directories
(`nodeAgent.socketDir`, `nodeAgent.shm.hostPath`) as on a Kubernetes node (kubeplay.py says what
podman cannot do and is filled in). Checked: an instance pod joins its node agent and is Ready
only once registered; an invocation through the gateway reaches it over the shared slot pool; a
pool pod joins, and the first invocation of a function at zero specialises it; the chart's
`helm test` pod passes against this setup. Every pod is removed by id, also after a failure."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubeplay import KubePlay, find, set_env

H = "hearth.functions.examples.handlers"
READY_PROBE = ["test", "-e", "/tmp/hearth/registered"]  # the instance pod's readinessProbe


@pytest.fixture(scope="module")
def kp(hearth_image: str) -> Iterator[KubePlay]:
    with KubePlay(hearth_image) as k:  # removes every pod, secret and the network by id
        k.start_platform()
        yield k


def spec(name: str) -> dict:
    return {"name": name, "handler": f"{H}:pid", "min_instances": 0, "max_instances": 1}


def deploy(kp: KubePlay, s: dict) -> None:
    """Deploy through the gateway; wait until the node agent has it (a pod may join only then)."""
    kp.front.deploy(s)
    kp.wait(lambda: any(f["name"] == s["name"] for f in kp.agent.functions()), s["name"], 60)


def instances(kp: KubePlay, fn: str) -> list[dict]:
    return (kp.agent.status()["functions"].get(fn) or {}).get("instances") or []


def readiness(kp: KubePlay, pod: str) -> bool:
    """The instance pod's readiness probe, run in its container as the kubelet runs it."""
    return kp.probe(pod, "function", READY_PROBE)


def test_rendered_manifests_are_what_ran(kp: KubePlay) -> None:
    """The node agent runs the chart's pod template with the host directories of the values, in
    HEARTH_INSTANCES=pods mode (it starts no instance itself); its slot pool is in the shared
    host tmpfs directory."""
    ds = find(kp.docs, "DaemonSet", "-node-agent")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["shm"]["hostPath"]["path"] == str(kp.shm_dir)
    assert vols["sockets"]["hostPath"]["path"] == str(kp.sock_dir)
    st = kp.agent.status()
    assert st["runner"] == "pods" and st["zygotes"]["joined"] == 0
    # the cluster link: token from the chart's Secret, listening on the pod IP it announces
    assert st["cluster"]["link"] == f"{kp.ips['agent']}:7070", st["cluster"]
    assert (kp.sock_dir / "join.sock").exists()
    pool = Path(st["pool"]["path"])
    assert (kp.shm_dir / pool.name).is_file(), "the agent's slot pool is not in the host directory"


def test_instance_pod_joins_and_serves_over_shared_memory(kp: KubePlay) -> None:
    fn = f"kp-inst-{uuid.uuid4().hex[:4]}"
    deploy(kp, spec(fn))
    pod = kp.instance_pod(spec(fn), f"{fn}-0")
    name = pod["metadata"]["name"]
    assert pod["spec"]["containers"][0]["command"] == ["python", "-m", "hearth.runtime.pod"]
    kp.play(pod)
    # Ready = registered: the probe passes only once the agent has the pod in its table
    kp.wait(lambda: readiness(kp, name), f"{name} Ready", 120)
    ids = [i["id"] for i in instances(kp, fn)]
    assert ids == [name], (ids, kp.logs(name, "function"))
    assert kp.agent.status()["zygotes"]["joined"] >= 1

    rep = kp.front.invoke(fn, b"{}", "application/json", timeout=60)
    assert rep.status == 200, rep.body
    body = json.loads(rep.body)
    assert body["instance"] == name  # served by the pod, not by anything the agent started
    [inst] = instances(kp, fn)
    assert inst["id"] == name and inst["served"] >= 1 and inst["pid"] is None
    # the payload went through the node's slot pool: every slot is back after the reply
    pool = kp.agent.status()["pool"]
    assert all(c["used"] == 0 for c in pool["classes"].values()), pool
    kp.remove(name)
    kp.wait(lambda: not instances(kp, fn), f"{name} gone from the agent", 60)


def test_pool_pod_joins_and_is_specialised_on_first_use(kp: KubePlay) -> None:
    pool = kp.pool_pod(f"kp-pool-{uuid.uuid4().hex[:4]}")
    name = pool["metadata"]["name"]
    kp.play(pool)
    kp.wait(lambda: readiness(kp, name), f"{name} Ready", 120)
    kp.wait(lambda: kp.agent.status()["warm_pool_ready"] >= 1, "the pool pod pooled", 30)

    fn = f"kp-pooled-{uuid.uuid4().hex[:4]}"
    deploy(kp, spec(fn))  # at zero: no instance pod of it exists
    rep = kp.front.invoke(fn, b"{}", "application/json", timeout=60)
    assert rep.status == 200, rep.body
    assert json.loads(rep.body)["instance"] == name  # the pool pod was specialised
    [inst] = instances(kp, fn)
    assert inst["id"] == name and inst["from_pool"] is True and inst["served"] >= 1
    assert kp.agent.status()["warm_pool"] == 0
    kp.remove(name)
    kp.wait(lambda: not instances(kp, fn), f"{name} gone from the agent", 60)


def test_helm_test_pod_passes(kp: KubePlay) -> None:
    """The chart's `helm test` pod, unchanged but for the gateway Service's address. Its
    Function is deployed through the admin API and its instance pod is the controller's
    manifest (there is no controller here: both are what it would do)."""
    fdoc = find(kp.docs, "Function", "-test")
    fn = fdoc["metadata"]["name"]
    deploy(kp, {"name": fn, "handler": fdoc["spec"]["handler"], "max_instances": 1})
    test = next(
        d
        for d in kp.docs
        if d["kind"] == "Pod" and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    )
    tname = test["metadata"]["name"] = f"{kp.prefix}-test-invoke"
    set_env(test, {"URL": f"{kp.front_url}/v1/functions/{fn}:invoke"})
    kp.play(test)  # invokes at zero: the gateway holds the request until an instance joins
    kp.play(kp.instance_pod({"name": fn, "handler": fdoc["spec"]["handler"]}, f"{fn}-0"))
    kp.wait(lambda: kp.state(tname, "invoke") == "exited", "the helm test pod to finish", 150, 0.5)
    assert kp.exit_code(tname, "invoke") == 0, kp.logs(tname, "invoke")
    # the container's log can lag its exit (seen once under CI load: an empty `podman logs`
    # from a pod that exited 0, which it does only after printing its answer)
    kp.wait(lambda: kp.logs(tname, "invoke").strip(), "the helm test pod's log", 20, 0.5)
    log = kp.logs(tname, "invoke")
    assert "invoke -> 200" in log, log
