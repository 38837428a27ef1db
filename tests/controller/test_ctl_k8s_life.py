"""The Kubernetes controller's whole life against the emulator: a Function's pods, load-driven
scaling up and to zero, scaling from zero, honest status with reasons, Events, placement that
skips cordoned/NotReady/tainted nodes and counts other pods, re-placing stuck pods, its own
cleanup (no garbage collector), and warm-pool pods.

Time is a fake clock (the autoscaler's windows), so nothing here waits on wall time."""

from __future__ import annotations

from hearth.controller.crd import API_VERSION, GROUP, PLURAL, VERSION, api_fields
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s import KubernetesController
from hearth.controller.k8s.pods import LABEL_FUNCTION, LABEL_ROLE
from hearth.controller.model import FunctionLoad
from k8s_emulator import Emulator
from kubernetes import client


class Clock:
    def __init__(self) -> None:
        import time

        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def create(api, name, **spec):
    body = {"handler": "app:handle", "keep_alive": {"ttl_s": 0}, **spec}
    obj = {
        "apiVersion": API_VERSION,
        "kind": "Function",
        "metadata": {"name": name},
        "spec": api_fields(body),
    }
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, obj
    )


def pods(e, fn=None, role="instance"):
    return {
        n: p
        for n, p in e.objects("pods").items()
        if p["metadata"]["labels"].get(LABEL_ROLE) == role
        and (fn is None or p["metadata"]["labels"].get(LABEL_FUNCTION) == fn)
    }


def ready_cond(e, fn):
    st = e.objects(PLURAL)[fn].get("status") or {}
    return st, next(c for c in st["conditions"] if c["type"] == "Ready")


def test_function_life_scale_up_to_zero_from_zero_and_failure(emu):
    load = {"inflight": 0, "queued": 0}
    clock = Clock()
    core = DecisionCore(stable_window_s=10, panic_window_s=2, scale_to_zero_grace_s=0)

    def loads(fn):
        return FunctionLoad(fn, inflight=load["inflight"], queued=load["queued"])

    with emu.api_client() as api:
        c = KubernetesController(api, "default", core=core, loads=loads, clock=clock)
        create(api, "web", max_instances=4)
        c.reconcile_once()
        st, cond = ready_cond(emu, "web")
        assert pods(emu, "web") == {} and cond["reason"] == "ScaledToZero"

        # load: 3 in flight at concurrency 1 -> 3 instance pods, Ready once running
        clock.t += 11  # the zero sample above leaves the stable window
        load["inflight"] = 3
        c.reconcile_once()
        assert len(pods(emu, "web")) == 3
        st, cond = ready_cond(emu, "web")
        assert (st["desiredInstances"], st["readyInstances"]) == (3, 0)
        assert cond["status"] == "False" and cond["reason"] == "Scaling"
        clock.t += 1
        c.reconcile_once()
        st, cond = ready_cond(emu, "web")
        assert (st["readyInstances"], cond["status"], cond["reason"]) == (
            3,
            "True",
            "InstancesReady",
        )

        # no load: scale down (at most halving per decision) to zero
        load["inflight"] = 0
        counts = []
        for _ in range(6):
            clock.t += 11  # past the stable window: the old samples are gone
            c.reconcile_once()
            counts.append(len(pods(emu, "web")))
        assert counts[-1] == 0 and counts[0] < 3 and counts == sorted(counts, reverse=True)
        assert ready_cond(emu, "web")[1]["reason"] == "ScaledToZero"

        # a request at zero (held by the gateway: queued) starts an instance
        load["queued"] = 1
        clock.t += 1
        c.reconcile_once()
        assert len(pods(emu, "web")) == 1
        load["queued"] = 0

        # pod creation fails (e.g. a quota): not Ready, with the API server's reason
        emu.reject_pod_creates = (
            "exceeded quota: pods, requested: pods=1, used: pods=10, limited: pods=10"
        )
        load["inflight"] = 4
        clock.t += 1
        rep = c.reconcile_once()
        assert rep.failures["web"][0] == "PodCreateFailed"
        st, cond = ready_cond(emu, "web")
        assert cond["status"] == "False" and cond["reason"] == "PodCreateFailed"
        assert "exceeded quota" in cond["message"]
        events = [ev for ev in emu.objects("events").values() if ev["reason"] == "FailedCreate"]
        assert events and events[0]["involvedObject"]["name"] == "web"
        assert events[0]["type"] == "Warning"
        emu.reject_pod_creates = None
        clock.t += 1
        c.reconcile_once()
        assert len(pods(emu, "web")) == 4


def test_image_pull_error_and_crash_loop_are_reasons(emu):
    emu.image_pull_errors.add("reg.local/missing:1")
    emu.crash_images.add("reg.local/crash:1")
    with emu.api_client() as api:
        c = KubernetesController(api, "default", core=DecisionCore())
        create(api, "nopull", min_instances=1, image="reg.local/missing:1")
        create(api, "crash", min_instances=1, image="reg.local/crash:1")
        c.reconcile_once()
        c.reconcile_once()
        for fn, reason in (("nopull", "ErrImagePull"), ("crash", "CrashLoopBackOff")):
            st, cond = ready_cond(emu, fn)
            assert (cond["status"], cond["reason"]) == ("False", reason)
            assert st["readyInstances"] == 0 and st["instances"] == 1


def test_placement_skips_cordoned_notready_and_tainted_nodes(emu):
    emu.set_node("node-a", unschedulable=True)
    emu.set_node("node-b", taints=[{"key": "gpu", "value": "yes", "effect": "NoSchedule"}])
    with emu.api_client() as api:
        c = KubernetesController(api, "default", core=DecisionCore())
        create(api, "spreadme", min_instances=2, spread=True)
        c.reconcile_once()
        nodes = {p["spec"]["nodeName"] for p in pods(emu, "spreadme").values()}
        assert nodes == {"node-c"}  # spread wanted, but only node-c may take pods
        emu.set_node("node-c", ready=False)
        emu.set_node("node-a", unschedulable=False)
        create(api, "later", min_instances=1)
        c.reconcile_once()
        (p,) = pods(emu, "later").values()
        assert p["spec"]["nodeName"] == "node-a"


def test_capacity_is_allocatable_minus_other_pods(emu):
    with emu.api_client() as api:
        for node in ("node-a", "node-b"):  # someone else's pods fill two nodes
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"big-{node}"},
                "spec": {
                    "nodeName": node,
                    "containers": [
                        {"name": "c", "image": "x:1", "resources": {"requests": {"cpu": "3500m"}}}
                    ],
                },
            }
            client.CoreV1Api(api).create_namespaced_pod("other", body)
        c = KubernetesController(api, "default", core=DecisionCore())
        create(api, "fat", min_instances=3, resources={"cpu_millicores": 1000, "memory_mb": 256})
        c.reconcile_once()
        nodes = [p["spec"]["nodeName"] for p in pods(emu, "fat").values()]
        assert nodes == ["node-c"] * 3
        # without counting other pods, placement would have used node-a (checked: it does)
        blind = KubernetesController(api, "default", core=DecisionCore(), count_other_pods=False)
        assert {n.name: n.cpu_millicores for n in blind.list_nodes()}["node-a"] == 4000
        assert {n.name: n.cpu_millicores for n in c.list_nodes()}["node-a"] == 500


def test_pod_pending_too_long_is_placed_again_elsewhere(emu):
    clock = Clock()
    with emu.api_client() as api:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "hog"},
            "spec": {
                "nodeName": "node-a",
                "containers": [
                    {"name": "c", "image": "x:1", "resources": {"requests": {"cpu": "4"}}}
                ],
            },
        }
        client.CoreV1Api(api).create_namespaced_pod("other", body)
        # a controller that cannot see other namespaces' pods picks the full node-a
        c = KubernetesController(
            api,
            "default",
            core=DecisionCore(),
            clock=clock,
            count_other_pods=False,
            pending_timeout_s=60,
        )
        create(api, "stuck", min_instances=1, resources={"cpu_millicores": 3000, "memory_mb": 256})
        c.reconcile_once()
        (p,) = pods(emu, "stuck").values()
        first = p["metadata"]["name"]
        assert p["status"]["phase"] == "Pending"
        clock.t += 30
        c.reconcile_once()
        assert first in pods(emu, "stuck")  # not yet
        st, cond = ready_cond(emu, "stuck")
        assert cond["reason"] == "Unschedulable" and "Insufficient cpu" in cond["message"]
        clock.t += 60
        rep = c.reconcile_once()
        assert rep.replaced == [first]
        (p,) = pods(emu, "stuck").values()
        assert p["metadata"]["name"] != first and p["spec"]["nodeName"] != "node-a"
        assert p["status"]["phase"] == "Running"
        assert any(ev["reason"] == "Replaced" for ev in emu.objects("events").values())


def test_controller_removes_orphans_itself_without_gc():
    e = Emulator(gc=False).start()
    try:
        with e.api_client() as api:
            c = KubernetesController(api, "default", core=DecisionCore())
            create(api, "tmp", min_instances=2)
            c.reconcile_once()
            assert len(pods(e, "tmp")) == 2
            client.CustomObjectsApi(api).delete_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, "tmp"
            )
            assert len(pods(e, "tmp")) == 2  # no garbage collector here
            c.reconcile_once()
            assert pods(e, "tmp") == {}
    finally:
        e.stop()


def test_warm_pool_pods_per_node_and_specialised_on_use(emu):
    with emu.api_client() as api:
        c = KubernetesController(
            api, "default", core=DecisionCore(), pool_targets={"python3.11": 1}
        )
        c.reconcile_once()
        pool = pods(emu, role="pool")
        assert sorted(p["spec"]["nodeName"] for p in pool.values()) == [
            "node-a",
            "node-b",
            "node-c",
        ]
        c.reconcile_once()  # running now: nothing more to start
        assert len(pods(emu, role="pool")) == 3
        create(api, "fast", min_instances=1)
        rep = c.reconcile_once()
        # no new instance pod: a pool pod is claimed, and the pool refilled on that node
        assert len(rep.claimed) == 1 and all(n.startswith("pool-") for n in rep.created)
        (inst,) = pods(emu, "fast").values()
        assert inst["metadata"]["name"] in pool and inst["metadata"]["name"] == rep.claimed[0]
        assert inst["metadata"]["annotations"]["hearth.dev/from-pool"] == "true"
        assert inst["metadata"]["ownerReferences"][0]["name"] == "fast"
        assert "HEARTH_FUNCTION" not in {e["name"] for e in inst["spec"]["containers"][0]["env"]}
        c.reconcile_once()
        assert len(pods(emu, role="pool")) == 3
        assert len(pods(emu, "fast")) == 1  # the claimed pod counts as the instance
