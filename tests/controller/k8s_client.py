"""Client-side helpers for tests on the API emulator (through the official client)."""

from __future__ import annotations

from typing import Any

from hearth.controller.crd import API_VERSION, GROUP, PLURAL, VERSION, api_fields
from kubernetes import client


def function_resource(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A Function object from a FunctionSpec-shaped dict (snake_case, without `name`)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Function",
        "metadata": {"name": name},
        "spec": api_fields(spec),
    }


def create_function(api: client.ApiClient, name: str, spec: dict[str, Any], ns: str = "default"):
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, function_resource(name, spec)
    )
