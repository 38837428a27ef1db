"""Instance and warm-pool pods: their manifest, and what a pod tells the controller back.

Pure functions of a spec and settings (no API calls): `pod_manifest` builds the pod an
instance runs in, `pod_to_instance` turns a listed pod into the decision core's `Instance`, and
`pod_problem` says why a pod is not Ready (Unschedulable, ErrImagePull, CrashLoopBackOff …) so
status can carry the reason. Names and label values always pass the API server's checks:
DNS-1123 and at most 63 characters (long names get a hash suffix, so they stay unique).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hearth import __version__
from hearth.controller.coldstarts import ColdStartRecord, from_k8s_phases, pod_id
from hearth.controller.crd import GROUP, KIND, VERSION
from hearth.controller.model import Instance
from hearth.spec import FunctionSpec

MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_FUNCTION = "hearth.dev/function"
LABEL_INSTANCE = "hearth.dev/instance"
LABEL_GROUP = "hearth.dev/affinity-group"
LABEL_ROLE = "hearth.dev/role"  # instance | pool
LABEL_RUNTIME = "hearth.dev/runtime"
ANN_LAST_USED = "hearth.dev/last-used"
ANN_PHASES = "hearth.dev/phases"
ANN_FROM_POOL = "hearth.dev/from-pool"
SELECTOR = f"{MANAGED_BY}=hearth"
#: the image `make image` builds: one image for every role, function instances included
DEFAULT_IMAGE = f"localhost/hearth:{__version__}"
HOSTNAME_KEY = "kubernetes.io/hostname"
#: the file an instance pod's runtime writes once its node agent registered it (readiness)
READY_FILE = "/tmp/hearth/registered"

_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_cpu(q: str | int | float) -> int:
    """Kubernetes CPU quantity -> millicores ('4' -> 4000, '250m' -> 250)."""
    s = str(q).strip()
    if s.endswith("m"):
        return int(float(s[:-1]))
    if s.endswith("n"):
        return int(float(s[:-1]) / 1e6)
    if s.endswith("u"):
        return int(float(s[:-1]) / 1e3)
    return int(float(s) * 1000)


def parse_memory_mb(q: str | int | float) -> int:
    """Kubernetes memory quantity -> MiB ('8Gi' -> 8192, '512Mi' -> 512, '1G' -> 953)."""
    s = str(q).strip()
    for suf in sorted(_SUFFIX, key=len, reverse=True):
        if s.endswith(suf):
            return int(float(s[: -len(suf)]) * _SUFFIX[suf] // 2**20)
    if s.endswith("m"):  # milli-bytes, legal but silly
        return int(float(s[:-1]) / 1000 // 2**20)
    return int(float(s) // 2**20)


def dns_label(name: str, limit: int = 63) -> str:
    """`name` as a DNS-1123 label of at most `limit` characters. A name that is too long keeps
    its head and gets a hash of the whole name, so two long names never collide."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "x"
    if len(s) <= limit and s == name:
        return s
    h = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{s[: limit - 9].rstrip('-')}-{h}"


def _ts(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v.timestamp()
    return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class PodSettings:
    """How instance pods join their node. The paths are host paths the node agent DaemonSet
    uses too (charts/hearth: nodeAgent.socketDir, nodeAgent.shm.hostPath)."""

    image: str = DEFAULT_IMAGE
    pull_policy: str = "IfNotPresent"
    socket_dir: str = "/run/hearth"  # the node agent's proxy socket directory
    shm_dir: str = "/run/hearth/shm"  # the node's slot pool (a host tmpfs directory)
    # The data plane decides the uid: the slot pool files and the proxy socket are owner-only
    # (0600) and owned by the node agent's uid, so instance pods must run as that uid. Today's
    # agent DaemonSet runs as uid 0 (Kubernetes grants its BPF capabilities only to uid 0), so
    # the default is 0 and `runAsNonRoot` is left out; every other restricted setting holds.
    run_as_user: int = 0
    run_as_group: int = 0
    drain_s: int = 5  # preStop: time for the agent to stop routing before SIGTERM


def _owner(owner: dict[str, Any] | None) -> list[dict[str, Any]]:
    if owner is None:
        return []
    return [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _pod(
    name: str,
    node: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    owner: dict[str, Any] | None,
    env: list[dict[str, Any]],
    requests: dict[str, str],
    settings: PodSettings,
    image: str,
    grace_s: int,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels, "annotations": annotations}
    if owner is not None:
        meta["ownerReferences"] = _owner(owner)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            # A crash restarts the container; an exit 0 (its node agent stopped the instance, or
            # the agent went away) ends the pod, and the controller decides what replaces it.
            "restartPolicy": "OnFailure",
            "automountServiceAccountToken": False,  # function code gets no API credentials
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": grace_s,
            "affinity": _on_node(node),
            "securityContext": {
                **({"runAsNonRoot": True} if settings.run_as_user else {}),
                "runAsUser": settings.run_as_user,
                "runAsGroup": settings.run_as_group,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [_container(env, requests, settings, image)],
            "volumes": _volumes(settings),
        },
    }


def _on_node(node: str) -> dict[str, Any]:
    """The pod's affinity: on `node` only (its node agent and shared memory are there)."""
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": HOSTNAME_KEY, "operator": "In", "values": [node]}
                        ]
                    }
                ]
            }
        }
    }


def _container(
    env: list[dict[str, Any]], requests: dict[str, str], settings: PodSettings, image: str
) -> dict[str, Any]:
    """The function's container: the runtime joining its node agent, unprivileged."""
    return {
        "name": "function",
        "image": image,
        "imagePullPolicy": settings.pull_policy,
        # join the node agent over the socket dir, then serve (hearth.runtime.pod);
        # the agent supplies the spec (env included) from the function registry
        "command": ["python", "-m", "hearth.runtime.pod"],
        "env": [
            {
                "name": "HEARTH_INSTANCE_ID",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
            {"name": "HEARTH_NODE_SOCKET_DIR", "value": "/run/hearth"},
            {"name": "HEARTH_READY_FILE", "value": READY_FILE},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            *env,
        ],
        "resources": {"requests": requests, "limits": {"memory": requests["memory"]}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            **({"runAsNonRoot": True} if settings.run_as_user else {}),
            "capabilities": {"drop": ["ALL"]},
        },
        **_probes(),
        # preStop gives the agent a moment; SIGTERM then makes the runtime ask its
        # agent to drain it (no new invocations, in-flight ones finish, then exit).
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(settings.drain_s)]}}},
        "volumeMounts": [
            {"name": "node-socket", "mountPath": "/run/hearth"},
            {"name": "shm-pool", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _probes() -> dict[str, Any]:
    """Ready = registered with the node agent: the runtime writes READY_FILE once the agent
    accepted its socket (the agent routes only to registered ones); alive = the node agent's
    join socket is there (gone: the agent is down on this node)."""
    return {
        "readinessProbe": {
            "exec": {"command": ["test", "-e", READY_FILE]},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
        "startupProbe": {
            "exec": {"command": ["test", "-e", READY_FILE]},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "livenessProbe": {
            "exec": {"command": ["test", "-S", "/run/hearth/join.sock"]},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }


def _volumes(settings: PodSettings) -> list[dict[str, Any]]:
    """The node's socket dir and shared-memory dir (host paths), and a small private /tmp."""
    return [
        {
            "name": "node-socket",
            "hostPath": {"path": settings.socket_dir, "type": "Directory"},
        },
        {"name": "shm-pool", "hostPath": {"path": settings.shm_dir, "type": "Directory"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]


def value_from_env(spec: FunctionSpec) -> list[dict[str, Any]]:
    """`spec.envValueFrom` as container env: the kubelet reads the Secret/ConfigMap keys when it
    creates the container, so their values never pass through the controller or the agent."""
    out = []
    for name, src in sorted(spec.env_value_from.items()):
        field, ref = src.source()
        sel: dict[str, Any] = {"name": ref.name, "key": ref.key}
        if ref.optional:
            sel["optional"] = True
        out.append({"name": name, "valueFrom": {field: sel}})
    return out


def pod_manifest(
    spec: FunctionSpec,
    node: str,
    instance_id: str,
    owner: dict[str, Any] | None,
    settings: PodSettings | None = None,
    from_pool: bool = False,
) -> dict[str, Any]:
    """The pod of one instance, pinned by required node affinity to the node placement chose."""
    settings = settings or PodSettings()
    name = dns_label(instance_id)
    labels = {
        **spec.labels,  # reserved keys are rejected by FunctionSpec and the CRD: ours win anyway
        MANAGED_BY: "hearth",
        LABEL_ROLE: "instance",
        LABEL_FUNCTION: spec.name,
        LABEL_INSTANCE: name,
        LABEL_RUNTIME: spec.runtime,
    }
    if spec.affinity_group:
        labels[LABEL_GROUP] = spec.affinity_group
    env = [{"name": "HEARTH_FUNCTION", "value": spec.name}, *value_from_env(spec)]
    requests = {
        "cpu": f"{spec.resources.cpu_millicores}m",
        "memory": f"{spec.resources.memory_mb}Mi",
    }
    grace = int(min(spec.timeout_s, 3600)) + settings.drain_s + 5
    return _pod(
        name,
        node,
        labels,
        {ANN_FROM_POOL: str(from_pool).lower()},
        owner,
        env,
        requests,
        settings,
        spec.image or settings.image,
        grace,
    )


def pool_pod_manifest(
    runtime: str,
    node: str,
    instance_id: str,
    settings: PodSettings | None = None,
    cpu_millicores: int = 100,
    memory_mb: int = 256,
) -> dict[str, Any]:
    """A generic warm-pool pod of `runtime` on `node` (Fission's poolmgr): the runtime is up
    with no function; the node agent specialises it on first use by loading the code."""
    settings = settings or PodSettings()
    name = dns_label(instance_id)
    labels = {
        MANAGED_BY: "hearth",
        LABEL_ROLE: "pool",
        LABEL_INSTANCE: name,
        LABEL_RUNTIME: runtime,
    }
    requests = {"cpu": f"{cpu_millicores}m", "memory": f"{memory_mb}Mi"}
    return _pod(
        name, node, labels, {}, None, [], requests, settings, settings.image, settings.drain_s + 35
    )


def claim_patch(spec: FunctionSpec, owner: dict[str, Any] | None) -> dict[str, Any]:
    """The metadata patch that makes a pool pod an instance of `spec`."""
    labels = {**spec.labels, LABEL_ROLE: "instance", LABEL_FUNCTION: spec.name}
    if spec.affinity_group:
        labels[LABEL_GROUP] = spec.affinity_group
    meta: dict[str, Any] = {"labels": labels, "annotations": {ANN_FROM_POOL: "true"}}
    if owner is not None:
        meta["ownerReferences"] = _owner(owner)
    return meta


def pod_node(pod: dict) -> str:
    """The node a pod runs on (bound) or is pinned to (still Pending)."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return spec["nodeName"]
    try:
        return spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]["matchExpressions"][0]["values"][0]
    except (KeyError, IndexError, TypeError):
        return ""


def _requests(pod: dict) -> dict[str, str]:
    out: dict[str, int] = {"cpu": 0, "memory": 0}
    for c in (pod.get("spec") or {}).get("containers") or []:
        req = (c.get("resources") or {}).get("requests") or {}
        out["cpu"] += parse_cpu(req.get("cpu", "0"))
        out["memory"] += parse_memory_mb(req.get("memory", "0"))
    return out


def pod_requests(pod: dict) -> tuple[int, int]:
    """(millicores, MiB) the pod's containers request: what the scheduler reserves for it."""
    r = _requests(pod)
    return r["cpu"], r["memory"]


def pod_problem(pod: dict) -> tuple[str, str] | None:
    """(reason, message) when a pod is not serving and will not by itself soon: unschedulable,
    image pull errors, crash loops, container errors. None for a healthy or starting pod."""
    status = pod.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return c.get("reason") or "Unschedulable", c.get("message") or "pod not scheduled"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in (
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "CrashLoopBackOff",
            "CreateContainerConfigError",
            "CreateContainerError",
            "RunContainerError",
        ):
            return reason, waiting.get("message") or reason
    if status.get("phase") == "Failed":
        return status.get("reason") or "Failed", status.get("message") or "pod failed"
    return None


def pod_to_instance(pod: dict) -> Instance:
    meta, status = pod["metadata"], pod.get("status") or {}
    conds = {c["type"]: c.get("status") for c in status.get("conditions") or []}
    if meta.get("deletionTimestamp"):
        state = "stopping"
    elif status.get("phase") == "Running" and conds.get("Ready") == "True":
        state = "idle"
    else:
        state = "starting"
    cpu, mem = pod_requests(pod)
    started = _ts(meta.get("creationTimestamp")) or 0.0
    ann = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    last = float(ann[ANN_LAST_USED]) if ANN_LAST_USED in ann else started
    return Instance(
        id=meta["name"],
        function=labels.get(LABEL_FUNCTION),
        node=pod_node(pod),
        state=state,
        runtime=labels.get(LABEL_RUNTIME, "python3.11"),
        memory_mb=mem,
        cpu_millicores=cpu,
        started_at=started,
        last_used_at=last,
        from_pool=ann.get(ANN_FROM_POOL) == "true",
    )


def cold_start_record(pod: dict, n: int = 0, cluster: str = "kubernetes") -> ColdStartRecord | None:
    """Pod created → PodScheduled → container started → runtime ready (the runtime's report in the
    `hearth.dev/phases` annotation: {"code_imported": t, "ready": t}). None until all are known."""
    meta, status = pod["metadata"], pod.get("status") or {}
    ann = meta.get("annotations") or {}
    if ANN_PHASES not in ann:
        return None
    conds = {c["type"]: c for c in status.get("conditions") or []}
    sched = _ts((conds.get("PodScheduled") or {}).get("lastTransitionTime"))
    started = None
    for cs in status.get("containerStatuses") or []:
        started = _ts(((cs.get("state") or {}).get("running") or {}).get("startedAt"))
    if sched is None or started is None:
        return None
    cpu, mem = pod_requests(pod)
    return from_k8s_phases(
        created=_ts(meta["creationTimestamp"]),
        scheduled=sched,
        containers_started=started,
        runtime=json.loads(ann[ANN_PHASES]),
        function=(meta.get("labels") or {}).get(LABEL_FUNCTION, ""),
        pod=pod_id(cpu, mem, n),
        from_pool=ann.get(ANN_FROM_POOL) == "true",
        cluster=cluster,
    )
