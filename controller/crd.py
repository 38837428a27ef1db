"""The `Function` CustomResourceDefinition, generated from `hearth.spec.FunctionSpec`.

This module is the single source of truth for the CRD: the Helm chart's
`charts/hearth/crds/functions.hearth.dev.yaml` is written from `function_crd()` (a test
asserts they are equal) and the Kubernetes backend uses the constants below. The spec
schema is derived from the pydantic model, so the API server, the chart and the controller
cannot drift apart.

Kubernetes wants a *structural* OpenAPI v3 schema; `structural.py` converts the pydantic JSON
schema into one (a pure function). This module adds the CRD around it and maps `Function`
resources to and from `FunctionSpec` (camelCase API fields <-> the model's names).

    python -m hearth.controller.crd > functions.hearth.dev.yaml
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from hearth.controller.structural import camel, to_structural
from hearth.spec import (
    LABEL_KEY_MAX,
    LABEL_KEY_RE,
    NAME_RE,
    RESERVED_ENV_PREFIX,
    RESERVED_LABEL_ALLOWED_PREFIX,
    RESERVED_LABEL_KEYS,
    RESERVED_LABEL_RE,
    FunctionSpec,
    SpecError,
)
from pydantic import ValidationError

GROUP = "hearth.dev"
VERSION = "v1alpha1"
KIND = "Function"
PLURAL = "functions"
SINGULAR = "function"
LIST_KIND = "FunctionList"
SHORT_NAMES = ["hfn"]
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"


def _model_schema(rename=camel) -> dict[str, Any]:
    js = FunctionSpec.model_json_schema()
    defs = js.get("$defs", {})
    js = copy.deepcopy(js)
    js["properties"].pop("name")
    js["required"] = [r for r in js.get("required", []) if r != "name"]
    js.pop("$defs", None)
    js.pop("title", None)
    return to_structural(js, defs, "spec", rename)


def _cel_str(s: str) -> str:
    """A CEL single-quoted string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def spec_schema() -> dict[str, Any]:
    """The structural schema of `.spec`: FunctionSpec minus `name` (it is metadata.name), with
    camelCase field names."""
    out = _model_schema()
    out["description"] = "Desired state of a Hearth function (hearth.spec.FunctionSpec minus name)."
    # The cross-field rule of FunctionSpec, so the API server rejects it too.
    out["x-kubernetes-validations"] = [
        {
            "rule": "!has(self.minInstances) || !has(self.maxInstances) "
            "|| self.minInstances <= self.maxInstances",
            "message": "minInstances exceeds maxInstances",
        },
        {
            "rule": "!has(self.invokeToken) || !has(self.invokeTokenSecretRef)",
            "message": "invokeToken and invokeTokenSecretRef: give one, not both",
        },
        {
            "rule": "!has(self.env) || !has(self.envValueFrom) "
            "|| self.envValueFrom.all(k, !(k in self.env))",
            "message": "env and envValueFrom set the same variable",
        },
    ]
    out["properties"]["envValueFrom"]["x-kubernetes-validations"] = [
        {
            "rule": f"self.all(k, !k.startsWith({_cel_str(RESERVED_ENV_PREFIX)}))",
            "message": f"envValueFrom: names starting with {RESERVED_ENV_PREFIX} are reserved",
        }
    ]
    # Label keys: syntax and the reserved keys (FunctionSpec._label_keys). The prefix's own
    # 253 limit is only checked by the model (CEL has no split in the base library).
    labels = out["properties"]["labels"]
    labels["x-kubernetes-validations"] = [
        {
            "rule": f"self.all(k, size(k) <= {LABEL_KEY_MAX} && k.matches({_cel_str(LABEL_KEY_RE)}))",
            "message": "label keys: optional DNS-subdomain prefix and '/', then <= 63 of "
            "[A-Za-z0-9-_.]",
        },
        {
            "rule": "self.all(k, !(k.matches("
            + _cel_str(RESERVED_LABEL_RE)
            + ") && !k.startsWith("
            + _cel_str(RESERVED_LABEL_ALLOWED_PREFIX)
            + "))"
            + "".join(f" && k != {_cel_str(r)}" for r in RESERVED_LABEL_KEYS)
            + ")",
            "message": "label keys of hearth.dev, kubernetes.io and k8s.io (except "
            "app.kubernetes.io/ other than managed-by) are reserved",
        },
    ]
    return out


def status_schema() -> dict[str, Any]:
    """What the controller reports: the usual conditions list plus instance counts."""
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "Condition type, e.g. Ready."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        },
    }
    return {
        "type": "object",
        "description": "Observed state, written by the Hearth controller.",
        "properties": {
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "readyInstances": {
                "type": "integer",
                "minimum": 0,
                "description": "Instances registered with their node agent (pod Ready).",
            },
            "desiredInstances": {
                "type": "integer",
                "minimum": 0,
                "description": "Instances the autoscaler wants.",
            },
            "instances": {
                "type": "integer",
                "minimum": 0,
                "description": "Instance pods that exist (any phase but terminating).",
            },
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        },
    }


def function_crd() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition for `Function`."""
    root = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                # FunctionSpec.name is a DNS-1123 label (<= 63), stricter than a CR name.
                "rule": f"self.metadata.name.matches('{NAME_RE}')",
                "message": "metadata.name must be a DNS-1123 label (lowercase, digits, '-', <= 63)",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "hearth"},
            "annotations": {"hearth.dev/generated-by": "python -m hearth.controller.crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": LIST_KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["hearth"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Handler", "type": "string", "jsonPath": ".spec.handler"},
                        {"name": "Min", "type": "integer", "jsonPath": ".spec.minInstances"},
                        {"name": "Max", "type": "integer", "jsonPath": ".spec.maxInstances"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyInstances"},
                        {
                            "name": "Desired",
                            "type": "integer",
                            "jsonPath": ".status.desiredInstances",
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": ".status.conditions[?(@.type=='Ready')].reason",
                        },
                        {
                            "name": "Status",
                            "type": "string",
                            "jsonPath": ".status.conditions[?(@.type=='Ready')].status",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = (
    "# GENERATED by `python -m hearth.controller.crd` from hearth.spec.FunctionSpec.\n"
    "# Do not edit: tests/charts/test_chart_crd.py fails if this file differs from function_crd().\n"
)


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(function_crd(), sort_keys=False, width=100)


def _rename_keys(
    obj: Any,
    node: dict[str, Any],
    to_api: bool,
    unknown: list[str] | None = None,
    path: str = "spec",
) -> Any:
    """Rename the field names of `obj` between the model's (snake) and the API's (camel),
    following the model's structural schema `node` (map keys such as env names stay). Keys that
    are not fields are kept as written and listed in `unknown`."""
    if isinstance(obj, dict) and "properties" in node:
        props = node["properties"]
        names = {k if to_api else camel(k): k for k in props}
        out = {}
        for k, v in obj.items():
            field = names.get(k)
            if field is None:
                out[k] = v
                if unknown is not None:
                    unknown.append(f"{path}.{k}")
            else:
                out[camel(field) if to_api else field] = _rename_keys(
                    v, props[field], to_api, unknown, f"{path}.{camel(field)}"
                )
        return out
    if isinstance(obj, dict) and isinstance(node.get("additionalProperties"), dict):
        sub = node["additionalProperties"]
        return {k: _rename_keys(v, sub, to_api, unknown, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, list) and "items" in node:
        return [
            _rename_keys(v, node["items"], to_api, unknown, f"{path}[{i}]")
            for i, v in enumerate(obj)
        ]
    return obj


def _api_loc(loc: tuple[Any, ...], node: dict[str, Any]) -> str:
    """A model error location as the API path the user wrote (`spec.keepAlive.ttlSeconds`)."""
    if loc[:1] == ("name",):
        return "metadata.name"
    out = ["spec"]
    for part in loc:
        if isinstance(part, str) and part in node.get("properties", {}):
            out.append(camel(part))
            node = node["properties"][part]
        elif isinstance(part, int) and "items" in node:
            out[-1] += f"[{part}]"
            node = node["items"]
        elif isinstance(node.get("additionalProperties"), dict):
            out.append(str(part))
            node = node["additionalProperties"]
        elif isinstance(part, str) and part not in ("http", "redis-stream"):  # union tags
            out.append(part)
    return ".".join(out)


def api_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec mapping with the model's field names -> the same with the API's (camelCase)."""
    return _rename_keys(spec, _model_schema(rename=str), to_api=True)


def function_resource(spec: FunctionSpec, namespace: str | None = None) -> dict[str, Any]:
    """A `Function` custom resource for a spec (the inverse of `spec_from_resource`)."""
    body = spec.model_dump(mode="json", exclude_none=True)
    name = body.pop("name")
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": api_fields(body),
    }


def spec_from_resource(obj: dict[str, Any], source: str = "Function") -> FunctionSpec:
    """Validate a `Function` resource with the controller's own model (name from metadata).
    Errors name the API's fields (`spec.minInstances`), one line each."""
    if not isinstance(obj, dict) or obj.get("kind") != KIND:
        raise SpecError(f"{source}: not a {KIND} resource")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise SpecError(f"{source}: spec: expected a mapping")
    schema = _model_schema(rename=str)
    unknown: list[str] = []
    data = _rename_keys(spec, schema, to_api=False, unknown=unknown)
    if unknown:
        raise SpecError(
            "\n".join(f"{source}: {u}: unknown field (the API uses camelCase)" for u in unknown)
        )
    try:
        return FunctionSpec.model_validate(
            {"name": (obj.get("metadata") or {}).get("name"), **data}
        )
    except ValidationError as err:
        raise SpecError(
            "\n".join(
                f"{source}: {_api_loc(e['loc'], schema)}: {e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
        ) from None


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
