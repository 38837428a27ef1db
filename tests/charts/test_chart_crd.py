"""The Function CRD is generated from FunctionSpec: structural, complete, and it accepts and
rejects the same resources as the controller's own model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from chart_helpers import (
    CHARTS,
    ROOT,
    cel_to_python,
    kubernetes_validate,
    structural_problems,
    validate_custom_resource,
)
from hearth.controller import crd as crdmod
from hearth.spec import FunctionSpec, SpecError, parse_spec


def test_identity_constants():
    c = crdmod.function_crd()
    assert (crdmod.GROUP, crdmod.VERSION, crdmod.KIND, crdmod.PLURAL) == (
        "hearth.dev",
        "v1alpha1",
        "Function",
        "functions",
    )
    assert c["apiVersion"] == "apiextensions.k8s.io/v1"
    assert c["metadata"]["name"] == "functions.hearth.dev"
    assert c["spec"]["group"] == "hearth.dev"
    assert c["spec"]["names"]["kind"] == "Function"
    assert c["spec"]["names"]["plural"] == "functions"
    (v,) = c["spec"]["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert v["subresources"] == {"status": {}}
    cols = {col["name"]: col["jsonPath"] for col in v["additionalPrinterColumns"]}
    assert cols["Handler"] == ".spec.handler" and cols["Ready"] == ".status.readyInstances"


def test_schema_is_structural():
    schema = crdmod.function_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []


def test_structural_checker_catches_pydantic_constructs():
    # The raw pydantic schema is not structural: the checker must say so (else it proves nothing).
    raw = FunctionSpec.model_json_schema()
    probs = structural_problems(raw)
    assert any("$defs" in p for p in probs)
    assert any("anyOf" in p for p in probs)


def test_spec_fields_match_model_minus_name():
    spec = crdmod.spec_schema()
    assert set(spec["properties"]) == set(FunctionSpec.model_fields) - {"name"}
    assert spec["required"] == ["handler"]
    trig = spec["properties"]["triggers"]["items"]
    assert trig["properties"]["type"]["enum"] == ["http", "redis-stream"]
    assert trig["required"] == ["type"]
    # nested models inlined, exclusive bounds converted, Optional -> nullable
    res = spec["properties"]["resources"]["properties"]["memory_mb"]
    assert res["minimum"] == 0 and res["exclusiveMinimum"] is True
    assert spec["properties"]["image"] == {
        "type": "string",
        "description": "Container image (Kubernetes backend).",
        "nullable": True,
    }


def test_status_schema():
    st = crdmod.function_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "status"
    ]
    assert {"conditions", "readyInstances", "observedGeneration"} <= set(st["properties"])
    cond = st["properties"]["conditions"]["items"]
    assert cond["required"] == ["type", "status"]


def test_every_cel_rule_is_translatable():
    def rules(node):
        yield from node.get("x-kubernetes-validations", [])
        for sub in node.get("properties", {}).values():
            yield from rules(sub)
        if "items" in node:
            yield from rules(node["items"])

    schema = crdmod.function_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found = [r for r in rules(schema) if "metadata" not in r["rule"]]
    assert len(found) >= 3
    for r in found:
        cel_to_python(r["rule"])  # raises if the test translator cannot evaluate it


CASES = [
    ({"handler": "m:f"}, True),
    (
        {
            "handler": "hearth.functions.fedavg.handlers:leaf",
            "min_instances": 2,
            "max_instances": 4,
        },
        True,
    ),
    (
        {"handler": "m:f", "triggers": [{"type": "http"}, {"type": "redis-stream", "stream": "s"}]},
        True,
    ),
    ({"handler": "m:f", "image": "ghcr.io/x/y:1", "keep_alive": {"policy": "histogram"}}, True),
    ({"handler": "m:f", "resources": {"memory_mb": 512, "cpu_millicores": 250}}, True),
    ({}, False),  # missing handler
    ({"handler": "not a handler"}, False),
    ({"handler": "m:f", "bogus": 1}, False),  # unknown field
    ({"handler": "m:f", "min_instances": -1}, False),
    ({"handler": "m:f", "min_instances": 5, "max_instances": 2}, False),  # cross-field (CEL)
    ({"handler": "m:f", "triggers": [{"type": "redis-stream"}]}, False),  # stream required (CEL)
    ({"handler": "m:f", "triggers": [{"type": "http", "stream": "s"}]}, False),  # wrong variant
    ({"handler": "m:f", "triggers": [{"stream": "s"}]}, False),  # no discriminator
    ({"handler": "m:f", "triggers": [{"type": "kafka"}]}, False),
    ({"handler": "m:f", "keep_alive": {"policy": "forever"}}, False),
    ({"handler": "m:f", "resources": {"memory_mb": 0}}, False),  # exclusive minimum
    ({"handler": "m:f", "concurrency": "four"}, False),  # wrong type
    ({"handler": "m:f", "env": {"A": 1}}, False),
    ({"handler": "m:f", "image": None}, True),  # nullable
]


@pytest.mark.parametrize(("spec", "ok"), CASES)
def test_crd_and_model_agree(spec, ok):
    obj = {
        "apiVersion": crdmod.API_VERSION,
        "kind": "Function",
        "metadata": {"name": "fn"},
        "spec": spec,
    }
    errs = validate_custom_resource(crdmod.function_crd(), obj)
    try:
        crdmod.spec_from_resource(obj)
        model_ok = True
    except SpecError:
        model_ok = False
    assert model_ok is ok
    assert (errs == []) is ok, errs


def test_bad_metadata_name_rejected_by_both():
    obj = {
        "apiVersion": crdmod.API_VERSION,
        "kind": "Function",
        "metadata": {"name": "Bad_Name"},
        "spec": {"handler": "m:f"},
    }
    assert validate_custom_resource(crdmod.function_crd(), obj)
    with pytest.raises(SpecError, match="name"):
        crdmod.spec_from_resource(obj)


def test_function_resource_round_trip():
    spec = parse_spec(
        {
            "name": "agg",
            "handler": "hearth.functions.fedavg.handlers:leaf",
            "affinity_group": "fl",
            "triggers": [{"type": "redis-stream", "stream": "updates"}],
        }
    )
    obj = crdmod.function_resource(spec, namespace="ns")
    assert obj["metadata"] == {"name": "agg", "namespace": "ns"}
    assert "name" not in obj["spec"]
    assert validate_custom_resource(crdmod.function_crd(), obj) == []
    assert crdmod.spec_from_resource(obj) == spec


def test_module_prints_yaml_equal_to_dict():
    out = subprocess.run(
        [sys.executable, "-m", "hearth.controller.crd"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert out.startswith("# GENERATED")
    assert yaml.safe_load(out) == crdmod.function_crd()


def test_chart_crd_file_is_the_generated_one():
    f = CHARTS / "hearth" / "crds" / "functions.hearth.dev.yaml"
    assert yaml.safe_load(f.read_text()) == crdmod.function_crd(), (
        "regenerate: python -m hearth.controller.crd > charts/hearth/crds/functions.hearth.dev.yaml"
    )


def test_crd_passes_kubernetes_validate_strict(tmp_path):
    p = kubernetes_validate([crdmod.function_crd()], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "passed" in p.stdout
