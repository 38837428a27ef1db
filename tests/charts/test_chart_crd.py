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
    assert set(spec["properties"]) == {crdmod.camel(f) for f in FunctionSpec.model_fields} - {
        "name"
    }
    assert spec["required"] == ["handler"]
    trig = spec["properties"]["triggers"]["items"]
    assert trig["properties"]["type"]["enum"] == ["http", "redis-stream"]
    assert trig["required"] == ["type"]
    # nested models inlined, exclusive bounds converted, Optional -> nullable
    res = spec["properties"]["resources"]["properties"]["memoryMb"]
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


def test_every_cel_rule_compiles_with_real_cel():
    from k8s_admission import CustomResourceAdmission, _rules

    schema = crdmod.function_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found = list(_rules(schema))
    assert len(found) >= 6
    adm = CustomResourceAdmission(crdmod.function_crd())  # compiles each rule (cel-python)
    assert set(adm.programs) == {r["rule"] for r in found}


def test_field_names_are_camel_case():
    spec = crdmod.spec_schema()

    def names(node):
        for k, sub in (node.get("properties") or {}).items():
            yield k
            yield from names(sub)
        if isinstance(node.get("items"), dict):
            yield from names(node["items"])

    got = set(names(spec))
    assert {"minInstances", "keepAlive", "ttlSeconds", "timeoutSeconds", "memoryMb"} <= got
    assert not [n for n in got if "_" in n], "snake_case field in the CRD"
    assert crdmod.camel("backoff_max_s") == "backoffMaxSeconds"


CASES = [
    ({"handler": "m:f"}, True),
    (
        {
            "handler": "hearth.functions.fedavg.handlers:leaf",
            "minInstances": 2,
            "maxInstances": 4,
        },
        True,
    ),
    (
        {"handler": "m:f", "triggers": [{"type": "http"}, {"type": "redis-stream", "stream": "s"}]},
        True,
    ),
    ({"handler": "m:f", "image": "ghcr.io/x/y:1", "keepAlive": {"policy": "histogram"}}, True),
    ({"handler": "m:f", "resources": {"memoryMb": 512, "cpuMillicores": 250}}, True),
    ({"handler": "m:f", "keepAlive": {"ttlSeconds": 5}, "timeoutSeconds": 2.5}, True),
    ({"handler": "m:f", "labels": {"team": "ml", "app.kubernetes.io/name": "x"}}, True),
    ({"handler": "m:f", "labels": {"example.com/tier": ""}}, True),
    ({"handler": "m:f", "min_instances": 1}, False),  # snake_case is not the API's name
    ({"handler": "m:f", "labels": {"hearth.dev/function": "other"}}, False),  # reserved
    ({"handler": "m:f", "labels": {"app.kubernetes.io/managed-by": "me"}}, False),  # reserved
    ({"handler": "m:f", "labels": {"node.kubernetes.io/x": "y"}}, False),  # reserved
    ({"handler": "m:f", "labels": {"bad key": "v"}}, False),
    ({"handler": "m:f", "labels": {"k": "v" * 64}}, False),  # value > 63
    ({"handler": "m:f", "labels": {"k": "-v"}}, False),
    ({}, False),  # missing handler
    ({"handler": "not a handler"}, False),
    ({"handler": "m:f", "bogus": 1}, False),  # unknown field
    ({"handler": "m:f", "minInstances": -1}, False),
    ({"handler": "m:f", "minInstances": 5, "maxInstances": 2}, False),  # cross-field (CEL)
    ({"handler": "m:f", "triggers": [{"type": "redis-stream"}]}, False),  # stream required (CEL)
    ({"handler": "m:f", "triggers": [{"type": "http", "stream": "s"}]}, False),  # wrong variant
    ({"handler": "m:f", "triggers": [{"stream": "s"}]}, False),  # no discriminator
    ({"handler": "m:f", "triggers": [{"type": "kafka"}]}, False),
    ({"handler": "m:f", "keepAlive": {"policy": "forever"}}, False),
    ({"handler": "m:f", "resources": {"memoryMb": 0}}, False),  # exclusive minimum
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
            "keep_alive": {"ttl_s": 5},
            "triggers": [{"type": "redis-stream", "stream": "updates"}],
        }
    )
    obj = crdmod.function_resource(spec, namespace="ns")
    assert obj["metadata"] == {"name": "agg", "namespace": "ns"}
    assert "name" not in obj["spec"]
    assert obj["spec"]["affinityGroup"] == "fl" and obj["spec"]["keepAlive"]["ttlSeconds"] == 5
    assert validate_custom_resource(crdmod.function_crd(), obj) == []
    assert crdmod.spec_from_resource(obj) == spec


def test_model_errors_name_the_api_fields():
    obj = {
        "apiVersion": crdmod.API_VERSION,
        "kind": "Function",
        "metadata": {"name": "fn"},
        "spec": {
            "handler": "m:f",
            "keepAlive": {"ttlSeconds": -1},
            "labels": {"hearth.dev/x": "y"},
        },
    }
    with pytest.raises(SpecError) as e:
        crdmod.spec_from_resource(obj)
    assert "spec.keepAlive.ttlSeconds" in str(e.value)
    assert "spec.labels: " in str(e.value) and "reserved" in str(e.value)


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
