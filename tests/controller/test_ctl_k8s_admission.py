"""The emulator rejects what a real API server rejects (k8s_admission.py), over the real wire
protocol with the official client: names, labels, pods, CRD schema + CEL, patch types."""

from __future__ import annotations

import json

import pytest
from hearth.controller.crd import API_VERSION, GROUP, PLURAL, VERSION
from k8s_admission import (
    CustomResourceAdmission,
    Invalid,
    json_patch,
    strategic_merge_patch,
    validate_pod,
)
from k8s_emulator import Emulator
from kubernetes import client


def pod(name="p", **meta):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **meta},
        "spec": {"containers": [{"name": "c", "image": "img:1"}]},
    }


def fn(name="f", **spec):
    return {
        "apiVersion": API_VERSION,
        "kind": "Function",
        "metadata": {"name": name},
        "spec": {"handler": "m:f", **spec},
    }


def status_of(e: client.ApiException) -> dict:
    return json.loads(e.body)


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ({"name": "Bad_Name"}, "metadata.name"),
        ({"name": "x" * 254}, "metadata.name"),
        ({"name": "ok", "labels": {"k": "v" * 64}}, "metadata.labels"),
        ({"name": "ok", "labels": {"bad key": "v"}}, "metadata.labels"),
        ({"name": "ok", "labels": {"k": "-v"}}, "metadata.labels"),
        ({"name": "ok", "annotations": {"a/b/c": "v"}}, "metadata.annotations"),
    ],
)
def test_invalid_metadata_is_422(api, emu, meta, needle):
    body = pod()
    body["metadata"] = meta
    with pytest.raises(client.ApiException) as e:
        client.CoreV1Api(api).create_namespaced_pod("default", body)
    assert e.value.status == 422 and needle in e.value.body
    assert emu.objects("pods") == {}


def test_pod_spec_checks():
    ok = pod()
    assert validate_pod(ok) == []
    bad = pod()
    bad["spec"]["containers"][0].update(
        volumeMounts=[{"name": "missing", "mountPath": "/x"}],
        resources={"requests": {"cpu": "lots"}},
        env=[{"name": "1=A", "value": "x"}],
    )
    errs = validate_pod(bad)
    assert any("volumeMounts[0].name: Not found" in e for e in errs)
    assert any("requests[cpu]" in e for e in errs)
    assert any("env[0].name" in e for e in errs)
    none = pod()
    none["spec"]["containers"] = []
    assert any("spec.containers: Required" in e for e in validate_pod(none))


def test_pod_spec_is_immutable_but_metadata_patches(api, emu):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod("default", pod())
    # a dict body goes out as a strategic merge patch (the client's choice for built-ins)
    core.patch_namespaced_pod("p", "default", {"metadata": {"annotations": {"a": "1"}}})
    assert emu.objects("pods")["p"]["metadata"]["annotations"] == {"a": "1"}
    with pytest.raises(client.ApiException) as e:
        core.patch_namespaced_pod("p", "default", {"spec": {"restartPolicy": "Never"}})
    assert e.value.status == 422 and "pod updates may not change" in e.value.body
    # the image may change
    core.patch_namespaced_pod(
        "p", "default", {"spec": {"containers": [{"name": "c", "image": "img:2"}]}}
    )
    assert emu.objects("pods")["p"]["spec"]["containers"][0]["image"] == "img:2"


def test_json_patch_and_its_errors(api, emu):
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, fn())
    ops = [{"op": "add", "path": "/spec/minInstances", "value": 2}]
    with pytest.raises(client.ApiException) as e:  # as a merge patch (the default), a list
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "f", ops)
    assert e.value.status == 400
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "f", ops, _content_type="application/json-patch+json"
    )
    stored = emu.objects(PLURAL)["f"]
    assert stored["spec"]["minInstances"] == 2 and stored["metadata"]["generation"] == 2
    with pytest.raises(client.ApiException) as e:  # a failed test op rejects the patch
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "default",
            PLURAL,
            "f",
            [{"op": "test", "path": "/spec/minInstances", "value": 9}],
            _content_type="application/json-patch+json",
        )
    assert e.value.status == 422
    assert json_patch({"a": [1, 3]}, [{"op": "add", "path": "/a/1", "value": 2}]) == {
        "a": [1, 2, 3]
    }
    assert json_patch({"a": 1, "b": {}}, [{"op": "move", "from": "/a", "path": "/b/c"}]) == {
        "b": {"c": 1}
    }
    with pytest.raises(Invalid):
        json_patch({"a": 1}, {"op": "remove"})  # not a list


def test_strategic_merge_patch_is_415_on_a_custom_resource(api, emu):
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, fn())
    with pytest.raises(client.ApiException) as e:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "default",
            PLURAL,
            "f",
            {"spec": {"minInstances": 1}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert e.value.status == 415


def test_strategic_merge_merges_lists_by_key():
    base = {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}
    out = strategic_merge_patch(
        base, {"containers": [{"name": "b", "image": "2"}, {"name": "c", "image": "3"}]}
    )
    assert [(c["name"], c["image"]) for c in out["containers"]] == [
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
    ]
    out = strategic_merge_patch(base, {"containers": [{"name": "a", "$patch": "delete"}]})
    assert [c["name"] for c in out["containers"]] == ["b"]


def test_unknown_fields_pruned_or_rejected_and_defaults_applied(api, emu):
    custom = client.CustomObjectsApi(api)
    obj = fn("p1", bogus=1)
    out = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, obj)
    assert "bogus" not in out["spec"]  # pruned, as a real server does without Strict
    assert out["spec"]["minInstances"] == 0 and out["spec"]["runtime"] == "python3.11"
    with pytest.raises(client.ApiException) as e:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, fn("p2", bogus=1), field_validation="Strict"
        )
    assert e.value.status == 422 and "spec.bogus" in e.value.body


def test_cel_rules_run_on_real_cel():
    from hearth.controller.crd import function_crd

    adm = CustomResourceAdmission(function_crd())
    adm.admit(fn(labels={"team": "ml"}))
    with pytest.raises(Invalid) as e:
        adm.admit(fn(labels={"hearth.dev/function": "x"}))
    assert any("reserved" in c for c in e.value.causes)
    with pytest.raises(Invalid) as e:
        adm.admit(fn(triggers=[{"type": "http", "stream": "s"}]))
    assert any("only allowed when type is redis-stream" in c for c in e.value.causes)
    with pytest.raises(Invalid) as e:
        adm.admit(fn(name="x" * 64))  # the CRD's root rule on metadata.name (a label)
    assert e.value.causes
    # a rule real CEL cannot compile makes the CRD itself invalid
    crd = function_crd()
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    root["x-kubernetes-validations"].append({"rule": "self.spec.handler ==", "message": "m"})
    with pytest.raises(Exception):  # noqa: B017 - celpy's parse error type
        CustomResourceAdmission(crd)


def test_status_subresource_validated_and_only_status_changes(api, emu):
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, fn())
    with pytest.raises(client.ApiException) as e:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, "default", PLURAL, "f", {"status": {"readyInstances": -1}}
        )
    assert e.value.status == 422
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "f",
        {"status": {"readyInstances": 1}, "spec": {"minInstances": 3}},
    )
    stored = emu.objects(PLURAL)["f"]
    assert stored["status"]["readyInstances"] == 1 and stored["spec"]["minInstances"] == 0


def test_gc_switch():
    for gc, left in ((True, 0), (False, 1)):
        e = Emulator(gc=gc).start()
        try:
            cfg = client.Configuration()
            cfg.host = e.url
            with client.ApiClient(cfg) as c:
                f = client.CustomObjectsApi(c).create_namespaced_custom_object(
                    GROUP, VERSION, "default", PLURAL, fn()
                )
                p = pod()
                p["metadata"]["ownerReferences"] = [
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Function",
                        "name": "f",
                        "uid": f["metadata"]["uid"],
                        "controller": True,
                    }
                ]
                client.CoreV1Api(c).create_namespaced_pod("default", p)
                client.CustomObjectsApi(c).delete_namespaced_custom_object(
                    GROUP, VERSION, "default", PLURAL, "f"
                )
            assert len(e.objects("pods")) == left
        finally:
            e.stop()
