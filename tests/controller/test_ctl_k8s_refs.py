"""env and the invoke token from Secret/ConfigMap references (`envValueFrom`,
`invokeTokenSecretRef`): the CRD and the emulator's admission reject what an API server would,
the controller resolves them against the emulator into what the agents serve (the token, in the
registry on a real Redis) and what the pods get (`env[].valueFrom`, for the kubelet), reports a
missing Secret, ConfigMap or key as a status reason, and never writes a secret value into a pod,
a status, an Event or a log line."""

from __future__ import annotations

import json
import logging

import pytest
import redis
from hearth.controller.crd import GROUP, PLURAL, VERSION
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s import KubernetesController
from hearth.controller.k8s.pods import LABEL_FUNCTION, pod_manifest
from hearth.controller.k8s.refs import READABLE_LABEL, RefObject, RefReadError, resolve
from hearth.controller.k8s.registry_sync import RegistrySync
from hearth.registry import KEY
from hearth.spec import FunctionSpec, SpecError, parse_spec
from k8s_client import function_resource
from kubernetes import client
from kubernetes.client.rest import ApiException

TOKEN = "tok-5f1e0c9a7d3b42e8"
DB = "db-pw-9c4e1a77"

REFS = {
    "handler": "app:handle",
    "min_instances": 1,
    "env": {"PLAIN": "1"},
    "env_value_from": {
        "DB_PASSWORD": {"secret_key_ref": {"name": "fn-secrets", "key": "db"}},
        "MODE": {"config_map_key_ref": {"name": "fn-config", "key": "mode"}},
        "EXTRA": {"config_map_key_ref": {"name": "fn-config", "key": "extra", "optional": True}},
    },
    "invoke_token_secret_ref": {"name": "fn-secrets", "key": "token"},
}


OPT_IN = {"labels": {READABLE_LABEL: "true"}}


def readable(name: str) -> dict:
    """metadata of a Secret/ConfigMap that Functions may reference."""
    return {"name": name, **OPT_IN}


# --- the model and the pure resolver --------------------------------------------------------------


def test_model_rules():
    spec = parse_spec({"name": "f", **REFS})
    assert spec.refs() and spec.env_value_from["MODE"].config_map_key_ref.key == "mode"
    bad = [
        ({"env_value_from": {"X": {}}}, "exactly one"),
        (
            {
                "env_value_from": {
                    "X": {
                        "secret_key_ref": {"name": "a", "key": "b"},
                        "config_map_key_ref": {"name": "a", "key": "b"},
                    }
                }
            },
            "exactly one",
        ),
        (
            {
                "env": {"X": "1"},
                "env_value_from": {"X": {"secret_key_ref": {"name": "a", "key": "b"}}},
            },
            "both set X",
        ),
        (
            {"env_value_from": {"HEARTH_FUNCTION": {"secret_key_ref": {"name": "a", "key": "b"}}}},
            "reserved",
        ),
        (
            {"env_value_from": {"1X": {"secret_key_ref": {"name": "a", "key": "b"}}}},
            "invalid environment",
        ),
        (
            {"invoke_token": "abcdefgh", "invoke_token_secret_ref": {"name": "a", "key": "b"}},
            "not both",
        ),
        (
            {"invoke_token_secret_ref": {"name": "Bad_Name", "key": "b"}},
            "invoke_token_secret_ref.name",
        ),
        ({"invoke_token_secret_ref": {"name": "a", "key": "b/c"}}, "invoke_token_secret_ref.key"),
    ]
    for extra, msg in bad:
        with pytest.raises(SpecError, match=msg):
            parse_spec({"name": "f", "handler": "app:handle", **extra})
    # an instance is never given the invoke token
    tok = FunctionSpec(name="f", handler="app:handle", invoke_token=TOKEN)
    assert "invoke_token" not in tok.for_instance() and TOKEN not in json.dumps(tok.for_instance())


def test_resolve_reports_the_first_problem_and_fills_in_the_token():
    spec = parse_spec({"name": "f", **REFS})
    objs: dict = {}

    def read(kind, name):
        data = objs.get((kind, name))
        return None if data is None else RefObject(data, readable=(kind, name) != ("Secret", "x"))

    served, why = resolve(spec, read)
    assert served is None and why.reason == "SecretNotFound"
    assert "spec.envValueFrom.DB_PASSWORD.secretKeyRef" in why.message and not why.transient
    objs["Secret", "fn-secrets"] = {"token": TOKEN + "\n"}
    assert resolve(spec, read)[1].reason == "KeyNotFound"
    objs["Secret", "fn-secrets"]["db"] = DB
    served, why = resolve(spec, read)
    assert why.reason == "ConfigMapNotFound" and "spec.envValueFrom.MODE" in why.message
    objs["ConfigMap", "fn-config"] = {"mode": "fast"}  # EXTRA is optional: absent is fine
    served, why = resolve(spec, read)
    assert why is None
    # the token from the Secret (its final newline dropped); the env references stay for the pods
    assert served.invoke_token == TOKEN and served.invoke_token_secret_ref is None
    assert served.env_value_from == spec.env_value_from
    objs["Secret", "fn-secrets"]["token"] = "xq7z"
    served, why = resolve(spec, read)
    assert served is None and why.reason == "InvalidSecret" and "xq7z" not in why.message
    # an object without the opt-in label is refused, optional or not, before its keys are looked at
    objs["Secret", "x"] = {"token": TOKEN}
    for optional in (False, True):
        ref = {"name": "x", "key": "nope", "optional": optional}
        other = parse_spec({"name": "f", **REFS, "env_value_from": {"A": {"secret_key_ref": ref}}})
        served, why = resolve(other, read)
        assert served is None and why.reason == "SecretNotAllowed" and READABLE_LABEL in why.message

    def broken(kind, name):
        raise RefReadError("403 Forbidden")

    served, why = resolve(spec, broken)
    assert served is None and why.reason == "RefReadFailed" and why.transient


def test_pods_get_value_from_not_values():
    spec = parse_spec({"name": "f", **REFS})
    pod = pod_manifest(spec, "node-a", "f-0", None)
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["DB_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "fn-secrets", "key": "db"}}
    assert env["MODE"]["valueFrom"] == {"configMapKeyRef": {"name": "fn-config", "key": "mode"}}
    assert env["EXTRA"]["valueFrom"]["configMapKeyRef"]["optional"] is True


# --- admission, as the API server would do it ----------------------------------------------------


def test_admission_rejects_bad_references(api):
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, function_resource("ok", REFS)
    )
    bad = [
        ({"envValueFrom": {"X": {}}}, "exactly one of secretKeyRef and configMapKeyRef"),
        (
            {
                "envValueFrom": {
                    "X": {
                        "secretKeyRef": {"name": "a", "key": "b"},
                        "configMapKeyRef": {"name": "a", "key": "b"},
                    }
                }
            },
            "exactly one of secretKeyRef and configMapKeyRef",
        ),
        ({"envValueFrom": {"X": {"secretKeyRef": {"name": "a"}}}}, "key"),
        ({"envValueFrom": {"X": {"secretKeyRef": {"name": "A_b", "key": "k"}}}}, "name"),
        (
            {"envValueFrom": {"HEARTH_X": {"secretKeyRef": {"name": "a", "key": "b"}}}},
            "reserved",
        ),
        (
            {
                "env": {"X": "1"},
                "envValueFrom": {"X": {"secretKeyRef": {"name": "a", "key": "b"}}},
            },
            "env and envValueFrom set the same variable",
        ),
        (
            {"invokeToken": "abcdefgh", "invokeTokenSecretRef": {"name": "a", "key": "b"}},
            "give one, not both",
        ),
    ]
    for i, (extra, msg) in enumerate(bad):
        body = function_resource(f"bad{i}", {"handler": "app:handle"})
        body["spec"].update(extra)
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)
        assert e.value.status == 422 and msg in json.loads(e.value.body)["message"], extra
    # Secrets and ConfigMaps themselves: keys and base64 data are checked, stringData merged
    with pytest.raises(ApiException) as e:
        core.create_namespaced_secret("default", {"metadata": {"name": "s"}, "data": {"k": "%%%"}})
    assert e.value.status == 422 and "base64" in e.value.body
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(
            "default", {"metadata": {"name": "c"}, "data": {"a/b": "1"}}
        )
    assert e.value.status == 422
    s = core.create_namespaced_secret(
        "default", {"metadata": {"name": "s"}, "stringData": {"k": "v"}}
    )
    assert s.data == {"k": "dg=="} and s.type == "Opaque"
    # a pod's env valueFrom with two sources is refused too
    pod = pod_manifest(parse_spec({"name": "f", **REFS}), "node-a", "f-0", None)
    pod["spec"]["containers"][0]["env"].append(
        {
            "name": "TWO",
            "valueFrom": {
                "secretKeyRef": {"name": "a", "key": "b"},
                "configMapKeyRef": {"name": "a", "key": "b"},
            },
        }
    )
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("default", pod)
    assert e.value.status == 422 and "more than one field" in e.value.body


# --- the controller -------------------------------------------------------------------------------


def test_controller_resolves_references_and_reports_missing_ones(emu, api, redis_url, caplog):
    caplog.set_level(logging.DEBUG, logger="hearth")
    r = redis.Redis.from_url(redis_url)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    sync = RegistrySync(redis_url, "default")
    c = KubernetesController(api, "default", core=DecisionCore(), registry=sync)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, function_resource("web", REFS)
    )

    def state():
        c.reconcile_once()
        cond = next(
            x for x in emu.objects(PLURAL)["web"]["status"]["conditions"] if x["type"] == "Ready"
        )
        mine = [
            p
            for p in emu.objects("pods").values()
            if p["metadata"]["labels"].get(LABEL_FUNCTION) == "web"
        ]
        return cond, mine, r.hget(KEY, "web")

    cond, mine, reg = state()
    assert (cond["status"], cond["reason"]) == ("False", "SecretNotFound")
    assert "spec.envValueFrom.DB_PASSWORD.secretKeyRef" in cond["message"]
    assert mine == [] and reg is None  # neither served nor started: its pods could not start
    core.create_namespaced_secret(
        "default", {"metadata": readable("fn-secrets"), "stringData": {"token": TOKEN}}
    )
    cond, mine, reg = state()
    assert cond["reason"] == "KeyNotFound" and "'db'" in cond["message"] and reg is None
    core.patch_namespaced_secret("fn-secrets", "default", {"stringData": {"db": DB}})
    assert state()[0]["reason"] == "ConfigMapNotFound"
    core.create_namespaced_config_map(
        "default", {"metadata": readable("fn-config"), "data": {"mode": "fast"}}
    )
    cond, mine, reg = state()
    assert cond["reason"] in ("Scaling", "InstancesReady") and len(mine) == 1
    served = FunctionSpec.model_validate_json(reg)
    assert served.invoke_token == TOKEN and served.env_value_from.keys() == {
        "DB_PASSWORD",
        "MODE",
        "EXTRA",
    }
    env = {e["name"]: e for e in mine[0]["spec"]["containers"][0]["env"]}
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "fn-secrets",
        "key": "db",
    }
    # a rotated token is served at the next reconcile
    core.patch_namespaced_secret("fn-secrets", "default", {"stringData": {"token": TOKEN + "-v2"}})
    state()
    assert FunctionSpec.model_validate_json(r.hget(KEY, "web")).invoke_token == TOKEN + "-v2"
    # the Secret goes: not served any more (an open token would be worse), reason given
    core.delete_namespaced_secret("fn-secrets", "default")
    cond, mine, reg = state()
    assert cond["reason"] == "SecretNotFound" and reg is None
    # no secret value in any pod, status, Event or log line
    seen = json.dumps([emu.objects(k) for k in ("pods", PLURAL, "events")]) + caplog.text
    for v in (TOKEN, DB, "fast"):
        assert v not in seen
    sync.close()
    r.close()


def test_the_platforms_own_secrets_are_not_function_readable(emu, api, redis_url):
    """The controller can read every Secret in its namespace, the chart's own too: a Function
    naming one without the opt-in label gets no pod (the kubelet would fill in the env) and is
    not served (its token would land in the registry)."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    core.create_namespaced_secret(
        "default", {"metadata": {"name": "rel-hearth-admin"}, "stringData": {"token": TOKEN}}
    )
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "rel-hearth-cfg"}, "data": {"mode": "m"}}
    )
    sync = RegistrySync(redis_url, "default")
    c = KubernetesController(api, "default", core=DecisionCore(), registry=sync)
    steal = {"secret_key_ref": {"name": "rel-hearth-admin", "key": "token"}}
    cases = {
        "env": ({"env_value_from": {"X": steal}}, "SecretNotAllowed"),
        "opt": (
            {
                "env_value_from": {
                    "X": {"secret_key_ref": {**steal["secret_key_ref"], "optional": True}}
                }
            },
            "SecretNotAllowed",
        ),
        "tok": ({"invoke_token_secret_ref": steal["secret_key_ref"]}, "SecretNotAllowed"),
        "cm": (
            {
                "env_value_from": {
                    "X": {"config_map_key_ref": {"name": "rel-hearth-cfg", "key": "mode"}}
                }
            },
            "ConfigMapNotAllowed",
        ),
    }
    for name, (extra, _) in cases.items():
        body = {"handler": "app:handle", "min_instances": 1, **extra}
        custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, function_resource(name, body)
        )
    rep = c.reconcile_once()
    assert rep.created == [] and emu.objects("pods") == {}
    for name, (_, reason) in cases.items():
        cond = next(
            x for x in emu.objects(PLURAL)[name]["status"]["conditions"] if x["type"] == "Ready"
        )
        assert (cond["status"], cond["reason"]) == ("False", reason), name
        assert READABLE_LABEL in cond["message"]
    assert redis.Redis.from_url(redis_url).hgetall(KEY) == {}
    # its owner opts the object in: now it is served
    core.patch_namespaced_secret("rel-hearth-admin", "default", {"metadata": OPT_IN})
    c.reconcile_once()
    assert {p["metadata"]["labels"][LABEL_FUNCTION] for p in emu.objects("pods").values()} == {
        "env",
        "opt",
        "tok",
    }
    sync.close()


def test_a_function_with_secret_env_never_claims_a_pool_pod(emu, api):
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    core.create_namespaced_secret(
        "default",
        {"metadata": readable("fn-secrets"), "stringData": {"token": TOKEN, "db": DB}},
    )
    core.create_namespaced_config_map(
        "default", {"metadata": readable("fn-config"), "data": {"mode": "m"}}
    )
    c = KubernetesController(api, "default", core=DecisionCore(), pool_targets={"python3.11": 1})
    c.reconcile_once()  # the pool pods
    pool = {
        n
        for n, p in emu.objects("pods").items()
        if p["metadata"]["labels"].get("hearth.dev/role") == "pool"
    }
    assert pool
    custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, function_resource("web", REFS)
    )
    rep = c.reconcile_once()
    assert rep.claimed == [] and rep.created  # a new pod (the kubelet sets its env), no claim
    mine = [
        p
        for p in emu.objects("pods").values()
        if p["metadata"]["labels"].get(LABEL_FUNCTION) == "web"
    ]
    assert len(mine) == 1 and mine[0]["metadata"]["name"] not in pool


def test_registry_keeps_a_function_whose_references_cannot_be_read(redis_url):
    sync = RegistrySync(redis_url, "t")
    spec = FunctionSpec(name="f", handler="app:handle", invoke_token=TOKEN)
    assert sync.sync({"f": spec}) == (["f"], [])
    assert sync.sync({}, keep={"f"}) == ([], [])  # e.g. a 403 reading its Secret: keep serving
    assert sync.sync({}) == ([], ["f"])
    sync.close()
