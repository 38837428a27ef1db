"""Client-side helpers for tests on the API emulator (through the official client)."""

from __future__ import annotations

from typing import Any

from hearth.controller.crd import GROUP, PLURAL, VERSION
from hearth.controller.crd import function_resource as _resource
from hearth.spec import parse_spec
from kubernetes import client


def function_resource(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A Function object from a FunctionSpec-shaped dict (snake_case, without `name`)."""
    return _resource(parse_spec({"name": name, **spec}))


def create_function(api: client.ApiClient, name: str, spec: dict[str, Any], ns: str = "default"):
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, function_resource(name, spec)
    )
