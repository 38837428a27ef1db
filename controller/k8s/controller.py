"""The Kubernetes shell around the decision core.

`KubernetesController(api_client, namespace)`:
  reconcile_once()  list Functions, nodes and Hearth pods; validate each Function with
                    hearth.spec (a bad one gets Ready=False/InvalidSpec in .status and is skipped,
                    never crash-looped); feed an Observation to the DecisionCore; carry out its
                    Start (create a pod: labels, ownerReference to the Function, required node
                    affinity on kubernetes.io/hostname from placement) and Stop (delete the pod)
                    actions; write readyInstances/desiredInstances/conditions back to .status.
  run(stop_event)   watch Functions and pods (one thread each) and reconcile on every change and
                    every `resync_s`. A watch resumes from its last resourceVersion after a
                    dropped connection, and relists after 410 Gone. Errors are logged and retried
                    with backoff; nothing here raises out of the loop.
No leader election: run one controller per namespace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hearth import __version__
from hearth.controller.backend import InstanceHandle
from hearth.controller.coldstarts import ColdStartRecord, from_k8s_phases, pod_id
from hearth.controller.crd import GROUP, KIND, PLURAL, VERSION, spec_from_resource
from hearth.controller.decide import DecisionCore
from hearth.controller.model import FunctionLoad, Instance, Node, Observation, Start, Stop
from hearth.spec import FunctionSpec, SpecError
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("hearth.controller.k8s")

MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_FUNCTION = "hearth.dev/function"
LABEL_INSTANCE = "hearth.dev/instance"
LABEL_GROUP = "hearth.dev/affinity-group"
ANN_LAST_USED = "hearth.dev/last-used"
ANN_PHASES = "hearth.dev/phases"
SELECTOR = f"{MANAGED_BY}=hearth"
#: the image `make image` builds: one image for every role, function instances included
DEFAULT_IMAGE = f"localhost/hearth:{__version__}"

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


def _ts(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v.timestamp()
    return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ReconcileReport:
    functions: int = 0
    invalid: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def pod_manifest(
    spec: FunctionSpec,
    node: str,
    name: str,
    owner: dict[str, Any] | None,
    image: str,
    from_pool: bool = False,
) -> dict[str, Any]:
    """The pod for one instance: required node affinity from placement, labels, owner."""
    labels = {
        MANAGED_BY: "hearth",
        LABEL_FUNCTION: spec.name,
        LABEL_INSTANCE: name,
        **{k: v for k, v in spec.labels.items()},
    }
    if spec.affinity_group:
        labels[LABEL_GROUP] = spec.affinity_group
    meta: dict[str, Any] = {
        "name": name,
        "labels": labels,
        "annotations": {"hearth.dev/from-pool": str(from_pool).lower()},
    }
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    res = {"cpu": f"{spec.resources.cpu_millicores}m", "memory": f"{spec.resources.memory_mb}Mi"}
    env = [
        {"name": "HEARTH_FUNCTION", "value": spec.name},
        {"name": "HEARTH_HANDLER", "value": spec.handler},
        *({"name": k, "value": v} for k, v in sorted(spec.env.items())),
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "restartPolicy": "Always",
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "In",
                                        "values": [node],
                                    }
                                ]
                            }
                        ]
                    }
                }
            },
            "containers": [
                {
                    "name": "function",
                    "image": image,
                    "env": env,
                    "resources": {"requests": res, "limits": {"memory": res["memory"]}},
                }
            ],
        },
    }


def _pod_node(pod: dict) -> str:
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return spec["nodeName"]
    try:
        return spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]["matchExpressions"][0]["values"][0]
    except (KeyError, IndexError, TypeError):
        return ""


def pod_to_instance(pod: dict) -> Instance:
    meta, status = pod["metadata"], pod.get("status") or {}
    conds = {c["type"]: c.get("status") for c in status.get("conditions") or []}
    if meta.get("deletionTimestamp"):
        state = "stopping"
    elif status.get("phase") == "Running" and conds.get("Ready") == "True":
        state = "idle"
    else:
        state = "starting"
    res = (pod["spec"]["containers"][0].get("resources") or {}).get("requests") or {}
    started = _ts(meta.get("creationTimestamp")) or 0.0
    ann = meta.get("annotations") or {}
    last = float(ann[ANN_LAST_USED]) if ANN_LAST_USED in ann else started
    return Instance(
        id=meta["name"],
        function=(meta.get("labels") or {}).get(LABEL_FUNCTION),
        node=_pod_node(pod),
        state=state,
        memory_mb=parse_memory_mb(res.get("memory", "256Mi")),
        cpu_millicores=parse_cpu(res.get("cpu", "500m")),
        started_at=started,
        last_used_at=last,
        from_pool=ann.get("hearth.dev/from-pool") == "true",
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
    res = (pod["spec"]["containers"][0].get("resources") or {}).get("requests") or {}
    return from_k8s_phases(
        created=_ts(meta["creationTimestamp"]),
        scheduled=sched,
        containers_started=started,
        runtime=json.loads(ann[ANN_PHASES]),
        function=(meta.get("labels") or {}).get(LABEL_FUNCTION, ""),
        pod=pod_id(
            parse_cpu(res.get("cpu", "500m")), parse_memory_mb(res.get("memory", "256Mi")), n
        ),
        from_pool=ann.get("hearth.dev/from-pool") == "true",
        cluster=cluster,
    )


class KubernetesController:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str = "default",
        core: DecisionCore | None = None,
        image: str = DEFAULT_IMAGE,
        loads: Any = None,  # callable(function) -> FunctionLoad | None (gateway/eBPF counters)
        resync_s: float = 30.0,
        watch_timeout_s: int = 5,
        clock=time.time,
    ) -> None:
        self.api = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.ns = namespace
        self.core = core or DecisionCore()
        self.image = image
        self.loads = loads
        self.resync_s = resync_s
        self.watch_timeout_s = watch_timeout_s
        self.clock = clock
        self.stats = {
            "reconciles": 0,
            "watch_events": 0,
            "watch_resumes": 0,
            "relists_after_410": 0,
            "reconcile_errors": 0,
        }
        self._dirty = threading.Event()
        self._lock = threading.Lock()

    # --- raw JSON helpers (the typed models drop unknown fields; plain dicts keep it simple) ---
    def _json(self, resp) -> Any:
        return json.loads(resp.data)

    def list_functions(self) -> dict[str, Any]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)

    def list_pods(self) -> dict[str, Any]:
        return self._json(
            self.api.list_namespaced_pod(self.ns, label_selector=SELECTOR, _preload_content=False)
        )

    def list_nodes(self) -> list[Node]:
        out = []
        for n in self._json(self.api.list_node(_preload_content=False))["items"]:
            alloc = (n.get("status") or {}).get("allocatable") or {}
            out.append(
                Node(
                    n["metadata"]["name"],
                    parse_cpu(alloc.get("cpu", "0")),
                    parse_memory_mb(alloc.get("memory", "0")),
                    n["metadata"].get("labels") or {},
                )
            )
        return out

    def create_pod(self, manifest: dict[str, Any]) -> str:
        name = manifest["metadata"]["name"]
        for _ in range(3):
            try:
                self.api.create_namespaced_pod(self.ns, manifest, _preload_content=False)
                return name
            except ApiException as e:
                if e.status != 409:
                    raise
                name = f"{manifest['metadata']['name']}-{uuid.uuid4().hex[:5]}"
                manifest["metadata"]["name"] = name
                manifest["metadata"]["labels"][LABEL_INSTANCE] = name
        raise RuntimeError(f"could not find a free pod name for {manifest['metadata']['name']}")

    def delete_pod(self, name: str) -> None:
        try:
            self.api.delete_namespaced_pod(name, self.ns, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise

    # --- reconcile -----------------------------------------------------------------------------
    def reconcile_once(self) -> ReconcileReport:
        with self._lock:
            return self._reconcile()

    def _reconcile(self) -> ReconcileReport:
        rep = ReconcileReport()
        self.stats["reconciles"] += 1
        fobjs = {f["metadata"]["name"]: f for f in self.list_functions().get("items", [])}
        nodes = self.list_nodes()
        pods = self.list_pods()["items"]
        specs: dict[str, FunctionSpec] = {}
        for name, f in sorted(fobjs.items()):
            try:
                specs[name] = spec_from_resource(f, f"Function {self.ns}/{name}")
            except SpecError as e:
                rep.invalid[name] = str(e)
        rep.functions = len(fobjs)
        instances = []
        for p in pods:
            phase = (p.get("status") or {}).get("phase")
            fn = (p["metadata"].get("labels") or {}).get(LABEL_FUNCTION)
            if phase in ("Failed", "Succeeded") or fn not in fobjs:
                # a dead pod is replaced; an orphan (its Function is gone) is removed
                self.delete_pod(p["metadata"]["name"])
                rep.deleted.append(p["metadata"]["name"])
                continue
            instances.append(pod_to_instance(p))
        loads = {}
        if self.loads is not None:
            for fn in specs:
                ld = self.loads(fn)
                if ld is not None:
                    loads[fn] = ld
        obs = Observation(
            self.clock(), nodes, [i for i in instances if i.function in specs], specs, loads
        )
        actions = self.core.decide(obs)
        started: dict[str, int] = {}
        for a in actions:
            try:
                if isinstance(a, Start):
                    spec = specs[a.function]
                    m = pod_manifest(
                        spec,
                        a.node,
                        a.instance_id,
                        fobjs[a.function],
                        spec.image or self.image,
                        a.from_pool is not None,
                    )
                    rep.created.append(self.create_pod(m))
                    started[a.function] = started.get(a.function, 0) + 1
                elif isinstance(a, Stop):
                    self.delete_pod(a.instance_id)
                    rep.deleted.append(a.instance_id)
            except ApiException as e:
                rep.errors.append(f"{type(a).__name__} {a}: {e.status} {e.reason}")
        # status
        by_fn: dict[str, list[Instance]] = {}
        for i in instances:
            by_fn.setdefault(i.function or "", []).append(i)
        stopped = set(rep.deleted)
        for name, f in fobjs.items():
            mine = [i for i in by_fn.get(name, []) if i.id not in stopped and i.state != "stopping"]
            desired = len(mine) + started.get(name, 0)
            ready = sum(1 for i in mine if i.state == "idle")
            if name in rep.invalid:
                cond = ("False", "InvalidSpec", rep.invalid[name])
            elif desired == 0:
                cond = ("True", "ScaledToZero", "no instances wanted")
            elif ready >= desired:
                cond = ("True", "InstancesReady", f"{ready}/{desired} instances ready")
            else:
                cond = ("False", "Scaling", f"{ready}/{desired} instances ready")
            try:
                self._write_status(f, ready, desired, cond)
            except ApiException as e:
                rep.errors.append(f"status {name}: {e.status} {e.reason}")
        return rep

    def _write_status(self, f: dict, ready: int, desired: int, cond: tuple[str, str, str]) -> None:
        old = f.get("status") or {}
        gen = f["metadata"].get("generation", 0)
        prev = next((c for c in old.get("conditions") or [] if c.get("type") == "Ready"), None)
        status, reason, message = cond
        same = (
            prev is not None
            and (prev.get("status"), prev.get("reason"), prev.get("message")) == cond
        )
        if (
            same
            and old.get("readyInstances") == ready
            and old.get("desiredInstances") == desired
            and old.get("observedGeneration") == gen
        ):
            return  # unchanged: do not emit a MODIFIED event (it would wake the watch again)
        ltt = (
            prev["lastTransitionTime"]
            if prev is not None and prev.get("status") == status and prev.get("lastTransitionTime")
            else _now_iso()
        )
        body = {
            "status": {
                "readyInstances": ready,
                "desiredInstances": desired,
                "observedGeneration": gen,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": status,
                        "reason": reason,
                        "message": message[:1000],
                        "lastTransitionTime": ltt,
                        "observedGeneration": gen,
                    }
                ],
            }
        }
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.ns, PLURAL, f["metadata"]["name"], body
        )

    # --- watch loop ----------------------------------------------------------------------------
    def _watch(self, kind: str, stop: threading.Event) -> None:
        if kind == "functions":

            def lister(**kw):
                return self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.ns, PLURAL, **kw
                )
        else:

            def lister(**kw):
                return self.api.list_namespaced_pod(self.ns, label_selector=SELECTOR, **kw)

        rv: str | None = None
        backoff = 0.2
        while not stop.is_set():
            try:
                if rv is None:  # (re)list: the state is read by the reconcile this triggers
                    listing = self.list_functions() if kind == "functions" else self.list_pods()
                    rv = listing["metadata"]["resourceVersion"]
                    self._dirty.set()
                w = watch.Watch()
                for ev in w.stream(
                    lister, resource_version=rv, timeout_seconds=self.watch_timeout_s
                ):
                    rv = ev["raw_object"]["metadata"]["resourceVersion"]
                    self.stats["watch_events"] += 1
                    self._dirty.set()
                    if stop.is_set():
                        w.stop()
                        break
                backoff = 0.2
            except ApiException as e:
                if e.status == 410:
                    self.stats["relists_after_410"] += 1
                    log.info("watch %s: 410 Gone, relisting", kind)
                    rv = None
                else:
                    log.warning("watch %s: API error %s, retrying", kind, e.status)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
            except Exception as e:  # dropped connection, protocol error: resume from rv
                self.stats["watch_resumes"] += 1
                log.info("watch %s: %s; resuming from %s", kind, type(e).__name__, rv)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def run(self, stop_event: threading.Event) -> None:
        """Watch and reconcile until `stop_event` is set."""
        threads = [
            threading.Thread(
                target=self._watch, args=(k, stop_event), daemon=True, name=f"hearth-watch-{k}"
            )
            for k in ("functions", "pods")
        ]
        for t in threads:
            t.start()
        backoff = 0.2
        while not stop_event.is_set():
            self._dirty.wait(self.resync_s)
            if stop_event.is_set():
                break
            self._dirty.clear()
            try:
                self.reconcile_once()
                backoff = 0.2
            except Exception:
                self.stats["reconcile_errors"] += 1
                log.exception("reconcile failed; retrying")
                stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                self._dirty.set()
        for t in threads:
            t.join(timeout=self.watch_timeout_s + 2)


class KubernetesBackend:
    """The backend protocol over pods (async facade over the synchronous official client)."""

    def __init__(
        self, api_client: client.ApiClient, namespace: str = "default", image: str = DEFAULT_IMAGE
    ) -> None:
        self.k = KubernetesController(api_client, namespace, image=image)

    async def nodes(self) -> list[Node]:
        return await asyncio.to_thread(self.k.list_nodes)

    async def start_instance(
        self, spec, node, instance_id, from_pool=None, runtime=None
    ) -> InstanceHandle:
        if spec is None:
            raise ValueError("generic warm-pool pods are not supported on the Kubernetes backend")
        nodes = {n.name for n in await self.nodes()}
        if node not in nodes:
            raise ValueError(f"unknown node {node!r}")

        def go() -> str:
            try:
                owner = self.k.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.k.ns, PLURAL, spec.name
                )
            except ApiException as e:
                if e.status != 404:
                    raise
                owner = None
            try:
                self.k.api.create_namespaced_pod(
                    self.k.ns,
                    pod_manifest(spec, node, instance_id, owner, spec.image or self.k.image),
                    _preload_content=False,
                )
            except ApiException as e:
                if e.status == 409:
                    raise ValueError(f"instance id {instance_id!r} already exists") from None
                raise
            return instance_id

        await asyncio.to_thread(go)
        return InstanceHandle(instance_id, spec.name, node, spec.runtime, False)

    async def stop_instance(self, instance_id: str, graceful: bool = True) -> None:
        await asyncio.to_thread(self.k.delete_pod, instance_id)

    async def instances(self) -> list[Instance]:
        pods = await asyncio.to_thread(self.k.list_pods)
        return [pod_to_instance(p) for p in pods["items"]]


__all__ = [
    "KubernetesController",
    "KubernetesBackend",
    "pod_manifest",
    "pod_to_instance",
    "cold_start_record",
    "FunctionLoad",
]
