"""Kubernetes backend against the loopback API emulator (k8s_emulator.py) with the official client.
No real cluster was available; see the emulator's docstring for what is emulated."""

from __future__ import annotations

import threading

import pytest
from backend_contract import BackendContract
from hearth.controller.crd import API_VERSION, GROUP, PLURAL, VERSION, api_fields
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s import (
    KubernetesBackend,
    KubernetesController,
    parse_cpu,
    parse_memory_mb,
)
from hearth.controller.k8s.controller import (
    LABEL_FUNCTION,
    ReconcileReport,
    cold_start_record,
    ready_condition,
)
from hearth.controller.k8s.refs import Unresolved
from k8s_emulator import Emulator
from kubernetes import client
from realnode import wait_for


def function(name: str, **spec):
    """A Function resource; `spec` uses the model's field names (camelCased for the API)."""
    body = {
        "handler": "app:handle",
        "resources": {"memory_mb": 512, "cpu_millicores": 500},
        "keep_alive": {"policy": "fixed", "ttl_s": 0},
        **spec,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "Function",
        "metadata": {"name": name},
        "spec": api_fields(body),
    }


def create_fn(api, name, **spec):
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, function(name, **spec)
    )


def patch_fn(api, name, spec):
    return client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, name, {"spec": api_fields(spec)}
    )


def ctl(api, **kw):
    return KubernetesController(
        api, "default", core=DecisionCore(scale_to_zero_grace_s=0), watch_timeout_s=2, **kw
    )


def pods_of(emu, fn):
    return {
        n: p
        for n, p in emu.objects("pods").items()
        if p["metadata"]["labels"].get(LABEL_FUNCTION) == fn
    }


def test_quantities():
    assert parse_cpu("4") == 4000 and parse_cpu("250m") == 250 and parse_cpu("1.5") == 1500
    assert (
        parse_memory_mb("8Gi") == 8192
        and parse_memory_mb("512Mi") == 512
        and parse_memory_mb(str(2**30)) == 1024
    )


def test_ready_condition_first_match_wins():
    rep = ReconcileReport(
        invalid={"a": "spec.handler: required"},
        unresolved={"a": Unresolved("SecretNotFound", "s"), "b": Unresolved("KeyNotFound", "k")},
        failures={"a": ("PodCreateFailed", "x"), "b": ("PodCreateFailed", "x"), "c": ("P", "m")},
    )
    slow = [("ImagePullBackOff", "pull failed"), ("Unschedulable", "no node")]
    assert ready_condition("a", rep, 0, 1, slow) == (
        "False",
        "InvalidSpec",
        "spec.handler: required",
    )
    assert ready_condition("b", rep, 0, 1, slow) == ("False", "KeyNotFound", "k")
    assert ready_condition("c", rep, 0, 1, slow) == ("False", "P", "m")
    ok = ReconcileReport()
    assert ready_condition("d", ok, 0, 0, slow)[:2] == ("True", "ScaledToZero")
    assert ready_condition("d", ok, 2, 2, slow) == ("True", "InstancesReady", "2/2 instances ready")
    assert ready_condition("d", ok, 1, 2, slow) == (
        "False",
        "ImagePullBackOff",
        "1/2 instances ready: pull failed",
    )
    assert ready_condition("d", ok, 1, 2, []) == ("False", "Scaling", "1/2 instances ready")
    assert ready_condition("d", ok, 1, 2, None) == ("False", "Scaling", "1/2 instances ready")


def test_function_creates_pods_with_affinity_labels_owner_and_status(api, emu):
    fobj = create_fn(api, "agg", min_instances=2, affinity_group="tree")
    rep = ctl(api).reconcile_once()
    assert len(rep.created) == 2 and not rep.invalid
    pods = pods_of(emu, "agg")
    assert len(pods) == 2
    for p in pods.values():
        terms = p["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        node = terms[0]["matchExpressions"][0]["values"][0]
        assert (
            node in {"node-a", "node-b", "node-c"}
            and terms[0]["matchExpressions"][0]["key"] == "kubernetes.io/hostname"
        )
        assert p["metadata"]["labels"]["hearth.dev/affinity-group"] == "tree"
        (owner,) = p["metadata"]["ownerReferences"]
        assert (
            owner["uid"] == fobj["metadata"]["uid"]
            and owner["kind"] == "Function"
            and owner["controller"] is True
        )
        req = p["spec"]["containers"][0]["resources"]["requests"]
        assert req == {"cpu": "500m", "memory": "512Mi"}
    # packed onto one node (same affinity group, capacity allows)
    assert len({p["spec"]["nodeName"] for p in pods.values()}) == 1
    status = emu.objects(PLURAL)["agg"]["status"]
    assert status["desiredInstances"] == 2
    ctl(api).reconcile_once()  # pods are Running now (emulated kubelet): status becomes Ready
    status = emu.objects(PLURAL)["agg"]["status"]
    assert status["readyInstances"] == 2 and status["conditions"][0]["status"] == "True"
    assert status["observedGeneration"] == 1


def test_api_server_rejects_what_the_crd_forbids(api, emu):
    # min > max is a CEL rule of the CRD: the emulated API server answers 422, as a real one
    with pytest.raises(client.ApiException) as e:
        create_fn(api, "bad", min_instances=5, max_instances=2)
    assert e.value.status == 422 and "minInstances exceeds maxInstances" in e.value.body
    with pytest.raises(client.ApiException) as e:
        create_fn(api, "bad", labels={"hearth.dev/function": "other"})
    assert e.value.status == 422 and "reserved" in e.value.body
    assert emu.objects(PLURAL) == {}


def test_bad_spec_is_reported_in_status_not_crash_looped(api, emu):
    # the CRD cannot check env names (map keys); the controller's model does
    create_fn(api, "bad", env={"1BAD": "x"})
    create_fn(api, "good", min_instances=1)
    c = ctl(api)
    for _ in range(2):
        rep = c.reconcile_once()
        assert "bad" in rep.invalid
    assert not pods_of(emu, "bad") and len(pods_of(emu, "good")) == 1
    (cond,) = emu.objects(PLURAL)["bad"]["status"]["conditions"]
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "spec.env: " in cond["message"] and "1BAD" in cond["message"]


def test_deleted_pod_is_recreated_and_scale_to_zero_deletes(api, emu):
    create_fn(api, "web", min_instances=2)
    c = ctl(api)
    c.reconcile_once()
    victim = sorted(pods_of(emu, "web"))[0]
    emu.delete("pods", "default", victim)
    assert len(pods_of(emu, "web")) == 1
    rep = c.reconcile_once()
    assert (
        len(rep.created) == 1
        and len(pods_of(emu, "web")) == 2
        and victim not in pods_of(emu, "web")
    )
    patch_fn(api, "web", {"min_instances": 0})
    # no load: the autoscaler scales down at most by half per decision (Knative's default rate)
    c.reconcile_once()
    assert len(pods_of(emu, "web")) == 1
    c.reconcile_once()
    assert pods_of(emu, "web") == {}
    st = emu.objects(PLURAL)["web"]["status"]
    assert (
        st["desiredInstances"] == 0
        and st["conditions"][0]["reason"] == "ScaledToZero"
        and st["observedGeneration"] == 2
    )


def test_deleting_function_removes_its_pods(api, emu):
    create_fn(api, "tmp", min_instances=1)
    c = ctl(api)
    c.reconcile_once()
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "tmp"
    )
    c.reconcile_once()
    assert pods_of(emu, "tmp") == {}


def test_watch_loop_survives_dropped_connections_and_410(api, emu):
    c = ctl(api, resync_s=3600)  # only watch events drive reconciles here
    stop = threading.Event()
    t = threading.Thread(target=c.run, args=(stop,), daemon=True)
    t.start()
    try:
        create_fn(api, "w1", min_instances=1)
        wait_for(lambda: len(pods_of(emu, "w1")) == 1, 20, "w1's pod")
        # cut every watch stream mid-chunk: the watches resume from their resourceVersion
        emu.drop_watches()
        wait_for(lambda: c.stats["watch_resumes"] >= 1, 20, "a watch resume")
        create_fn(api, "w2", min_instances=1)
        wait_for(lambda: len(pods_of(emu, "w2")) == 1, 20, "w2's pod")
        # history compacted and streams dropped: resuming gives 410 Gone -> relist
        emu.compact()
        emu.drop_watches()
        wait_for(lambda: c.stats["relists_after_410"] >= 1, 20, "a relist after 410")
        create_fn(api, "w3", min_instances=1)
        wait_for(lambda: len(pods_of(emu, "w3")) == 1, 20, "w3's pod")
        # a pod deleted by someone else is noticed through the pod watch and recreated
        victim = next(iter(pods_of(emu, "w3")))
        emu.delete("pods", "default", victim)
        wait_for(
            lambda: len(pods_of(emu, "w3")) == 1 and victim not in pods_of(emu, "w3"),
            20,
            "w3's pod recreated",
        )
        assert c.stats["reconcile_errors"] == 0
    finally:
        stop.set()
        t.join(timeout=15)
    assert not t.is_alive()


def test_cold_start_record_from_pod_phases(api, emu):
    create_fn(api, "cs", min_instances=1)
    ctl(api).reconcile_once()
    (pod,) = pods_of(emu, "cs").values()
    assert cold_start_record(pod) is None  # runtime has not reported yet
    from hearth.controller.k8s.controller import _ts

    created = _ts(pod["metadata"]["creationTimestamp"])
    pod["metadata"]["annotations"]["hearth.dev/phases"] = (
        f'{{"code_imported": {created + 0.5}, "ready": {created + 1.25}}}'
    )
    r = cold_start_record(pod, n=3)
    assert r.funcName == "cs" and r.podID == "pool00-500-512-0000000003"
    assert r.deployCodeCost == pytest.approx(0.5) and r.deployDependencyCost == pytest.approx(0.75)
    assert r.totalCost_cold_start == pytest.approx(sum(r.costs().values()))


class TestKubernetesBackendContract(BackendContract):
    @pytest.fixture
    async def backend(self):
        e = Emulator().start()
        cfg = client.Configuration()
        cfg.host = e.url
        with client.ApiClient(cfg) as c:
            yield KubernetesBackend(c)
        e.stop()
