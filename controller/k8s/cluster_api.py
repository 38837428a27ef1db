"""The controller's reads and writes in its namespace through the official client: Functions,
pods and nodes listed as plain JSON (the typed models drop unknown fields), instance pods
created, claimed and deleted, Events, `.status`, and the Secret/ConfigMap reader for
`refs.resolve`. No decisions here: `KubernetesController` decides what to call."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hearth.controller.crd import API_VERSION, GROUP, PLURAL, VERSION
from hearth.controller.k8s.pods import (
    LABEL_INSTANCE,
    MANAGED_BY,
    SELECTOR,
    claim_patch,
    dns_label,
    parse_cpu,
    parse_memory_mb,
    pod_requests,
)
from hearth.controller.k8s.refs import SECRET, Reader, RefObject, RefReadError, ref_object
from hearth.controller.model import Node
from hearth.spec import FunctionSpec
from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("hearth.controller.k8s")


def api_message(e: ApiException) -> str:
    """The API server's own message (the Status body), else the HTTP reason."""
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_schedulable(n: dict) -> str | None:
    """Why placement must skip a node (None: it may use it): cordoned, NotReady, or a
    NoSchedule/NoExecute taint (instance pods carry no tolerations)."""
    if (n.get("spec") or {}).get("unschedulable"):
        return "cordoned"
    conds = {
        c.get("type"): c.get("status") for c in (n.get("status") or {}).get("conditions") or []
    }
    if conds.get("Ready") != "True":
        return "NotReady"
    for t in (n.get("spec") or {}).get("taints") or []:
        if t.get("effect") in ("NoSchedule", "NoExecute"):
            return f"taint {t.get('key')}"
    return None


class NamespaceApi:
    """One namespace's API calls; `stats` counts what they changed."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        clock: Callable[[], float] = time.time,
        count_other_pods: bool = True,
    ) -> None:
        self.api = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.ns = namespace
        self.clock = clock
        self.count_other_pods = count_other_pods
        self._avoid: dict[str, float] = {}  # node -> until: a pod got stuck Pending there
        self.stats = {
            "pods_created": 0,
            "pods_deleted": 0,
            "pool_pods_claimed": 0,
        }

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
        """Nodes placement may use, with allocatable capacity minus what pods that are not
        Hearth's request (Hearth's own pods are instances in the observation)."""
        now = self.clock()
        used: dict[str, list[int]] = {}
        if self.count_other_pods:
            others = self._json(
                self.api.list_pod_for_all_namespaces(
                    field_selector="status.phase!=Succeeded,status.phase!=Failed",
                    _preload_content=False,
                )
            )["items"]
            for p in others:
                if (p["metadata"].get("labels") or {}).get(MANAGED_BY) == "hearth":
                    continue
                node = (p.get("spec") or {}).get("nodeName")
                if node:
                    cpu, mem = pod_requests(p)
                    u = used.setdefault(node, [0, 0])
                    u[0] += cpu
                    u[1] += mem
        out = []
        for n in self._json(self.api.list_node(_preload_content=False))["items"]:
            name = n["metadata"]["name"]
            if node_schedulable(n) is not None or self._avoid.get(name, 0) > now:
                continue
            alloc = (n.get("status") or {}).get("allocatable") or {}
            cpu_u, mem_u = used.get(name, (0, 0))
            out.append(
                Node(
                    name,
                    max(parse_cpu(alloc.get("cpu", "0")) - cpu_u, 0),
                    max(parse_memory_mb(alloc.get("memory", "0")) - mem_u, 0),
                    n["metadata"].get("labels") or {},
                )
            )
        return out

    def create_pod(self, manifest: dict[str, Any]) -> str:
        name = manifest["metadata"]["name"]
        for _ in range(3):
            try:
                self.api.create_namespaced_pod(self.ns, manifest, _preload_content=False)
                self.stats["pods_created"] += 1
                return name
            except ApiException as e:
                if e.status != 409:
                    raise
                name = dns_label(f"{manifest['metadata']['name']}-{uuid.uuid4().hex[:5]}")
                manifest["metadata"]["name"] = name
                manifest["metadata"]["labels"][LABEL_INSTANCE] = name
        raise RuntimeError(f"could not find a free pod name for {manifest['metadata']['name']}")

    def claim_pool_pod(self, name: str, spec: FunctionSpec, owner: dict[str, Any]) -> None:
        """Relabel a generic pool pod as an instance of `spec` (a metadata patch: pod specs are
        immutable, labels and owner references are not)."""
        body = {"metadata": claim_patch(spec, owner)}
        self.api.patch_namespaced_pod(name, self.ns, body, _preload_content=False)
        self.stats["pool_pods_claimed"] += 1

    def delete_pod(self, name: str) -> None:
        try:
            self.api.delete_namespaced_pod(name, self.ns, _preload_content=False)
            self.stats["pods_deleted"] += 1
        except ApiException as e:
            if e.status != 404:
                raise

    def event(self, fobj: dict, etype: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the Function (`kubectl describe function` shows it)."""
        meta = fobj["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": self.ns},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": "Function",
                "name": meta["name"],
                "namespace": self.ns,
                "uid": meta.get("uid"),
            },
            "type": etype,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "hearth-controller"},
            "firstTimestamp": _now_iso(),
            "lastTimestamp": _now_iso(),
            "count": 1,
        }
        try:
            self.api.create_namespaced_event(self.ns, body, _preload_content=False)
        except ApiException as e:  # events are best effort: never fail a reconcile for one
            log.info("event %s/%s not recorded: %s", meta["name"], reason, e.status)

    def ref_reader(self) -> Reader:
        """`read(kind, name)` for `refs.resolve`: each Secret/ConfigMap read once per reconcile
        (get only: the Role grants no list or watch on Secrets)."""
        cache: dict[tuple[str, str], RefObject | None] = {}

        def read(kind: str, name: str) -> RefObject | None:
            if (kind, name) not in cache:
                try:
                    if kind == SECRET:
                        resp = self.api.read_namespaced_secret(
                            name, self.ns, _preload_content=False
                        )
                    else:
                        resp = self.api.read_namespaced_config_map(
                            name, self.ns, _preload_content=False
                        )
                    cache[kind, name] = ref_object(kind, resp.data)
                except ApiException as e:
                    if e.status != 404:
                        raise RefReadError(f"{e.status} {e.reason}") from None
                    cache[kind, name] = None
            return cache[kind, name]

        return read

    def _write_status(
        self, f: dict, ready: int, desired: int, have: int, cond: tuple[str, str, str]
    ) -> None:
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
            and old.get("instances") == have
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
                "instances": have,
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
