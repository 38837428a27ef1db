"""The Kubernetes shell around the decision core.

`KubernetesController(api_client, namespace)` (its API calls: `cluster_api.NamespaceApi`):
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

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hearth.controller.crd import GROUP, PLURAL, VERSION, spec_from_resource
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s.cluster_api import NamespaceApi, api_message
from hearth.controller.k8s.pods import (
    DEFAULT_IMAGE,
    LABEL_FUNCTION,
    LABEL_ROLE,
    SELECTOR,
    PodSettings,
    _ts,
    cold_start_record,
    parse_cpu,
    parse_memory_mb,
    pod_manifest,
    pod_node,
    pod_problem,
    pod_to_instance,
    pool_pod_manifest,
)
from hearth.controller.k8s.refs import Unresolved, resolve
from hearth.controller.model import (
    FunctionLoad,
    Instance,
    Observation,
    Prewarm,
    Start,
    Stop,
)
from hearth.spec import FunctionSpec, SpecError
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("hearth.controller.k8s")


@dataclass
class ReconcileReport:
    functions: int = 0
    invalid: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # Pending too long: placed again
    claimed: list[str] = field(default_factory=list)  # pool pods that became a function's
    errors: list[str] = field(default_factory=list)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # fn -> (reason, msg)
    unresolved: dict[str, Unresolved] = field(default_factory=dict)  # Secret/ConfigMap refs


def ready_condition(
    name: str,
    rep: ReconcileReport,
    ready: int,
    desired: int,
    problems: list[tuple[str, str]] | None,
) -> tuple[str, str, str]:
    """A Function's Ready condition (status, reason, message), first match wins: an invalid
    spec, an unresolved ref, a failed pod create, scaled to zero, all ready, a pod's problem,
    else still scaling."""
    if name in rep.invalid:
        return ("False", "InvalidSpec", rep.invalid[name])
    if name in rep.unresolved:
        return ("False", rep.unresolved[name].reason, rep.unresolved[name].message)
    if name in rep.failures:
        return ("False", *rep.failures[name])
    if desired == 0:
        return ("True", "ScaledToZero", "no instances wanted; a request starts one")
    if ready >= desired:
        return ("True", "InstancesReady", f"{ready}/{desired} instances ready")
    if problems:
        reason, msg = problems[0]
        return ("False", reason, f"{ready}/{desired} instances ready: {msg}")
    return ("False", "Scaling", f"{ready}/{desired} instances ready")


class KubernetesController(NamespaceApi):
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str = "default",
        core: DecisionCore | None = None,
        image: str = DEFAULT_IMAGE,
        loads: Any = None,  # callable(function) -> FunctionLoad | None (node agents' counters)
        resync_s: float = 30.0,
        watch_timeout_s: int = 5,
        clock=time.time,
        settings: PodSettings | None = None,
        pending_timeout_s: float = 120.0,
        pool_targets: dict[str, int] | None = None,
        count_other_pods: bool = True,
        registry: Any = None,  # RegistrySync: Function specs -> what the node agents serve
    ) -> None:
        super().__init__(api_client, namespace, clock, count_other_pods)
        self.core = core or DecisionCore()
        self.settings = settings or PodSettings(image=image)
        self.image = self.settings.image
        self.loads = loads
        self.resync_s = resync_s
        self.watch_timeout_s = watch_timeout_s
        self.pending_timeout_s = pending_timeout_s
        self.pool_targets = dict(pool_targets or {})
        self.registry = registry
        self.stats.update(
            reconciles=0,
            watch_events=0,
            watch_resumes=0,
            relists_after_410=0,
            reconcile_errors=0,
            pods_replaced=0,
            pod_create_failures=0,
        )
        self.last_reconcile_ok: float | None = None
        self._dirty = threading.Event()
        self._lock = threading.Lock()

    # --- reconcile -----------------------------------------------------------------------------
    def reconcile_once(self) -> ReconcileReport:
        with self._lock:
            rep = self._reconcile()
            self.last_reconcile_ok = self.clock()
            return rep

    def _stuck(self, pod: dict, now: float) -> bool:
        """Pending and unscheduled for longer than `pending_timeout_s`."""
        reason = pod_problem(pod)
        created = _ts(pod["metadata"].get("creationTimestamp")) or now
        return (
            reason is not None
            and reason[0] == "Unschedulable"
            and now - created > self.pending_timeout_s
        )

    def _reconcile(self) -> ReconcileReport:
        rep = ReconcileReport()
        self.stats["reconciles"] += 1
        now = self.clock()
        fobjs = {f["metadata"]["name"]: f for f in self.list_functions().get("items", [])}
        pods = self.list_pods()["items"]
        specs, keep = self._read_specs(fobjs, rep)
        rep.functions = len(fobjs)
        if self.registry is not None:
            try:
                self.registry.sync(specs, keep=keep)
            except Exception as e:  # Redis down: pods still reconcile; the agents keep the last
                rep.errors.append(f"registry: {type(e).__name__}: {e}")
        instances, problems = self._sweep_pods(pods, fobjs, now, rep)
        actions = self.core.decide(self._observe(now, instances, specs))
        started = self._carry_out(actions, specs, fobjs, rep)
        self._report(fobjs, instances, problems, started, rep)
        return rep

    def _read_specs(
        self, fobjs: dict[str, dict], rep: ReconcileReport
    ) -> tuple[dict[str, FunctionSpec], set[str]]:
        """Each valid Function's spec, its Secret/ConfigMap refs resolved; the invalid and the
        unresolved go to ``rep``. Also the names whose refs are unreadable for now: the registry
        keeps what it had for them."""
        specs: dict[str, FunctionSpec] = {}
        read = self.ref_reader()
        keep: set[str] = set()
        for name, f in sorted(fobjs.items()):
            try:
                spec = spec_from_resource(f, f"Function {self.ns}/{name}")
            except SpecError as e:
                rep.invalid[name] = str(e)
                continue
            if spec.refs():
                served, problem = resolve(spec, read)
                if problem is not None:
                    rep.unresolved[name] = problem
                    if problem.transient:
                        keep.add(name)
                    continue
                spec = served
            specs[name] = spec
        return specs, keep

    def _sweep_pods(
        self, pods: list[dict], fobjs: dict[str, dict], now: float, rep: ReconcileReport
    ) -> tuple[list[Instance], dict[str, list[tuple[str, str]]]]:
        """Delete dead and orphaned pods, replace the stuck ones; the rest as instances, and
        each function's pod problems (for its status)."""
        instances = []
        problems: dict[str, list[tuple[str, str]]] = {}
        for p in pods:
            meta = p["metadata"]
            labels = meta.get("labels") or {}
            phase = (p.get("status") or {}).get("phase")
            fn = labels.get(LABEL_FUNCTION)
            role = labels.get(LABEL_ROLE, "instance")
            orphan = role == "instance" and fn not in fobjs
            if phase in ("Failed", "Succeeded") or orphan:
                # a dead pod is replaced; an orphan (its Function is gone) is removed
                self.delete_pod(meta["name"])
                rep.deleted.append(meta["name"])
                continue
            if self._stuck(p, now):
                node = pod_node(p)
                self._avoid[node] = now + 2 * self.pending_timeout_s
                self.delete_pod(meta["name"])
                rep.replaced.append(meta["name"])
                self.stats["pods_replaced"] += 1
                if fn in fobjs:
                    self.event(
                        fobjs[fn],
                        "Warning",
                        "Replaced",
                        f"pod {meta['name']} Pending on {node} for over {self.pending_timeout_s:.0f}s: placing it again elsewhere",
                    )
                continue
            prob = pod_problem(p)
            if prob is not None and fn:
                problems.setdefault(fn, []).append(prob)
            instances.append(pod_to_instance(p))
        return instances, problems

    def _observe(
        self, now: float, instances: list[Instance], specs: dict[str, FunctionSpec]
    ) -> Observation:
        """What the decision core sees: nodes, the valid functions' instances (and pool pods),
        their specs and the node agents' load counters."""
        nodes = self.list_nodes()
        loads = {}
        if self.loads is not None:
            for fn in specs:
                ld = self.loads(fn)
                if ld is not None:
                    loads[fn] = ld
        return Observation(
            now,
            nodes,
            [i for i in instances if i.function in specs or i.function is None],
            specs,
            loads,
            pool_targets=self.pool_targets,
        )

    def _carry_out(
        self,
        actions: list,
        specs: dict[str, FunctionSpec],
        fobjs: dict[str, dict],
        rep: ReconcileReport,
    ) -> dict[str, int]:
        """Create, claim and delete pods as decided; instances started per function. A refused
        call is an error in ``rep`` (a refused Start also a failure of its function)."""
        started: dict[str, int] = {}
        for a in actions:
            try:
                if isinstance(a, Start):
                    spec = specs[a.function]
                    if a.from_pool is not None:  # never for env_value_from: pool_can_serve
                        # Fission's poolmgr: the pool pod becomes the function's (labels and
                        # owner); its node agent specialises it (loads the code) on first use
                        self.claim_pool_pod(a.from_pool, spec, fobjs[a.function])
                        rep.claimed.append(a.from_pool)
                    else:
                        m = pod_manifest(
                            spec, a.node, a.instance_id, fobjs[a.function], self.settings
                        )
                        rep.created.append(self.create_pod(m))
                    started[a.function] = started.get(a.function, 0) + 1
                elif isinstance(a, Prewarm):
                    rep.created.append(
                        self.create_pod(
                            pool_pod_manifest(a.runtime, a.node, a.instance_id, self.settings)
                        )
                    )
                elif isinstance(a, Stop):
                    self.delete_pod(a.instance_id)
                    rep.deleted.append(a.instance_id)
            except ApiException as e:
                msg = api_message(e)
                rep.errors.append(f"{type(a).__name__} {a}: {e.status} {msg}")
                if isinstance(a, Start):
                    self.stats["pod_create_failures"] += 1
                    rep.failures[a.function] = ("PodCreateFailed", f"{e.status} {e.reason}: {msg}")
        return started

    def _report(
        self,
        fobjs: dict[str, dict],
        instances: list[Instance],
        problems: dict[str, list[tuple[str, str]]],
        started: dict[str, int],
        rep: ReconcileReport,
    ) -> None:
        """Each Function's status (instance counts, Ready condition) and events."""
        by_fn: dict[str, list[Instance]] = {}
        for i in instances:
            by_fn.setdefault(i.function or "", []).append(i)
        stopped = set(rep.deleted)
        for name, f in fobjs.items():
            mine = [i for i in by_fn.get(name, []) if i.id not in stopped and i.state != "stopping"]
            have = len(mine)
            desired = have + started.get(name, 0)
            ready = sum(1 for i in mine if i.state in ("idle", "busy"))
            cond = ready_condition(name, rep, ready, desired, problems.get(name))
            if name in rep.failures:
                self.event(f, "Warning", "FailedCreate", rep.failures[name][1])
            elif started.get(name):
                self.event(f, "Normal", "ScaledUp", f"started {started[name]} instance pod(s)")
            try:
                self._write_status(f, ready, desired, have, cond)
            except ApiException as e:
                rep.errors.append(f"status {name}: {e.status} {e.reason}")

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


__all__ = [
    "KubernetesController",
    "PodSettings",
    "pod_manifest",
    "pool_pod_manifest",
    "pod_to_instance",
    "cold_start_record",
    "parse_cpu",
    "parse_memory_mb",
    "FunctionLoad",
]
