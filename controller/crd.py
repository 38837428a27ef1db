"""The `Function` CustomResourceDefinition, generated from `hearth.spec.FunctionSpec`.

This module is the single source of truth for the CRD: the Helm chart's
`charts/hearth/crds/functions.hearth.dev.yaml` is written from `function_crd()` (a test
asserts they are equal) and the Kubernetes backend uses the constants below. The spec
schema is derived from the pydantic model, so the API server, the chart and the controller
cannot drift apart.

Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no `$ref`, no
`anyOf`/`oneOf` carrying types, `nullable` instead of `{"type": "null"}`, boolean
`exclusiveMinimum`. The conversion below is a pure function of the pydantic JSON schema.

    python -m hearth.controller.crd > functions.hearth.dev.yaml
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from hearth.spec import NAME_RE, FunctionSpec

GROUP = "hearth.dev"
VERSION = "v1alpha1"
KIND = "Function"
PLURAL = "functions"
SINGULAR = "function"
LIST_KIND = "FunctionList"
SHORT_NAMES = ["hfn"]
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"

# Keys of a JSON schema node that carry over unchanged into a Kubernetes schema node.
_KEEP = (
    "description",
    "enum",
    "format",
    "maxItems",
    "maxLength",
    "maxProperties",
    "maximum",
    "minItems",
    "minLength",
    "minProperties",
    "minimum",
    "multipleOf",
    "pattern",
    "required",
)


class SchemaConversionError(ValueError):
    """The pydantic schema uses a construct this converter does not map to a structural one."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref` (siblings of the ref win, as in JSON Schema 2020-12)."""
    if "$ref" not in node:
        return node
    ref = node["$ref"]
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaConversionError(f"unresolvable $ref {ref!r}")
    merged = dict(defs[ref[len(prefix) :]])
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _merge_union(variants: list[dict[str, Any]], discriminator: str, path: str) -> dict[str, Any]:
    """Fold a discriminated union of objects into one structural object.

    The discriminator becomes a required enum; each variant-specific field is allowed only
    for its variant, and each variant's required fields are enforced, through CEL rules
    (`x-kubernetes-validations`), which is how structural schemas express unions."""
    props: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    tags: list[str] = []
    rules: list[dict[str, str]] = []
    for v in variants:
        if v.get("type") != "object":
            raise SchemaConversionError(f"{path}: union variant is not an object")
        tag_schema = v.get("properties", {}).get(discriminator, {})
        tag = tag_schema.get("const")
        if tag is None:
            raise SchemaConversionError(f"{path}: union variant without const {discriminator!r}")
        tags.append(tag)
        for name, sub in v.get("properties", {}).items():
            if name == discriminator:
                continue
            if name in props and props[name] != sub:
                raise SchemaConversionError(f"{path}.{name}: differs between union variants")
            props[name] = sub
            owners.setdefault(name, []).append(tag)
        for req in v.get("required", []):
            if req != discriminator:
                rules.append(
                    {
                        "rule": f"self.{discriminator} != '{tag}' || has(self.{req})",
                        "message": f"{req} is required when {discriminator} is {tag}",
                    }
                )
    # One rule per set of variants sharing fields (few rules keep the CEL cost estimate low).
    by_allowed: dict[tuple[str, ...], list[str]] = {}
    for name, allowed in owners.items():
        if len(allowed) < len(tags):
            by_allowed.setdefault(tuple(allowed), []).append(name)
    for allowed, names in by_allowed.items():
        cond = " || ".join(f"self.{discriminator} == '{t}'" for t in allowed)
        absent = " && ".join(f"!has(self.{n})" for n in names)
        rules.append(
            {
                "rule": f"{cond} || ({absent})",
                "message": f"{', '.join(names)}: only allowed when {discriminator} is "
                + " or ".join(allowed),
            }
        )
    merged: dict[str, Any] = {
        "type": "object",
        "required": [discriminator],
        "properties": {
            discriminator: {
                "type": "string",
                "enum": tags,
                "maxLength": max(len(t) for t in tags),  # bounds the CEL cost estimate
                "description": "Trigger kind: " + ", ".join(tags) + ".",
            },
            **props,
        },
    }
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def to_structural(node: dict[str, Any], defs: dict[str, Any], path: str = "spec") -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural Kubernetes schema node."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}

    # `X | None` -> X with nullable: true (the only anyOf pydantic emits for our models).
    if "anyOf" in node:
        branches = [_resolve(b, defs) for b in node["anyOf"]]
        non_null = [b for b in branches if b.get("type") != "null"]
        if len(non_null) != 1 or len(branches) != 2:
            raise SchemaConversionError(f"{path}: anyOf other than 'X | None' is not supported")
        inner = {**{k: v for k, v in node.items() if k != "anyOf"}, **non_null[0]}
        out = to_structural(inner, defs, path)
        out["nullable"] = True
        out.pop("default", None)  # null defaults add nothing
        return out

    if "oneOf" in node:
        disc = node.get("discriminator", {}).get("propertyName")
        if not disc:
            raise SchemaConversionError(f"{path}: oneOf without a discriminator")
        variants = [_resolve(b, defs) for b in node["oneOf"]]
        return to_structural(_merge_union(variants, disc, path), defs, path)

    typ = node.get("type")
    if typ is None:
        raise SchemaConversionError(f"{path}: schema node without a type")
    out["type"] = typ
    for key in _KEEP:
        if key in node:
            out[key] = copy.deepcopy(node[key])
    if "const" in node:
        out["enum"] = [node["const"]]
    # JSON Schema 2020-12 numeric exclusive bounds -> OpenAPI 3.0 boolean flags.
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if "default" in node and node["default"] is not None:
        out["default"] = copy.deepcopy(node["default"])
    if "x-kubernetes-validations" in node:
        out["x-kubernetes-validations"] = copy.deepcopy(node["x-kubernetes-validations"])

    if typ == "object":
        if "properties" in node:
            out["properties"] = {
                k: to_structural(v, defs, f"{path}.{k}") for k, v in node["properties"].items()
            }
            # additionalProperties: false is implied: the API server prunes (or, with
            # server-side field validation, rejects) unknown fields of a structural schema.
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = to_structural(
                node["additionalProperties"], defs, f"{path}.*"
            )
        else:
            raise SchemaConversionError(f"{path}: object without properties or value schema")
    elif typ == "array":
        if "items" not in node:
            raise SchemaConversionError(f"{path}: array without items")
        out["items"] = to_structural(node["items"], defs, f"{path}[]")
    return out


def spec_schema() -> dict[str, Any]:
    """The structural schema of `.spec`: FunctionSpec minus `name` (it is metadata.name)."""
    js = FunctionSpec.model_json_schema()
    defs = js.get("$defs", {})
    js = copy.deepcopy(js)
    js["properties"].pop("name")
    js["required"] = [r for r in js.get("required", []) if r != "name"]
    js.pop("$defs", None)
    js.pop("title", None)
    out = to_structural(js, defs)
    out["description"] = "Desired state of a Hearth function (hearth.spec.FunctionSpec minus name)."
    # The one cross-field rule of FunctionSpec, so the API server rejects it too.
    out["x-kubernetes-validations"] = [
        {
            "rule": "!has(self.min_instances) || !has(self.max_instances) "
            "|| self.min_instances <= self.max_instances",
            "message": "min_instances exceeds max_instances",
        }
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
            "readyInstances": {"type": "integer", "minimum": 0},
            "desiredInstances": {"type": "integer", "minimum": 0},
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
                        {"name": "Min", "type": "integer", "jsonPath": ".spec.min_instances"},
                        {"name": "Max", "type": "integer", "jsonPath": ".spec.max_instances"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyInstances"},
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


def function_resource(spec: FunctionSpec, namespace: str | None = None) -> dict[str, Any]:
    """A `Function` custom resource for a spec (the inverse of `spec_from_resource`)."""
    body = spec.model_dump(mode="json", exclude_none=True)
    name = body.pop("name")
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": body}


def spec_from_resource(obj: dict[str, Any], source: str = "Function") -> FunctionSpec:
    """Validate a `Function` resource with the controller's own model (name from metadata)."""
    from hearth.spec import SpecError, parse_spec

    if not isinstance(obj, dict) or obj.get("kind") != KIND:
        raise SpecError(f"{source}: not a {KIND} resource")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise SpecError(f"{source}: spec: expected a mapping")
    return parse_spec({"name": (obj.get("metadata") or {}).get("name"), **spec}, source)


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
