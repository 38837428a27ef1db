"""Cross-check of the Kubernetes controller against kmock's KubernetesEmulator (kopf author's
emulator, PyPI `kmock`), driven by the official client. kmock keeps objects but not
resourceVersions, 410s or label selection, so watch resumption is tested against
k8s_emulator.py instead; this test covers create Function -> pods -> status on kmock."""

from __future__ import annotations

import asyncio

import kmock
from hearth.controller.crd import API_VERSION, GROUP, PLURAL, VERSION
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s import KubernetesController
from kubernetes import client


async def test_function_to_pods_on_kmock(kmock: kmock.KubernetesEmulator) -> None:
    kmock.resources["v1/nodes"] = {"kind": "Node", "namespaced": False}
    kmock.resources["v1/pods"] = {"kind": "Pod", "namespaced": True}
    kmock.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = {
        "kind": "Function",
        "namespaced": True,
        "subresources": {"status"},
    }
    for name in ("node-a", "node-b"):
        kmock.objects["v1/nodes", None, name] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {
                "allocatable": {"cpu": "4", "memory": "8Gi"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    kmock.objects[f"{GROUP}/{VERSION}/{PLURAL}", "default", "agg"] = {
        "apiVersion": API_VERSION,
        "kind": "Function",
        "metadata": {"name": "agg", "namespace": "default", "uid": "uid-agg", "generation": 1},
        "spec": {
            "handler": "app:handle",
            "minInstances": 2,
            "affinityGroup": "tree",
            "resources": {"memoryMb": 512, "cpuMillicores": 500},
        },
    }
    cfg = client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    with client.ApiClient(cfg) as api:
        ctl = KubernetesController(api, "default", core=DecisionCore())
        rep = await asyncio.to_thread(ctl.reconcile_once)
    assert len(rep.created) == 2 and not rep.invalid and not rep.errors
    pods = [k for k in kmock.objects if k[0] == kmock.resource("v1/pods")]
    assert len(pods) == 2
    nodes = set()
    for key in pods:
        pod = kmock.objects[key]
        assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-agg"
        terms = pod["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        nodes.add(terms[0]["matchExpressions"][0]["values"][0])
    assert len(nodes) == 1  # the affinity group is packed onto one node
    fn = kmock.objects[f"{GROUP}/{VERSION}/{PLURAL}", "default", "agg"]
    assert fn["status"]["desiredInstances"] == 2
