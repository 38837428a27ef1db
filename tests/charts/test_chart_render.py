"""The Helm charts, rendered by the real helm 3.19 binary: lint, offline schema validation of
every rendered manifest, value validation with messages naming the value, privileges, and
agreement between the rendered Function resources and the controller's own model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from chart_helpers import (
    CHARTS,
    HELM,
    ROOT,
    helm,
    kubernetes_validate,
    template,
    validate_custom_resource,
)
from hearth.controller import crd as crdmod
from hearth.controller.k8s.pods import PodSettings
from hearth.spec import FunctionSpec

assert HELM.exists(), "helm missing: run `make install` (it fetches helm into .tools/)"

EXAMPLES = sorted((CHARTS / "hearth-function" / "examples").glob("*.yaml"))
CUSTOM_KINDS = {"Function", "ServiceMonitor"}  # no built-in schema: checked separately below


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, component=None):
    found = [
        d
        for d in by_kind(docs, kind)
        if component is None
        or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def container(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]


def sets(*assignments: str) -> list[str]:
    """helm arguments giving each `key=value` its own `--set`."""
    return [arg for a in assignments for arg in ("--set", a)]


def assert_valid(docs, tmp_path: Path):
    """kubernetes-validate --strict on every document it has a schema for (the CRD included);
    Function resources against the CRD's schema and FunctionSpec; nothing else unknown."""
    p = kubernetes_validate(docs, tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "ERROR" not in out, out
    for line in out.splitlines():
        if line.startswith("WARN"):
            assert any(f"kind {k} " in line for k in CUSTOM_KINDS), line
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert out.count("passed for resource") == len(builtin), out
    for fn in by_kind(docs, "Function"):
        assert validate_custom_resource(crdmod.function_crd(), fn) == [], fn
        crdmod.spec_from_resource(fn)


# --- lint ---------------------------------------------------------------------------------------


def test_lint_platform_chart_strict():
    p = helm("lint", "--strict", str(CHARTS / "hearth"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 chart(s) failed" in p.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_lint_function_chart_strict_with_each_example(example):
    p = helm("lint", "--strict", str(CHARTS / "hearth-function"), "-f", str(example))
    assert p.returncode == 0, p.stdout + p.stderr


def test_lint_function_chart_without_handler_names_it():
    p = helm("lint", "--strict", str(CHARTS / "hearth-function"))
    assert p.returncode != 0
    assert "missing property 'handler'" in p.stdout + p.stderr


# --- rendering + offline validation --------------------------------------------------------------

PLATFORM_VARIANTS = {
    "defaults": [],
    "external-redis": sets("redis.enabled=false", "redis.external.url=redis://r.example:6379/0"),
    "external-redis-secret": sets("redis.enabled=false", "redis.external.existingSecret=redis-url"),
    "ingress-tls": sets(
        "gateway.ingress.enabled=true",
        "gateway.ingress.host=hearth.example.com",
        "gateway.ingress.className=nginx",
        "gateway.ingress.tlsSecretName=hearth-tls",
    ),
    "ebpf-off-unix-fallback": sets("nodeAgent.dataplane=unix"),
    "ebpf-auto-legacy-kernel": sets("nodeAgent.dataplane=auto", "nodeAgent.legacyKernel=true"),
    "ebpf-privileged": sets("nodeAgent.privileged=true"),
    "servicemonitor-no-controller": sets(
        "gateway.metrics.serviceMonitor.enabled=true",
        "controller.replicas=0",
        "controller.keepalivePolicy=coldstart-aware",
        "gateway.replicas=3",
    ),
    "no-agent-shm-emptydir-no-persistence": sets(
        "nodeAgent.shm.hostPath=", "redis.persistence.enabled=false"
    ),
    "no-node-agent": sets("nodeAgent.enabled=false", "adminToken.existingSecret=my-admin"),
}


@pytest.mark.parametrize("variant", PLATFORM_VARIANTS, ids=str)
def test_platform_variants_render_valid_manifests(variant, tmp_path):
    docs = template("hearth", *PLATFORM_VARIANTS[variant])
    assert_valid(docs, tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "Service", "Role", "RoleBinding"} <= kinds


def test_several_functions_with_the_platform_render_valid(tmp_path):
    docs = template("hearth")
    for ex in EXAMPLES:
        docs += template("hearth-function", "-f", str(ex), name=ex.stem)
    docs += template(
        "hearth-function",
        *sets("handler=app.main:run", "triggers.http.enabled=false"),
        # helm's --set turns 12.5 into a string: decimals go through --set-json or -f
        "--set-json",
        'triggers.redisStreams=[{"stream": "jobs", "claimIdleSeconds": 12.5}]',
        name="worker",
    )
    fns = by_kind(docs, "Function")
    assert len(fns) == len(EXAMPLES) + 2  # + the helm test hook's function
    assert_valid(docs, tmp_path)


def test_variant_toggles_change_what_is_rendered():
    default = template("hearth")
    assert by_kind(default, "StatefulSet") and not by_kind(default, "Ingress")
    assert not by_kind(default, "ServiceMonitor")
    gw = one(default, "Deployment", "gateway")
    assert gw["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    ext = template("hearth", *PLATFORM_VARIANTS["external-redis"])
    assert not by_kind(ext, "StatefulSet")
    env = {e["name"]: e for e in container(one(ext, "Deployment", "gateway"))["env"]}
    assert env["HEARTH_REDIS_URL"]["value"] == "redis://r.example:6379/0"

    ing = one(template("hearth", *PLATFORM_VARIANTS["ingress-tls"]), "Ingress")
    assert ing["spec"]["rules"][0]["host"] == "hearth.example.com"
    assert ing["spec"]["tls"][0]["secretName"] == "hearth-tls"
    assert (
        ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
        == "t-hearth-gateway"
    )

    sm_docs = template("hearth", *PLATFORM_VARIANTS["servicemonitor-no-controller"])
    sm = one(sm_docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    svc = one(sm_docs, "Service", "gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    gw = one(sm_docs, "Deployment", "gateway")
    assert "prometheus.io/scrape" not in gw["spec"]["template"]["metadata"].get("annotations", {})
    args = container(one(sm_docs, "Deployment", "controller"))["args"]
    assert "--keepalive-policy=coldstart-aware" in args and "--resync=30" in args


def test_redis_url_uses_the_password_secret_without_exposing_it():
    docs = template("hearth")
    env = {e["name"]: e for e in container(one(docs, "Deployment", "controller"))["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "t-hearth-redis",
        "key": "password",
    }
    assert env["HEARTH_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@t-hearth-redis:6379/0"
    # $(VAR) expansion only sees variables defined earlier in the list
    names = [e["name"] for e in container(one(docs, "Deployment", "controller"))["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("HEARTH_REDIS_URL")
    sts = one(docs, "StatefulSet")
    assert (
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    )


def test_gateway_probes_and_port():
    gw = container(one(template("hearth", "--set", "gateway.port=9000"), "Deployment", "gateway"))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert gw[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gw["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    env = {e["name"]: e for e in gw["env"]}
    assert env["HEARTH_PORT"]["value"] == "9000"
    assert env["HEARTH_MAX_BODY_BYTES"]["value"] == "268435456"  # not 2.68435456e+08
    assert gw["args"][:2] == ["up", "--role=gateway"]


def test_image_defaults_to_app_version_and_is_configurable():
    chart = yaml.safe_load((CHARTS / "hearth" / "Chart.yaml").read_text())
    gw = container(one(template("hearth"), "Deployment", "gateway"))
    assert gw["image"] == f"localhost/hearth:{chart['appVersion']}"
    gw = container(
        one(
            template("hearth", *sets("image.repository=reg.local/h", "image.tag=dev")),
            "Deployment",
            "gateway",
        )
    )
    assert gw["image"] == "reg.local/h:dev"


# --- CRD: one source of truth -------------------------------------------------------------------


def test_rendered_crd_is_function_crd():
    crds = by_kind(template("hearth"), "CustomResourceDefinition")
    assert crds == [crdmod.function_crd()]


# --- secrets ------------------------------------------------------------------------------------


def test_admin_token_generated_given_or_existing():
    docs = template("hearth")
    sec = one(docs, "Secret", "admin")
    import base64

    tok = base64.b64decode(sec["data"]["token"]).decode()
    assert tok.startswith("hth_") and len(tok) == 36
    sec = one(template("hearth", "--set", "adminToken.value=s3cr3t-token"), "Secret", "admin")
    assert base64.b64decode(sec["data"]["token"]).decode() == "s3cr3t-token"
    docs = template("hearth", *PLATFORM_VARIANTS["no-node-agent"])
    assert not [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("-admin")]
    env = {e["name"]: e for e in container(one(docs, "Deployment", "gateway"))["env"]}
    assert env["HEARTH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "my-admin"


def test_secrets_are_kept_across_upgrades_with_lookup():
    text = (CHARTS / "hearth" / "templates" / "secrets.yaml").read_text()
    assert text.count('lookup "v1" "Secret"') == 3  # admin token, Redis password, cluster token


# --- RBAC: least privilege ----------------------------------------------------------------------


def test_controller_rbac_is_least_privilege():
    docs = template("hearth")
    role = one(docs, "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("hearth.dev",), ("functions",)): {"get", "list", "watch"},
        (("hearth.dev",), ("functions/status",)): {"get", "patch", "update"},
        (("hearth.dev",), ("functions/finalizers",)): {"update"},
        (("",), ("pods",)): {"get", "list", "watch", "create", "delete", "patch"},
        # a Function's Secret/ConfigMap references: get by name only (no list or watch)
        (("",), ("secrets", "configmaps")): {"get"},
        (("", "events.k8s.io"), ("events",)): {"create", "patch"},
        (("coordination.k8s.io",), ("leases",)): {
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
        },
    }
    cr = one(docs, "ClusterRole")
    assert cr["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},  # other pods' requests
    ]
    off = one(template("hearth", "--set", "controller.countOtherPods=false"), "ClusterRole")
    assert off["rules"] == cr["rules"][:1]
    for r in [*role["rules"], *cr["rules"]]:
        assert "*" not in r["verbs"] and "*" not in r["resources"]
    # only the controller mounts an API token
    sas = {
        s["metadata"]["name"]: s["automountServiceAccountToken"]
        for s in by_kind(docs, "ServiceAccount")
    }
    assert sas == {
        "t-hearth-controller": True,
        "t-hearth-gateway": False,
        "t-hearth-node-agent": False,
    }


# --- node agent privileges ----------------------------------------------------------------------

DOCUMENTED_CAPS = {
    "ebpf": {"BPF", "NET_ADMIN"},
    "auto": {"BPF", "NET_ADMIN"},
    "legacy": {"NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"},
    "unix": set(),
    "extra": {"BPF", "NET_ADMIN", "PERFMON"},
}
EBPF_HOST_PATHS = {"/sys/fs/bpf", "/lib/modules", "/usr/src", "/run/hearth", "/run/hearth/shm"}


def agent(*args):
    ds = one(template("hearth", *args), "DaemonSet")
    return ds, container(ds)


@pytest.mark.parametrize(
    ("mode", "args"),
    [
        ("ebpf", []),
        ("auto", sets("nodeAgent.dataplane=auto")),
        ("legacy", sets("nodeAgent.legacyKernel=true")),
        ("unix", sets("nodeAgent.dataplane=unix", "nodeAgent.legacyKernel=true")),
        ("extra", sets("nodeAgent.extraCapabilities={PERFMON}")),
    ],
)
def test_node_agent_has_exactly_the_documented_capabilities(mode, args):
    ds, c = agent(*args)
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"].get("add", [])) == DOCUMENTED_CAPS[mode]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert "privileged" not in sc
    pod = ds["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["automountServiceAccountToken"] is False
    host = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == (EBPF_HOST_PATHS if mode != "unix" else {"/run/hearth", "/run/hearth/shm"})
    ro = {m["mountPath"] for m in c["volumeMounts"] if m.get("readOnly")}
    if mode != "unix":
        assert ro == {"/lib/modules", "/usr/src"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HEARTH_DATAPLANE"] == ("ebpf" if mode in ("legacy", "extra") else mode)


def test_node_agent_shm_is_the_host_directory_instance_pods_mount():
    """By default the slot pool is a host directory, the one the controller gives instance pods
    (--shm-dir = PodSettings.shm_dir): an emptyDir would be private to the agent pod."""
    ds, c = agent()
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["shm"]["hostPath"] == {"path": PodSettings().shm_dir, "type": "DirectoryOrCreate"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    ctl = next(
        d
        for d in template("hearth")
        if d["kind"] == "Deployment" and "controller" in d["metadata"]["name"]
    )
    assert (
        f"--shm-dir={PodSettings().shm_dir}"
        in ctl["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    ds, c = agent("--set", "nodeAgent.shm.hostPath=", "--set", "nodeAgent.shm.sizeLimit=512Mi")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "512Mi"}


def test_node_agent_privileged_toggle():
    _, c = agent("--set", "nodeAgent.privileged=true")
    assert c["securityContext"]["privileged"] is True
    assert "capabilities" not in c["securityContext"]
    _, c = agent(*sets("nodeAgent.privileged=true", "nodeAgent.dataplane=unix"))
    assert "privileged" not in c["securityContext"]  # unix needs nothing, even if asked


def test_every_capability_is_explained_in_chart_and_docs():
    tpl = (CHARTS / "hearth" / "templates" / "node-agent-daemonset.yaml").read_text()
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for cap in set().union(*DOCUMENTED_CAPS.values()) - {"PERFMON"}:
        assert f"# {cap}:" in tpl, f"no comment explaining {cap} in the DaemonSet template"
        assert f"CAP_{cap}" in doc, f"docs/kubernetes.md does not explain CAP_{cap}"
    for path in EBPF_HOST_PATHS:
        assert path in doc


def test_other_workloads_run_restricted():
    docs = template("hearth")
    for comp in ("gateway", "controller"):
        c = container(one(docs, "Deployment", comp))
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    redis = container(one(docs, "StatefulSet"))
    assert redis["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# --- bad values: a message naming the value ------------------------------------------------------


def _function_sets(*assignments: str) -> list[str]:
    """hearth-function --set arguments with a valid handler, so a BAD row shows only what is bad."""
    return sets("handler=m:f", *assignments)


BAD = [
    ("hearth", sets("gateway.replicas=-1"), "/gateway/replicas"),
    ("hearth", sets("controller.replicas=-3"), "/controller/replicas"),
    ("hearth", sets("gateway.port=http"), "/gateway/port"),
    ("hearth", sets("gateway.ingress.enabled=yes"), "/gateway/ingress/enabled"),
    ("hearth", sets("gateway.bogus=1"), "additional properties 'bogus'"),
    ("hearth", sets("redisUrl=redis://x"), "additional properties 'redisUrl'"),
    ("hearth", sets("nodeAgent.dataplane=xdp"), "/nodeAgent/dataplane"),
    ("hearth", sets("nodeAgent.shm.sizeLimit=lots"), "/nodeAgent/shm/sizeLimit"),
    ("hearth", sets("redis.enabled=false"), "/redis/external/url"),
    ("hearth", sets("controller.replicas=2"), "/controller/replicas"),
    ("hearth", sets("controller.keepalivePolicy=lru"), "/controller/keepalivePolicy"),
    ("hearth-function", [], "missing property 'handler'"),
    ("hearth-function", sets("handler=not-an-entry-point"), "/handler"),
    ("hearth-function", _function_sets("scaling.maxInstances=-1"), "/scaling/maxInstances"),
    ("hearth-function", _function_sets("scaling.minInstances=-2"), "/scaling/minInstances"),
    ("hearth-function", _function_sets("scaling.concurrency=many"), "/scaling/concurrency"),
    ("hearth-function", _function_sets("keepAlive.policy=forever"), "/keepAlive/policy"),
    ("hearth-function", _function_sets("replicas=3"), "additional properties 'replicas'"),
    (
        "hearth-function",
        _function_sets("triggers.redisStreams[0].group=g"),
        "missing property 'stream'",
    ),
    (
        "hearth-function",
        _function_sets("scaling.minInstances=5", "scaling.maxInstances=2"),
        "scaling.minInstances (5) exceeds",
    ),
    ("hearth-function", _function_sets("triggers.http.enabled=false"), "/triggers/redisStreams"),
    ("hearth-function", _function_sets("name=Bad_Name"), "/name"),
    ("hearth-function", _function_sets("invokeToken=short"), "/invokeToken"),
    (
        "hearth-function",
        _function_sets("envValueFrom.X.secretKeyRef.name=s"),
        "missing property 'key'",
    ),
    (
        "hearth-function",
        _function_sets(
            "envValueFrom.HEARTH_X.secretKeyRef.name=s", "envValueFrom.HEARTH_X.secretKeyRef.key=k"
        ),
        "envValueFrom.HEARTH_X: names starting with HEARTH_ are reserved",
    ),
    (
        "hearth-function",
        _function_sets("invokeTokenSecretRef.name=Bad_Name", "invokeTokenSecretRef.key=k"),
        "/invokeTokenSecretRef",
    ),
    (
        "hearth-function",
        _function_sets(
            "invokeToken=tok-12345678", "invokeTokenSecretRef.name=s", "invokeTokenSecretRef.key=k"
        ),
        "give one, not both",
    ),
]


@pytest.mark.parametrize(("chart", "args", "needle"), BAD, ids=[f"{c}:{n}" for c, _, n in BAD])
def test_bad_values_fail_naming_the_value(chart, args, needle):
    # A JSON schema cannot compare two values: min > max fails at render time (template and
    # install), which `helm lint` only reports as [INFO].
    only_render = any(w in needle for w in ("exceeds", "not both", "reserved"))
    cmds = [["template", "t"]] if only_render else [["template", "t"], ["lint", "--strict"]]
    for cmd in cmds:
        p = helm(*cmd, str(CHARTS / chart), *args)
        assert p.returncode != 0, f"{cmd} accepted {args}"
        assert needle in p.stdout + p.stderr, p.stdout + p.stderr


def test_bad_release_name_for_function_fails_clearly():
    p = helm("template", "Bad.Release", str(CHARTS / "hearth-function"), "--set", "handler=m:f")
    assert p.returncode != 0


# --- the function chart and the controller's model cannot drift ----------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_render_functions_the_model_accepts(example):
    (fn,) = template("hearth-function", "-f", str(example), name=example.stem)
    spec = crdmod.spec_from_resource(fn)
    values = yaml.safe_load(example.read_text())
    assert spec.name == values["name"]
    assert spec.handler == values["handler"]
    assert spec.min_instances == values["scaling"]["minInstances"]
    assert spec.keep_alive.policy == values["keepAlive"]["policy"]
    assert spec.affinity_group == values.get("affinityGroup")
    streams = [t.stream for t in spec.stream_triggers()]
    assert streams == [s["stream"] for s in values["triggers"].get("redisStreams", [])]


def test_every_value_maps_onto_the_spec(tmp_path):
    args = {
        "handler": "pkg.mod:fn",
        "init": "pkg.mod:setup",
        "runtime": "python3",
        "image": "reg.local/fn:1",
        "codePath": "/app",
        "env.MODE": "fast",
        "labels.team": "ml",
        "resources.memoryMb": "1048576",
        "resources.cpuMillicores": "250",
        "scaling.minInstances": "2",
        "scaling.maxInstances": "9",
        "scaling.concurrency": "7",
        "scaling.queueSize": "0",
        "scaling.spread": "true",
        "timeoutSeconds": "2.5",
        "keepAlive.policy": "greedy-dual",
        "keepAlive.ttlSeconds": "90",
        "affinityGroup": "tree-1",
        "invokeToken": "tok-12345678",
        "triggers.redisStreams[0].stream": "in",
        "triggers.redisStreams[0].group": "g1",
        "triggers.redisStreams[0].batchSize": "3",
        "triggers.redisStreams[0].maxInflight": "4",
        "triggers.redisStreams[0].maxDeliveries": "6",
        "triggers.redisStreams[0].invokeBatch": "8",
        "triggers.redisStreams[0].backoffSeconds": "0.25",
        "triggers.redisStreams[0].backoffMaxSeconds": "8",
        "triggers.redisStreams[0].claimIdleSeconds": "45",
    }
    values = tmp_path / "v.yaml"  # decimals through a values file (--set makes them strings)
    values.write_text(
        "timeoutSeconds: 2.5\ntriggers:\n  redisStreams:\n"
        "  - {stream: in, group: g1, batchSize: 3, maxInflight: 4, maxDeliveries: 6,\n"
        "     invokeBatch: 8, backoffSeconds: 0.25, backoffMaxSeconds: 8, claimIdleSeconds: 45}\n"
    )
    flat = sets(*(f"{k}={v}" for k, v in args.items() if not k.startswith(("timeout", "triggers"))))
    (fn,) = template("hearth-function", "-f", str(values), *flat, "--set", "name=full", name="r")
    assert fn["metadata"]["name"] == "full"
    assert "e+" not in yaml.safe_dump(fn)  # large ints not in exponent form
    got = crdmod.spec_from_resource(fn)
    want = FunctionSpec.model_validate(
        {
            "name": "full",
            "handler": "pkg.mod:fn",
            "init": "pkg.mod:setup",
            "runtime": "python3",
            "image": "reg.local/fn:1",
            "code_path": "/app",
            "env": {"MODE": "fast"},
            "labels": {"team": "ml"},
            "resources": {"memory_mb": 1048576, "cpu_millicores": 250},
            "min_instances": 2,
            "max_instances": 9,
            "concurrency": 7,
            "queue_size": 0,
            "spread": True,
            "timeout_s": 2.5,
            "keep_alive": {"policy": "greedy-dual", "ttl_s": 90},
            "affinity_group": "tree-1",
            "invoke_token": "tok-12345678",
            "triggers": [
                {"type": "http"},
                {
                    "type": "redis-stream",
                    "stream": "in",
                    "group": "g1",
                    "batch_size": 3,
                    "max_inflight": 4,
                    "max_deliveries": 6,
                    "invoke_batch": 8,
                    "backoff_s": 0.25,
                    "backoff_max_s": 8,
                    "claim_idle_s": 45,
                },
            ],
        }
    )
    assert got == want


# Where each FunctionSpec field is set in the function chart: a new spec field fails this test
# until the chart maps it (test_every_value_maps_onto_the_spec then checks the mapping).
SPEC_FIELD_TO_VALUE = {
    "name": "name",
    "handler": "handler",
    "init": "init",
    "runtime": "runtime",
    "code_path": "codePath",
    "image": "image",
    "env": "env",
    "env_value_from": "envValueFrom",
    "invoke_token_secret_ref": "invokeTokenSecretRef",
    "preload": "preload",
    "resources": "resources",
    "concurrency": "scaling.concurrency",
    "queue_size": "scaling.queueSize",
    "timeout_s": "timeoutSeconds",
    "min_instances": "scaling.minInstances",
    "max_instances": "scaling.maxInstances",
    "keep_alive": "keepAlive",
    "triggers": "triggers",
    "invoke_token": "invokeToken",
    "affinity_group": "affinityGroup",
    "spread": "scaling.spread",
    "labels": "labels",
}
STREAM_FIELD_TO_VALUE = {
    "stream": "stream",
    "group": "group",
    "batch_size": "batchSize",
    "max_inflight": "maxInflight",
    "max_deliveries": "maxDeliveries",
    "invoke_batch": "invokeBatch",
    "backoff_s": "backoffSeconds",
    "backoff_max_s": "backoffMaxSeconds",
    "claim_idle_s": "claimIdleSeconds",
}


def test_secret_and_config_map_references_render_into_an_admitted_function(tmp_path):
    """envValueFrom and invokeTokenSecretRef values -> the Function's camelCase fields, which
    the CRD (schema + CEL, through the emulator's admission) and the model accept as given."""
    values = tmp_path / "refs.yaml"
    values.write_text(
        "handler: pkg.mod:fn\n"
        "envValueFrom:\n"
        "  DB_PASSWORD: {secretKeyRef: {name: db, key: password}}\n"
        "  MODE: {configMapKeyRef: {name: fn-config, key: mode, optional: true}}\n"
        "invokeTokenSecretRef: {name: fn-token, key: token}\n"
    )
    (fn,) = template("hearth-function", "-f", str(values), name="refs")
    assert fn["spec"]["envValueFrom"]["DB_PASSWORD"] == {
        "secretKeyRef": {"name": "db", "key": "password"}
    }
    assert fn["spec"]["invokeTokenSecretRef"] == {"name": "fn-token", "key": "token"}
    assert validate_custom_resource(crdmod.function_crd(), fn) == []
    from k8s_admission import CustomResourceAdmission

    stored, _ = CustomResourceAdmission(crdmod.function_crd()).admit(fn, strict=True)
    got = crdmod.spec_from_resource(stored)
    assert got.env_value_from["MODE"].config_map_key_ref.optional is True
    assert got.invoke_token_secret_ref.name == "fn-token" and got.invoke_token is None


def test_every_spec_field_is_reachable_from_the_function_chart():
    import json

    from hearth.spec import StreamTrigger

    assert set(FunctionSpec.model_fields) == set(SPEC_FIELD_TO_VALUE), (
        "map new FunctionSpec fields in the chart"
    )
    assert set(StreamTrigger.model_fields) - {"type"} == set(STREAM_FIELD_TO_VALUE)
    vs = json.loads((CHARTS / "hearth-function" / "values.schema.json").read_text())
    for path in SPEC_FIELD_TO_VALUE.values():
        node = vs
        for part in path.split("."):
            node = node["properties"][part]
    item = vs["properties"]["triggers"]["properties"]["redisStreams"]["items"]
    assert set(item["properties"]) == set(STREAM_FIELD_TO_VALUE.values())


def test_function_chart_defaults_equal_model_defaults():
    (fn,) = template("hearth-function", "--set", "handler=m:f", name="d")
    assert crdmod.spec_from_resource(fn) == FunctionSpec(name="d", handler="m:f")


def test_function_values_schema_bounds_match_the_crd():
    import json

    vs = json.loads((CHARTS / "hearth-function" / "values.schema.json").read_text())["properties"]
    spec = crdmod.spec_schema()["properties"]
    pairs = {
        ("scaling", "minInstances"): spec["minInstances"],
        ("scaling", "maxInstances"): spec["maxInstances"],
        ("scaling", "concurrency"): spec["concurrency"],
        ("scaling", "queueSize"): spec["queueSize"],
        ("resources", "memoryMb"): spec["resources"]["properties"]["memoryMb"],
        ("resources", "cpuMillicores"): spec["resources"]["properties"]["cpuMillicores"],
        ("keepAlive", "policy"): spec["keepAlive"]["properties"]["policy"],
        ("keepAlive", "ttlSeconds"): spec["keepAlive"]["properties"]["ttlSeconds"],
    }
    for (group, key), crd_node in pairs.items():
        v = vs[group]["properties"][key]
        for bound in ("maximum", "enum"):
            assert v.get(bound) == crd_node.get(bound), (group, key, bound)
        if crd_node.get("exclusiveMinimum"):
            assert v["exclusiveMinimum"] == crd_node["minimum"], (group, key)
        elif "minimum" in crd_node:
            assert v["minimum"] == crd_node["minimum"], (group, key)
    assert vs["handler"]["pattern"] == spec["handler"]["pattern"]
    assert vs["runtime"]["enum"] == spec["runtime"]["enum"]


# --- helm test hook and NOTES -------------------------------------------------------------------


def test_helm_test_hook_deploys_and_invokes_a_function():
    docs = template("hearth")
    hooks = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert [h["kind"] for h in hooks] == ["Pod", "Function"] or sorted(
        h["kind"] for h in hooks
    ) == ["Function", "Pod"]
    fn = next(h for h in hooks if h["kind"] == "Function")
    pod = next(h for h in hooks if h["kind"] == "Pod")
    assert int(fn["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        pod["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    crdmod.spec_from_resource(fn)
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    name = fn["metadata"]["name"]
    assert env["URL"] == f"http://t-hearth-gateway:80/v1/functions/{name}:invoke"
    assert pod["spec"]["restartPolicy"] == "Never"


def render_notes(chart: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt is not rendered by `helm template`; render it through a copy of the chart
    that includes it as a ConfigMap (helm install --dry-run needs a cluster)."""
    copy = tmp_path / chart
    shutil.copytree(CHARTS / chart, copy)
    notes = (copy / "templates" / "NOTES.txt").read_text()
    (copy / "templates" / "NOTES.txt").unlink()
    (copy / "templates" / "_notes.tpl").write_text(
        '{{- define "notes" -}}\n' + notes + "\n{{- end -}}\n"
    )
    (copy / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n"
        '    {{- include "notes" . | nindent 4 }}\n'
    )
    p = helm(
        "template",
        "hearth",
        str(copy),
        "-n",
        "hearth",
        "--show-only",
        "templates/zz-notes.yaml",
        *args,
    )
    assert p.returncode == 0, p.stderr
    return yaml.safe_load(p.stdout)["data"]["notes"]


def test_notes_tell_how_to_reach_the_gateway_and_deploy(tmp_path):
    n = render_notes("hearth", tmp_path)
    assert "kubectl -n hearth port-forward svc/hearth-gateway 8080:80" in n
    assert "get secret hearth-admin" in n
    assert "helm install hello charts/hearth-function -n hearth" in n
    assert "/v1/functions/hello:invoke" in n
    assert "helm test hearth -n hearth" in n
    n = render_notes(
        "hearth",
        tmp_path / "b",
        *sets("gateway.ingress.enabled=true", "gateway.ingress.host=h.example"),
    )
    assert "export HEARTH_URL=http://h.example" in n
    n = render_notes(
        "hearth",
        tmp_path / "c",
        *sets("redis.enabled=false", "redis.external.url=redis://:pw@r:6379/0"),
    )
    assert "pw" not in n and "redis://:***@r:6379/0" in n


# --- the handlers the charts name, run on real events ---------------------------------------------
# The example values and the helm-test hook name handlers (module:function) and their env; each
# is rendered by helm, read back into a FunctionSpec, then run in this process on real hearth.sdk
# events with that env, and judged by what it returns. (On the platform the same handlers run in
# tests/functions: fedavg_e2e, vecsearch_platform, replay_driver; the hook under kube play.)


def _rendered_spec(docs: list[dict]) -> FunctionSpec:
    (fn,) = [d for d in docs if d["kind"] == "Function"]
    return crdmod.spec_from_resource(fn)


class InProcess:
    """Runs rendered specs' handlers on hearth.sdk Events: chained calls (`ctx.invoke`) go to
    the named spec's handler, with the caller set, as the platform's runtime does."""

    def __init__(self, *specs: FunctionSpec):
        import importlib

        self.specs = {s.name: s for s in specs}
        self.handlers = {}
        for s in specs:
            mod, _, attr = s.handler.partition(":")
            self.handlers[s.name] = getattr(importlib.import_module(mod), attr)
        self.calls: list[tuple[str | None, str]] = []

    def invoke(self, function: str, payload, content_type: str, caller: str | None = None):
        import time
        import uuid

        from hearth.runtime.codec import encode_result
        from hearth.sdk import Context, Event, HandlerError

        spec = self.specs[function]
        self.calls.append((caller, function))
        ctx = Context(
            function=function,
            instance_id=f"{function}-0",
            invocation_id=uuid.uuid4().hex,
            deadline=time.time() + spec.timeout_s,
            caller=caller,
        )

        def chained(f, p, ct="application/octet-stream", token=None):
            status, _, _, body = self.invoke(f, p, ct, caller=function)
            assert status == 200, (f, status, bytes(body))
            return bytes(body)

        ctx._invoke = chained
        mv = payload if isinstance(payload, memoryview) else memoryview(bytes(payload))
        event = Event(payload=mv.toreadonly(), context=ctx, content_type=content_type)
        try:
            status, ctype, headers, body = encode_result(self.handlers[function](event), {})
        except HandlerError as e:
            status, ctype, headers = e.status, "application/json", {}
            body = json.dumps({"error": "handler_error", "detail": str(e)}).encode()
        return status, ctype, headers, body


def _example(stem: str) -> FunctionSpec:
    path = CHARTS / "hearth-function" / "examples" / f"{stem}.yaml"
    return _rendered_spec(template("hearth-function", "-f", str(path), name=stem))


def test_example_replay_handler_runs_the_event_it_is_given():
    spec = _example("replay")
    host = InProcess(spec)
    body = {"function": "trace-fn", "duration_ms": 5, "memory_mb": 1, "seq": 7, "mode": "mixed"}
    status, ctype, _, out = host.invoke(spec.name, json.dumps(body).encode(), "application/json")
    assert status == 200 and ctype.startswith("application/json"), bytes(out)
    out = json.loads(bytes(out))
    assert out["function"] == "trace-fn" and out["seq"] == 7 and out["mode"] == "mixed"
    assert out["elapsed_ms"] >= 5 and out["memory_mb"] == 1
    assert out["instance"] == f"{spec.name}-0"
    status, _, _, out = host.invoke(spec.name, b'{"duration_ms": -1}', "application/json")
    assert status == 400 and "duration_ms" in json.loads(bytes(out))["detail"]


def test_example_fedavg_leaf_folds_its_expected_updates_and_feeds_its_parent(monkeypatch):
    import msgpack
    from flwr.server.strategy.aggregate import aggregate
    from hearth.functions.fedavg import handlers as fl
    from hearth.functions.fedavg.aggregation import parse_model
    from hearth.functions.fedavg.pack import pack

    leaf = _example("fedavg")
    parent = leaf.env["FEDAVG_PARENT"]
    expected = int(leaf.env["FEDAVG_EXPECTED"])
    top = FunctionSpec(
        name=parent,
        handler="hearth.functions.fedavg.handlers:top",
        env={"FEDAVG_ROLE": "top", "FEDAVG_EXPECTED": "1"},
    )
    # in one process the roles read their env from ROLE_ENV (an instance: its own environment)
    monkeypatch.setattr(fl, "ROLE_ENV", {s.name: dict(s.env) for s in (leaf, top)})
    monkeypatch.setattr(fl, "STATE", {})
    host = InProcess(leaf, top)
    rng = np.random.default_rng(5)
    ups = [
        ([("w", rng.uniform(1, 2, (4, 3)).astype(np.float32))], int(rng.integers(1, 100)))
        for _ in range(expected)
    ]
    for i, (m, n) in enumerate(ups):
        st, _, _, out = host.invoke(leaf.name, pack(m, n, round=1, client=f"c{i}"), "x")
        assert st == 200, bytes(out)
        # the partial goes to the parent once, after the last expected update, not before
        assert host.calls.count((leaf.name, parent)) == (1 if i == expected - 1 else 0)
    st, _, headers, out = host.invoke(
        parent, msgpack.packb({"op": "fetch", "round": 1}), "application/msgpack"
    )
    assert st == 200 and headers["x-hearth-samples"] == str(sum(n for _, n in ups))
    (name, got), want = (
        parse_model(bytes(out)).layers[0],
        aggregate([([m[0][1]], n) for m, n in ups])[0],
    )
    assert name == "w"
    np.testing.assert_allclose(got, want, rtol=1e-5)
    st, _, _, out = host.invoke(leaf.name, pack(*ups[0], round=1, client="late"), "x")
    assert st == 409 and "late" in json.loads(bytes(out))["detail"]


def test_example_vecsearch_handler_fans_out_and_equals_the_in_process_search(tmp_path, monkeypatch):
    from hearth.functions.vecsearch import data, handlers, query, storage
    from vecindex import index_file

    spec = _example("vecsearch")
    holders = int(spec.env["HEARTH_VEC_HOLDERS"])
    assert holders > 1  # the example fans out
    split = data.glove_split(2000, 8, seed=4)
    path = index_file(split, tmp_path)
    # the example's env, but the index at a host path (the example bakes it into an image)
    for k, v in spec.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HEARTH_VEC_INDEX", str(path))
    monkeypatch.setattr(handlers, "_STATE", None)
    host = InProcess(spec)
    body = {"vectors": split.queries.tolist(), "k": 10}
    st, _, _, out = host.invoke(spec.name, json.dumps(body).encode(), "application/json")
    assert st == 200, bytes(out)
    got = np.array([r["ids"] for r in json.loads(bytes(out))["results"]])
    assert (got == query.search(storage.load(path), split.queries, 10).ids).all()
    # the tree hops went through ctx.invoke to the example's own function (HEARTH_VEC_CHILD)
    assert host.calls.count((spec.name, spec.name)) == holders - 1


def test_helm_test_hook_handler_answers_the_hook_payload_with_200():
    docs = template("hearth")
    hooks = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    spec = _rendered_spec(hooks)
    pod = next(h for h in hooks if h["kind"] == "Pod")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    # what the hook pod posts, as it posts it (JSON): it passes on 200 only
    st, ctype, _, out = InProcess(spec).invoke(
        spec.name, env["PAYLOAD"].encode(), "application/json"
    )
    assert st == 200 and ctype.startswith("application/json"), bytes(out)
    out = json.loads(bytes(out))
    assert out["elapsed_ms"] >= json.loads(env["PAYLOAD"])["duration_ms"]
