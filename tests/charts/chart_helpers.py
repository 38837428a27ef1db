"""Helpers for the chart tests: the real helm binary, kubernetes-validate, and an offline
check of custom resources against the CRD's structural schema.

The offline CRD check is the emulator's admission (tests/controller/k8s_admission.py): the
OpenAPI v3 part of the schema (types, enums, bounds, patterns, required; unknown fields rejected
as with server-side field validation `Strict`, kubectl's default) via `jsonschema`, and the CRD's
CEL rules evaluated by cel-python, a real CEL implementation."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))
from k8s_admission import CustomResourceAdmission, Invalid  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"
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


def validate_custom_resource(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Errors a real API server would report for `obj` against `crd` (schema + CEL), with
    strict field validation (unknown fields are errors, not pruned)."""
    try:
        CustomResourceAdmission(crd).admit(copy.deepcopy(obj), strict=True)
    except Invalid as e:
        return e.causes
    return []


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
