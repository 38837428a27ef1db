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


def camel(name: str) -> str:
    """A model field name as the API field name (Kubernetes API conventions: lowerCamelCase,
    units spelled out): `min_instances` -> `minInstances`, `ttl_s` -> `ttlSeconds`."""
    parts = name.split("_")
    if len(parts) > 1 and parts[-1] == "s":
        parts[-1] = "seconds"
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


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
                        "rule": f"self.{discriminator} != '{tag}' || has(self.{camel(req)})",
                        "message": f"{camel(req)} is required when {discriminator} is {tag}",
                    }
                )
    # One rule per set of variants sharing fields (few rules keep the CEL cost estimate low).
    by_allowed: dict[tuple[str, ...], list[str]] = {}
    for name, allowed in owners.items():
        if len(allowed) < len(tags):
            by_allowed.setdefault(tuple(allowed), []).append(name)
    # A variant's own fields carry no default: the API server defaults before it validates, so
    # a default would put a redis-stream field on every http trigger and fail the rule below.
    # The model applies those defaults when it reads the resource.
    for names in by_allowed.values():
        for n in names:
            props[n] = {k: v for k, v in props[n].items() if k != "default"}
    for allowed, names in by_allowed.items():
        cond = " || ".join(f"self.{discriminator} == '{t}'" for t in allowed)
        absent = " && ".join(f"!has(self.{camel(n)})" for n in names)
        rules.append(
            {
                "rule": f"{cond} || ({absent})",
                "message": f"{', '.join(camel(n) for n in names)}: only allowed when {discriminator} is "
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


def to_structural(
    node: dict[str, Any], defs: dict[str, Any], path: str = "spec", rename=camel
) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural Kubernetes schema node
    (field names through `rename`: camelCase for the API, identity for reading objects back)."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}

    # `X | None` -> X with nullable: true (the only anyOf pydantic emits for our models).
    if "anyOf" in node:
        branches = [_resolve(b, defs) for b in node["anyOf"]]
        non_null = [b for b in branches if b.get("type") != "null"]
        if len(non_null) != 1 or len(branches) != 2:
            raise SchemaConversionError(f"{path}: anyOf other than 'X | None' is not supported")
        inner = {**{k: v for k, v in node.items() if k != "anyOf"}, **non_null[0]}
        out = to_structural(inner, defs, path, rename)
        out["nullable"] = True
        out.pop("default", None)  # null defaults add nothing
        return out

    if "oneOf" in node:
        disc = node.get("discriminator", {}).get("propertyName")
        if not disc:
            raise SchemaConversionError(f"{path}: oneOf without a discriminator")
        variants = [_resolve(b, defs) for b in node["oneOf"]]
        return to_structural(_merge_union(variants, disc, path), defs, path, rename)

    typ = node.get("type")
    if typ is None:
        raise SchemaConversionError(f"{path}: schema node without a type")
    out["type"] = typ
    for key in _KEEP:
        if key in node:
            out[key] = copy.deepcopy(node[key])
    if "required" in out:
        out["required"] = [rename(r) for r in out["required"]]
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
                rename(k): to_structural(v, defs, f"{path}.{k}", rename)
                for k, v in node["properties"].items()
            }
            # additionalProperties: false is implied: the API server prunes (or, with
            # server-side field validation, rejects) unknown fields of a structural schema.
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = to_structural(
                node["additionalProperties"], defs, f"{path}.*", rename
            )
            # Map keys (env names, label keys) are data, not fields: never renamed.
        else:
            raise SchemaConversionError(f"{path}: object without properties or value schema")
    elif typ == "array":
        if "items" not in node:
            raise SchemaConversionError(f"{path}: array without items")
        out["items"] = to_structural(node["items"], defs, f"{path}[]", rename)
    return out


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
