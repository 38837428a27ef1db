"""A small, honest Kubernetes API emulator for the controller tests.

Why not kmock alone: kmock's emulator keeps no resourceVersions (lists return '...'), cannot
answer a watch from a stale resourceVersion with 410 Gone, has no label selectors and no
status subresource -- exactly the behaviours the Kubernetes backend must survive. This server
speaks the real REST + watch wire protocol to the official `kubernetes` client over loopback
HTTP/1.1 (JSON bodies, chunked watch streams of {"type", "object"} lines, Status objects for
errors) for the handful of endpoints Hearth uses:

  GET  /api/v1/nodes
  GET|POST /api/v1/namespaces/{ns}/secrets, .../configmaps, .../events   (+ GET|PUT|PATCH|DELETE
       of one secret or config map by name: validated and stored as the API server does)
  GET|POST /api/v1/namespaces/{ns}/pods            (list, ?watch, ?labelSelector=k=v,...)
  GET|DELETE|PATCH /api/v1/namespaces/{ns}/pods/{name}
  GET|POST /apis/hearth.dev/v1alpha1/namespaces/{ns}/functions   (list, ?watch)
  GET|PUT|PATCH|DELETE  .../functions/{name}        (spec changes bump metadata.generation)
  GET|PUT|PATCH         .../functions/{name}/status (status subresource: only .status changes)

Validation, as a real API server does it (k8s_admission.py): object names, label keys and
values, annotations, owner references; pods (containers, volumes and mounts, env names,
quantities, probes) and pod immutability on update; Functions against the CRD's
openAPIV3Schema (unknown fields pruned with a `Warning` header, or rejected with
`?fieldValidation=Strict`; defaults applied) and its CEL rules, evaluated with cel-python.
PATCH honours the content type: merge (RFC 7386), JSON patch (RFC 6902), strategic merge
(built-in kinds only: a custom resource answers 415, as the real server does).

Emulated, not real: there is no scheduler or kubelet -- a created pod is "scheduled" at once
onto the node its required node affinity (kubernetes.io/hostname) or nodeName names (Pending
and Unschedulable when that node is missing, cordoned, NotReady, tainted without a
toleration, or short of the pod's cpu/memory requests next to the pods bound there), and marked Running/Ready with PodScheduled/ContainersReady timestamps unless a
test hook says otherwise (`image_pull_errors`, `crash_images`, `ready`); ownerReference garbage
collection deletes pods when their Function is deleted (switch it off with `gc=False` to test
the controller's own cleanup); no admission webhooks, quota or Pod Security admission;
deletion is immediate (no grace period).
The wire protocol (the HTTP handler, selectors) is in k8s_emulator_http.py; this module keeps the
state, the emulated scheduler/kubelet and the test hooks.
Test hooks: `compact()` forgets the event history (watches resuming from older versions get a
410 ERROR event), `drop_watches()` cuts every open watch stream mid-chunk, `inject_watch_errors`,
`reject_pod_creates` (a 403 message, as a quota would give), `set_node(...)`, `kubelet_sync()`.
"""

from __future__ import annotations

import copy
import threading
import uuid
from http.server import ThreadingHTTPServer

from hearth.controller.crd import function_crd
from hearth.controller.k8s.pods import parse_cpu, parse_memory_mb
from k8s_admission import (
    CustomResourceAdmission,
)
from k8s_emulator_http import _Handler, _now_iso


class Store:
    def __init__(self) -> None:
        self.objs: dict[tuple[str, str, str], dict] = {}  # (kind, ns, name) -> object
        self.events: list[tuple[int, str, str, dict]] = []  # (rv, kind, type, object)
        self.rv = 100
        self.compacted = 0
        self.cond = threading.Condition()
        self.drop_gen = 0
        self.requests: list[tuple[str, str]] = []
        self.nodes: list[dict] = []

    def _emit(self, kind: str, etype: str, obj: dict) -> None:
        self.events.append(
            (int(obj["metadata"]["resourceVersion"]), kind, etype, copy.deepcopy(obj))
        )
        self.cond.notify_all()

    def bump(self, obj: dict) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)


class Emulator:
    def __init__(
        self,
        nodes: list[tuple[str, str, str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        crd: dict | None = None,
        gc: bool = True,
    ) -> None:
        self.store = Store()
        self.admission = CustomResourceAdmission(crd or function_crd())
        self.gc = gc
        self.reject_pod_creates: str | None = None
        self.image_pull_errors: set[str] = set()
        self.crash_images: set[str] = set()
        self.ready = lambda pod: True  # the kubelet's readiness verdict for a running pod
        for name, cpu, mem in nodes or [
            ("node-a", "4", "8Gi"),
            ("node-b", "4", "8Gi"),
            ("node-c", "4", "8Gi"),
        ]:
            self.store.nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": {"kubernetes.io/hostname": name},
                        "resourceVersion": "1",
                        "uid": str(uuid.uuid4()),
                    },
                    "spec": {},
                    "status": {
                        "allocatable": {"cpu": cpu, "memory": mem, "pods": "110"},
                        "capacity": {"cpu": cpu, "memory": mem},
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )
        self.inject_watch_errors = 0
        handler = type("H", (_Handler,), {"emu": self})
        # host/port: the multi-node tests run it in a container on their private network
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host = self.server.server_address[0]
        return (
            f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.server.server_address[1]}"
        )

    def start(self) -> Emulator:
        self.thread.start()
        return self

    def api_client(self):
        """The official client's ApiClient pointed at this emulator (a context manager)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def stop(self) -> None:
        self.drop_watches()
        self.server.shutdown()
        self.server.server_close()

    # --- test hooks ----------------------------------------------------------------------------
    def compact(self) -> None:
        with self.store.cond:
            self.store.compacted = self.store.rv
            self.store.events.clear()

    def drop_watches(self) -> None:
        with self.store.cond:
            self.store.drop_gen += 1
            self.store.cond.notify_all()

    def set_node(
        self,
        name: str,
        unschedulable: bool | None = None,
        taints: list[dict] | None = None,
        ready: bool | None = None,
    ) -> None:
        """Cordon, taint or mark a node NotReady, as kubectl and the node controller would."""
        with self.store.cond:
            n = next(n for n in self.store.nodes if n["metadata"]["name"] == name)
            if unschedulable is not None:
                n["spec"]["unschedulable"] = unschedulable
            if taints is not None:
                n["spec"]["taints"] = taints
            if ready is not None:
                n["status"]["conditions"] = [
                    {"type": "Ready", "status": "True" if ready else "False"}
                ]
            self.store.rv += 1
            n["metadata"]["resourceVersion"] = str(self.store.rv)

    def kubelet_sync(self) -> None:
        """Re-run the stand-in scheduler/kubelet over every pod (after a hook changed)."""
        with self.store.cond:
            for key, pod in list(self.store.objs.items()):
                if key[0] != "pods":
                    continue
                before = copy.deepcopy(pod.get("status"))
                self._schedule(pod)
                if pod.get("status") != before:
                    self.store.bump(pod)
                    self.store._emit("pods", "MODIFIED", pod)

    def objects(self, kind: str, ns: str = "default") -> dict[str, dict]:
        with self.store.cond:
            return {
                name: copy.deepcopy(o)
                for (k, n, name), o in self.store.objs.items()
                if k == kind and n == ns
            }

    def delete(self, kind: str, ns: str, name: str) -> None:
        """Delete an object as another client (e.g. kubectl) would."""
        with self.store.cond:
            self._delete(kind, ns, name)

    def _delete(self, kind: str, ns: str, name: str) -> dict | None:
        s = self.store
        obj = s.objs.pop((kind, ns, name), None)
        if obj is None:
            return None
        s.bump(obj)
        s._emit(kind, "DELETED", obj)
        if kind == "functions" and self.gc:  # garbage collection of owned pods
            uid = obj["metadata"]["uid"]
            for key, o in list(s.objs.items()):
                if key[0] == "pods" and any(
                    r.get("uid") == uid for r in o["metadata"].get("ownerReferences", [])
                ):
                    self._delete(*key)
        return obj

    def _schedule(self, pod: dict) -> None:
        """Stand-in for the scheduler and kubelet (see module docstring)."""
        spec = pod.setdefault("spec", {})
        node = spec.get("nodeName")
        if not node:
            try:
                terms = spec["affinity"]["nodeAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]["nodeSelectorTerms"]
                for t in terms:
                    for e in t.get("matchExpressions", []):
                        if e["key"] == "kubernetes.io/hostname" and e["operator"] == "In":
                            node = e["values"][0]
            except (KeyError, TypeError, IndexError):
                node = None
        if spec.get("nodeName"):
            pass  # already bound: a scheduler never moves a pod
        elif (why := self._unschedulable(node, spec)) is not None:
            pod["status"] = {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": why,
                        "lastTransitionTime": (pod.get("status") or {})
                        .get("conditions", [{}])[0]
                        .get("lastTransitionTime")
                        or _now_iso(),
                    }
                ],
            }
            return
        spec["nodeName"] = node
        images = [c.get("image", "") for c in spec.get("containers", [])]
        old = pod.get("status") or {}
        t = old.get("startTime") or _now_iso()
        waiting = None
        if any(i in self.image_pull_errors for i in images):
            waiting = ("ErrImagePull", "failed to pull image: not found")
        elif any(i in self.crash_images for i in images):
            waiting = ("CrashLoopBackOff", "back-off 10s restarting failed container")
        if waiting is not None:
            pod["status"] = {
                "phase": "Pending" if waiting[0] == "ErrImagePull" else "Running",
                "startTime": t,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": "ContainersNotReady",
                        "lastTransitionTime": t,
                    },
                ],
                "containerStatuses": [
                    {
                        "name": c.get("name", "c"),
                        "ready": False,
                        "restartCount": 3 if waiting[0] == "CrashLoopBackOff" else 0,
                        "image": c.get("image", ""),
                        "imageID": "",
                        "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}},
                    }
                    for c in spec.get("containers", [])
                ],
            }
            return
        ready = "True" if self.ready(pod) else "False"
        pod["status"] = {
            "phase": "Running",
            "startTime": t,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
                {"type": "Ready", "status": ready, "lastTransitionTime": t},
            ],
            "containerStatuses": [
                {
                    "name": c.get("name", "c"),
                    "ready": ready == "True",
                    "restartCount": 0,
                    "image": c.get("image", ""),
                    "imageID": "",
                    "state": {"running": {"startedAt": t}},
                }
                for c in spec.get("containers", [])
            ],
        }

    def _unschedulable(self, node: str | None, spec: dict) -> str | None:
        """Why the scheduler would not bind a pod pinned to `node` (None: it would)."""
        n = next((n for n in self.store.nodes if n["metadata"]["name"] == node), None)
        if n is None:
            return f"0/{len(self.store.nodes)} nodes are available: node(s) didn't match Pod's node affinity/selector"
        if n["spec"].get("unschedulable"):
            return "0/1 nodes are available: node(s) were unschedulable"
        if any(c["type"] == "Ready" and c["status"] != "True" for c in n["status"]["conditions"]):
            return "0/1 nodes are available: node(s) had untolerated taint {node.kubernetes.io/not-ready: }"
        need = _requests(spec)
        used = [0, 0]
        for (k, _, _), o in self.store.objs.items():
            if k == "pods" and (o.get("spec") or {}).get("nodeName") == node:
                if (o.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                    r = _requests(o["spec"])
                    used = [used[0] + r[0], used[1] + r[1]]
        alloc = n["status"]["allocatable"]
        for i, (what, cap) in enumerate(
            (("cpu", parse_cpu(alloc["cpu"])), ("memory", parse_memory_mb(alloc["memory"])))
        ):
            if used[i] + need[i] > cap:
                return f"0/1 nodes are available: 1 Insufficient {what}"
        tolerations = spec.get("tolerations") or []
        for taint in n["spec"].get("taints") or []:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            if not any(
                (t.get("operator") == "Exists" and t.get("key") in (None, taint["key"]))
                or (t.get("key") == taint["key"] and t.get("value") == taint.get("value"))
                for t in tolerations
            ):
                return f"0/1 nodes are available: node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"
        return None


def _requests(spec: dict) -> tuple[int, int]:
    """(millicores, MiB) requested by a pod spec's containers."""
    cpu = mem = 0
    for c in spec.get("containers") or []:
        req = (c.get("resources") or {}).get("requests") or {}
        cpu += parse_cpu(req.get("cpu", "0"))
        mem += parse_memory_mb(req.get("memory", "0"))
    return cpu, mem
