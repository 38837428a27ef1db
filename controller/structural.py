"""Pydantic JSON schema -> Kubernetes *structural* OpenAPI v3 schema (a pure function).

Kubernetes wants a structural schema for a CustomResourceDefinition: every node typed, no
`$ref`, no `anyOf`/`oneOf` carrying types, `nullable` instead of `{"type": "null"}`, boolean
`exclusiveMinimum`. Field names follow the Kubernetes API conventions (`camel`). Used by
`crd.py` for the `Function` CRD and to read resources back into the model."""

from __future__ import annotations

import copy
from typing import Any

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
