"""Instance and pool pod manifests: valid for the API server, pinned, restricted, joined to
their node (hostPath socket dir and slot pool), and what a pod's state tells the controller."""

from __future__ import annotations

from hearth.controller.k8s.pods import (
    LABEL_FUNCTION,
    LABEL_INSTANCE,
    MANAGED_BY,
    PodSettings,
    dns_label,
    pod_manifest,
    pod_problem,
    pod_to_instance,
    pool_pod_manifest,
)
from hearth.spec import FunctionSpec
from k8s_admission import label_value_problem, validate_pod

OWNER = {"metadata": {"name": "f", "uid": "uid-1"}}


def spec(**kw) -> FunctionSpec:
    return FunctionSpec(name=kw.pop("name", "f"), handler="m:h", **kw)


def test_long_names_stay_valid_and_distinct():
    long_fn = "a" * 63
    names = {dns_label(f"{long_fn}-{i:06d}") for i in range(50)}
    assert len(names) == 50
    for n in names:
        assert len(n) <= 63 and label_value_problem(n) is None
    assert dns_label("short-000001") == "short-000001"  # valid names are kept as they are
    m = pod_manifest(spec(name=long_fn), "node-a", f"{long_fn}-000001", OWNER)
    assert validate_pod(m) == []
    assert m["metadata"]["labels"][LABEL_INSTANCE] == m["metadata"]["name"]


def test_instance_pod_is_restricted_pinned_and_joined_to_its_node():
    s = PodSettings(
        image="localhost/hearth:1",
        socket_dir="/run/h",
        shm_dir="/run/h/shm",
        run_as_user=10001,
        run_as_group=10001,
    )
    m = pod_manifest(
        spec(resources={"memory_mb": 300, "cpu_millicores": 250}, labels={"team": "ml"}),
        "node-b",
        "f-000001",
        OWNER,
        s,
    )
    assert validate_pod(m) == []
    ps = m["spec"]
    assert ps["automountServiceAccountToken"] is False
    assert ps["restartPolicy"] == "OnFailure"  # exit 0 = stopped by its agent: the pod ends
    (c,) = ps["containers"]
    assert c["command"] == ["python", "-m", "hearth.runtime.pod"]
    term = ps["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["node-b"]
    assert ps["securityContext"]["runAsNonRoot"] is True
    assert ps["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["image"] == "localhost/hearth:1"
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["resources"] == {
        "requests": {"cpu": "250m", "memory": "300Mi"},
        "limits": {"memory": "300Mi"},
    }
    assert {"readinessProbe", "startupProbe", "livenessProbe"} <= set(c)
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    hp = {v["name"]: v["hostPath"]["path"] for v in ps["volumes"] if "hostPath" in v}
    assert hp == {"node-socket": "/run/h", "shm-pool": "/run/h/shm"}
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    assert mounts["shm-pool"] == "/dev/shm" and mounts["node-socket"] == "/run/hearth"
    (owner,) = m["metadata"]["ownerReferences"]
    assert owner["uid"] == "uid-1" and owner["controller"] is True
    labels = m["metadata"]["labels"]
    assert labels["team"] == "ml" and labels[MANAGED_BY] == "hearth"
    assert labels[LABEL_FUNCTION] == "f"


def test_root_only_where_the_data_plane_needs_it():
    # default: the agent's uid 0 owns the pool; everything else stays restricted
    c = pod_manifest(spec(), "node-a", "f-1", OWNER)["spec"]
    assert "runAsNonRoot" not in c["securityContext"] and c["securityContext"]["runAsUser"] == 0
    sc = c["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}


def test_pool_pod_has_no_function_and_no_owner():
    m = pool_pod_manifest("python3.11", "node-a", "pool-python311-000003")
    assert validate_pod(m) == []
    assert LABEL_FUNCTION not in m["metadata"]["labels"]
    assert "ownerReferences" not in m["metadata"]
    inst = pod_to_instance({**m, "status": {"phase": "Running", "conditions": []}})
    assert inst.function is None and inst.runtime == "python3.11" and inst.node == "node-a"


def test_pod_problem_reasons():
    assert pod_problem({"status": {"phase": "Running"}}) is None
    unsched = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "m",
                }
            ],
        }
    }
    assert pod_problem(unsched) == ("Unschedulable", "m")
    for reason in ("ErrImagePull", "ImagePullBackOff", "CrashLoopBackOff"):
        p = {
            "status": {
                "phase": "Pending",
                "containerStatuses": [{"state": {"waiting": {"reason": reason, "message": "x"}}}],
            }
        }
        assert pod_problem(p) == (reason, "x")
    starting = {
        "status": {"containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}
    }
    assert pod_problem(starting) is None
