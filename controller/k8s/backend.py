"""The backend protocol (`hearth.controller.backend`) over pods: an async facade over the
Kubernetes controller's synchronous client calls, for the decision core's `execute`."""

from __future__ import annotations

import asyncio

from hearth.controller.backend import InstanceHandle
from hearth.controller.crd import GROUP, PLURAL, VERSION
from hearth.controller.k8s.controller import KubernetesController
from hearth.controller.k8s.pods import (
    DEFAULT_IMAGE,
    dns_label,
    pod_manifest,
    pod_to_instance,
    pool_pod_manifest,
)
from hearth.controller.model import Instance, Node
from kubernetes import client
from kubernetes.client.rest import ApiException


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
        nodes = {n.name for n in await self.nodes()}
        if node not in nodes:
            raise ValueError(f"unknown node {node!r}")

        def go() -> str:
            if spec is None:  # a generic warm-pool pod
                manifest = pool_pod_manifest(
                    runtime or "python3.11", node, instance_id, self.k.settings
                )
            else:
                try:
                    owner = self.k.custom.get_namespaced_custom_object(
                        GROUP, VERSION, self.k.ns, PLURAL, spec.name
                    )
                except ApiException as e:
                    if e.status != 404:
                        raise
                    owner = None
                manifest = pod_manifest(spec, node, instance_id, owner, self.k.settings)
            try:
                self.k.api.create_namespaced_pod(self.k.ns, manifest, _preload_content=False)
            except ApiException as e:
                if e.status == 409:
                    raise ValueError(f"instance id {instance_id!r} already exists") from None
                raise
            return instance_id

        await asyncio.to_thread(go)
        if spec is None:
            return InstanceHandle(
                dns_label(instance_id), None, node, runtime or "python3.11", False
            )
        return InstanceHandle(dns_label(instance_id), spec.name, node, spec.runtime, False)

    async def stop_instance(self, instance_id: str, graceful: bool = True) -> None:
        await asyncio.to_thread(self.k.delete_pod, instance_id)

    async def instances(self) -> list[Instance]:
        pods = await asyncio.to_thread(self.k.list_pods)
        return [pod_to_instance(p) for p in pods["items"]]
