"""Function resources become what the node agents serve: the controller writes their specs into
the function registry (a real Redis server) and removes the ones it wrote when the Function goes;
functions deployed through the admin API stay."""

from __future__ import annotations

import asyncio
import json

import redis
from hearth.controller.crd import API_VERSION, GROUP, PLURAL, VERSION, api_fields
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s import KubernetesController
from hearth.controller.k8s.registry_sync import RegistrySync
from hearth.registry import KEY, Registry
from hearth.spec import FunctionSpec
from k8s_emulator import Emulator
from kubernetes import client


def test_functions_are_synced_into_the_registry(redis_url):
    e = Emulator().start()
    r = redis.Redis.from_url(redis_url)
    try:
        admin = FunctionSpec(name="admin-fn", handler="m:h")
        r.hset(KEY, admin.name, json.dumps(admin.to_dict()))  # as the admin API writes it
        with e.api_client() as api:
            custom = client.CustomObjectsApi(api)
            body = {"handler": "app:handle", "env": {"MODE": "x"}, "max_instances": 3}
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                "default",
                PLURAL,
                {
                    "apiVersion": API_VERSION,
                    "kind": "Function",
                    "metadata": {"name": "web"},
                    "spec": api_fields(body),
                },
            )
            sync = RegistrySync(redis_url, "default")
            c = KubernetesController(api, "default", core=DecisionCore(), registry=sync)
            c.reconcile_once()
            got = asyncio.run(_get(redis_url, "web"))
            assert got == FunctionSpec(name="web", **body)
            assert sync.sync({"web": got}) == ([], [])  # unchanged: nothing written
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, "web", {"spec": {"maxInstances": 5}}
            )
            c.reconcile_once()
            assert asyncio.run(_get(redis_url, "web")).max_instances == 5
            custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "web")
            c.reconcile_once()
            assert r.hget(KEY, "web") is None
            assert r.hget(KEY, "admin-fn") is not None  # not the controller's
            sync.close()
    finally:
        r.close()
        e.stop()


async def _get(url: str, name: str) -> FunctionSpec | None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        return await Registry(r).get(name)
    finally:
        await r.aclose()
