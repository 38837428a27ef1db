"""Helpers for the chart tests: the real helm binary, kubernetes-validate, and an offline
check of custom resources against the CRD's structural schema.

What the offline CRD check covers: the OpenAPI v3 part of the schema (types, enums,
bounds, patterns, required, unknown fields — pruned/rejected by a real API server) via
`jsonschema`, and the CRD's CEL rules via a tiny translator that understands exactly the
rule shapes `hearth.controller.crd` emits (has(), ==, !=, <=, ||, &&, !). It is not a
CEL implementation; a rule it cannot translate raises, so it never passes silently."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
KV = ROOT / ".venv" / "bin" / "kubernetes-validate"
CHARTS = ROOT / "charts"


def helm(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, check=check, timeout=120
    )


def template(chart: str, *args: str, name: str = "t") -> list[dict[str, Any]]:
    """`helm template` a chart (with --include-crds) and return the parsed documents."""
    p = helm("template", name, str(CHARTS / chart), "--include-crds", *args)
    if p.returncode != 0:
        raise AssertionError(f"helm template failed:\n{p.stderr}")
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def kubernetes_validate(docs: list[dict[str, Any]], tmp: Path) -> subprocess.CompletedProcess:
    """Run `kubernetes-validate --strict` on every built-in kind (CRD included)."""
    f = tmp / "manifests.yaml"
    f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return subprocess.run(
        [str(KV), "--strict", str(f)], capture_output=True, text=True, timeout=120
    )


# --- OpenAPI v3 (Kubernetes flavour) -> JSON Schema draft 4 ------------------------------------


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes structural schema -> draft-4 JSON schema with the API server's semantics:
    unknown fields are errors (server-side field validation 'Strict', kubectl's default)."""
    node = copy.deepcopy(node)
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "default", "format"):
            continue
        if k == "properties":
            out["properties"] = {pk: to_jsonschema(pv) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = to_jsonschema(v)
        else:
            out[k] = v
    if node.get("type") == "object" and "properties" in node and node["properties"]:
        out["additionalProperties"] = False
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


_TOKEN = re.compile(r"\s*(has\(self\.\w+\)|self\.\w+|'[^']*'|\d+|\|\||&&|==|!=|<=|>=|!|\(|\))")


def cel_to_python(rule: str) -> str:
    """Translate the small CEL subset used by the CRD; raise on anything else."""
    pos, out = 0, []
    while pos < len(rule):
        m = _TOKEN.match(rule, pos)
        if not m:
            raise ValueError(f"untranslatable CEL at {rule[pos:]!r}")
        t = m.group(1)
        pos = m.end()
        if t.startswith("has("):
            out.append(f"({t[9:-1]!r} in s)")
        elif t.startswith("self."):
            out.append(f"s[{t[5:]!r}]")
        else:
            out.append({"||": " or ", "&&": " and ", "!": " not "}.get(t, t))
    return "".join(out)


def cel_errors(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Evaluate the CEL rules of a schema over an object (root rules with metadata skipped)."""
    errs: list[str] = []
    if isinstance(obj, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            if "metadata" in rule["rule"]:
                continue
            try:
                ok = eval(cel_to_python(rule["rule"]), {}, {"s": obj})  # noqa: S307 - own rules
            except KeyError as e:  # CEL: "no such key" is an evaluation error -> rejected
                ok, rule = False, {"message": f"no such key: {e}"}
            if not ok:
                errs.append(f"{path or '<root>'}: {rule['message']}")
        for k, sub in schema.get("properties", {}).items():
            if k in obj:
                errs += cel_errors(sub, obj[k], f"{path}.{k}" if path else k)
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            errs += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errs


def validate_custom_resource(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Errors a real API server would report for `obj` against `crd` (schema + CEL)."""
    version = next(
        v for v in crd["spec"]["versions"] if v["name"] == obj["apiVersion"].split("/")[1]
    )
    schema = version["schema"]["openAPIV3Schema"]
    errs = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in jsonschema.Draft4Validator(to_jsonschema(schema)).iter_errors(obj)
    ]
    name = obj.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", name):
        errs.append("metadata.name: must be a DNS-1123 label")
    return errs + cel_errors(schema, obj)


def structural_problems(node: Any, path: str = "") -> list[str]:
    """Violations of Kubernetes' structural-schema rules (what the API server enforces)."""
    probs: list[str] = []
    if not isinstance(node, dict):
        return [f"{path}: not a mapping"]
    for bad in (
        "$ref",
        "$defs",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "const",
        "title",
        "discriminator",
    ):
        if bad in node:
            probs.append(f"{path}: uses {bad}")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        probs.append(f"{path}: no type")
    if node.get("type") == "null" or isinstance(node.get("type"), list):
        probs.append(f"{path}: type must be a single non-null type")
    if "properties" in node and "additionalProperties" in node:
        probs.append(f"{path}: properties and additionalProperties together")
    if node.get("additionalProperties") is False:
        probs.append(f"{path}: additionalProperties: false is not allowed")
    for k in ("exclusiveMinimum", "exclusiveMaximum", "nullable"):
        if k in node and not isinstance(node[k], bool):
            probs.append(f"{path}: {k} must be boolean")
    for k, sub in node.get("properties", {}).items():
        probs += structural_problems(sub, f"{path}.{k}")
    if isinstance(node.get("additionalProperties"), dict):
        probs += structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        probs += structural_problems(node["items"], f"{path}[]")
    return probs
