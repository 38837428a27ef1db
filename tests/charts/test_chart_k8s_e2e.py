"""Chart -> controller, end to end without a cluster: render the charts with the real helm,
"apply" the rendered Function resources to the Kubernetes API emulator of the controller tests
(tests/controller/k8s_emulator.py: real REST + watch protocol, official `kubernetes` client),
run the controller's Kubernetes backend configured the way the chart configures it, and check
that instance pods are created.

What stands in for the API server here: the emulator serves no apiextensions endpoint and does
no schema validation, so admission is done by this test with the rendered CRD's own schema
(chart_helpers.validate_custom_resource: OpenAPI part via jsonschema, CEL rules via a small
translator). No real cluster was available."""

from __future__ import annotations

import re
import sys

from chart_helpers import HELM, ROOT, template, validate_custom_resource
from hearth.controller import crd as crdmod
from hearth.redis_server import free_port

sys.path.insert(0, str(ROOT / "tests" / "controller"))
from hearth.controller import k8s  # noqa: E402
from kubernetes import client  # noqa: E402

assert HELM.exists(), "helm missing: run `make install` (it fetches helm into .tools/)"

NS = "hearth"
EXAMPLES = sorted((ROOT / "charts" / "hearth-function" / "examples").glob("*.yaml"))
CONTROLLER_SRCS = sorted((ROOT / "controller" / "k8s").glob("*.py"))


def env_of(deploy) -> dict[str, str]:
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in c["env"]}


def test_rendered_charts_drive_the_kubernetes_backend(api, emu):
    platform = template("hearth", "-n", NS, name="hearth")
    (crd,) = [d for d in platform if d["kind"] == "CustomResourceDefinition"]
    # the controller talks to exactly the API the rendered CRD serves
    assert crd["spec"]["group"] == crdmod.GROUP and crd["spec"]["names"]["plural"] == crdmod.PLURAL
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"]] == [crdmod.VERSION]

    functions = [d for d in platform if d["kind"] == "Function"]  # the helm test hook's
    for ex in EXAMPLES:
        functions += template("hearth-function", "-n", NS, "-f", str(ex), name=ex.stem)
    assert {f["metadata"]["name"] for f in functions} >= {
        "fedavg-leaf",
        "vecsearch",
        "replay-workload",
    }

    custom = client.CustomObjectsApi(api)
    for f in functions:
        assert f["metadata"]["namespace"] == NS
        assert validate_custom_resource(crd, f) == []  # admission with the rendered schema
        custom.create_namespaced_custom_object(crdmod.GROUP, crdmod.VERSION, NS, crdmod.PLURAL, f)

    # the controller as the chart runs it: release namespace, function image from the env
    (ctl_deploy,) = [
        d
        for d in platform
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"
    ]
    image = env_of(ctl_deploy)["HEARTH_FUNCTION_IMAGE"]
    assert (
        "--namespace=$(POD_NAMESPACE)"
        in ctl_deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    controller = k8s.KubernetesController(api, NS, image=image)
    report = controller.reconcile_once()
    assert not report.invalid and not report.errors, report

    pods = emu.objects("pods", NS)
    by_fn: dict[str, list[dict]] = {}
    for p in pods.values():
        by_fn.setdefault(p["metadata"]["labels"]["hearth.dev/function"], []).append(p)
    want = {f["metadata"]["name"]: f["spec"].get("minInstances", 0) for f in functions}
    assert {k: len(v) for k, v in by_fn.items()} == {k: n for k, n in want.items() if n}
    for fn, fpods in by_fn.items():
        spec = next(f for f in functions if f["metadata"]["name"] == fn)["spec"]
        for p in fpods:
            c = p["spec"]["containers"][0]
            assert c["image"] == (spec.get("image") or image) == "localhost/hearth:0.1.0"
            assert c["resources"]["requests"] == {
                "cpu": f"{spec['resources']['cpuMillicores']}m",
                "memory": f"{spec['resources']['memoryMb']}Mi",
            }
            terms = p["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]["nodeSelectorTerms"]
            assert terms[0]["matchExpressions"][0]["key"] == "kubernetes.io/hostname"
            if spec.get("affinityGroup"):
                assert p["metadata"]["labels"]["hearth.dev/affinity-group"] == spec["affinityGroup"]

    # second pass: pods are Running (emulated kubelet); the status the controller writes
    # must fit the CRD's status schema, or a real API server would prune it.
    controller.reconcile_once()
    stored = emu.objects(crdmod.PLURAL, NS)
    assert stored["vecsearch"]["status"]["readyInstances"] == 2
    for obj in stored.values():
        clean = {
            k: v
            for k, v in obj.items()
            if k in ("apiVersion", "kind", "metadata", "spec", "status")
        }
        clean["metadata"] = {"name": obj["metadata"]["name"]}
        assert validate_custom_resource(crd, clean) == [], obj["status"]


# --- RBAC covers what the controller calls, and not much more ------------------------------------

CALLS = {
    r"create_namespaced_pod": ("pods", {"create"}),
    r"delete_namespaced_pod": ("pods", {"delete"}),
    r"read_namespaced_pod": ("pods", {"get"}),
    r"patch_namespaced_pod": ("pods", {"patch"}),
    r"list_namespaced_pod": ("pods", {"list", "watch"}),  # also the watch lister
    r"list_pod_for_all_namespaces": ("pods", {"list"}),  # capacity taken by other pods
    r"list_node": ("nodes", {"list", "watch"}),
    r"get_namespaced_custom_object": ("functions", {"get"}),
    r"list_namespaced_custom_object": ("functions", {"list", "watch"}),
    r"patch_namespaced_custom_object": ("functions", {"patch"}),
    r"patch_namespaced_custom_object_status": ("functions/status", {"patch"}),
    r"replace_namespaced_custom_object_status": ("functions/status", {"update"}),
    r"create_namespaced_event": ("events", {"create"}),
    r"read_namespaced_secret": ("secrets", {"get"}),  # invokeTokenSecretRef, envValueFrom
    r"read_namespaced_config_map": ("configmaps", {"get"}),  # envValueFrom
}


def test_controller_rbac_covers_every_api_call_of_the_backend():
    src = "".join(p.read_text() for p in CONTROLLER_SRCS)
    used = set(re.findall(r"\b(?:api|custom|events)\.([a-z_]+)\(", src))
    unknown = {u for u in used if u not in CALLS}
    assert not unknown, f"map these client calls to RBAC verbs in CALLS: {unknown}"
    docs = template("hearth")
    granted: dict[str, set[str]] = {}
    for d in docs:
        if d["kind"] in ("Role", "ClusterRole"):
            for r in d["rules"]:
                for res in r["resources"]:
                    granted.setdefault(res, set()).update(r["verbs"])
    for call in used:
        res, verbs = CALLS[call]
        assert verbs <= granted.get(res, set()), f"{call} needs {verbs} on {res}"
    # least privilege: beyond the calls, only the documented extras (events, leases for
    # leader election, finalizers for blockOwnerDeletion, get on pods/functions/status)
    needed: dict[str, set[str]] = {}
    for call in used:
        res, verbs = CALLS[call]
        needed.setdefault(res, set()).update(verbs)
    extras = {
        "events": {"create", "patch"},
        "leases": {"get", "list", "watch", "create", "update", "patch"},
        "functions/finalizers": {"update"},
        "functions/status": {"get", "update", "patch"},
        "pods": {"get"},
        "functions": {"get"},
        "nodes": {"get"},
    }
    for res, verbs in granted.items():
        assert verbs <= needed.get(res, set()) | extras.get(res, set()), (res, verbs)


def _k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion of command/args/env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_rendered_controller_deployment_runs_against_the_emulator(emu, api, tmp_path):
    """The controller container exactly as rendered (command, args, env) as a real process:
    kubeconfig -> emulator; a rendered Function gets its pods; SIGTERM stops it cleanly."""
    import base64
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    import yaml

    port = free_port()  # for the controller's /healthz (outside the ephemeral range)
    platform = template("hearth", "-n", NS, "--set", f"controller.httpPort={port}", name="hearth")
    (deploy,) = [
        d
        for d in platform
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"
    ]
    secrets = {d["metadata"]["name"]: d for d in platform if d["kind"] == "Secret"}
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = _k8s_expand(e["value"], env)
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[e["name"]] = NS
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = "node-a"
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    assert c["command"][0] == "python"
    cmd = [sys.executable, *c["command"][1:], *(_k8s_expand(a, env) for a in c.get("args", []))]

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}],
                "current-context": "emu",
            }
        )
    )
    (fn,) = template("hearth-function", "-n", NS, "-f", str(EXAMPLES[0]), name="one")
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        crdmod.GROUP, crdmod.VERSION, NS, crdmod.PLURAL, fn
    )
    assert env["HEARTH_CONTROLLER_HOST"] == "0.0.0.0"  # the pod IP, in a cluster
    env["HEARTH_CONTROLLER_HOST"] = "127.0.0.1"  # here: loopback only
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and c["ports"][0]["containerPort"] == port
    proc_env = {**os.environ, **env, "KUBECONFIG": str(kubeconfig)}
    proc_env.pop("KUBERNETES_SERVICE_HOST", None)  # never in-cluster here
    proc = subprocess.Popen(
        cmd, env=proc_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        want = fn["spec"]["minInstances"]
        while time.monotonic() < deadline:
            pods = [
                p
                for p in emu.objects("pods", NS).values()
                if p["metadata"]["labels"].get("hearth.dev/function") == fn["metadata"]["name"]
            ]
            if len(pods) >= want and proc.poll() is None:
                break
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        assert len(pods) == want >= 1, "controller did not create the pods in time"
        assert pods[0]["spec"]["containers"][0]["image"] == env["HEARTH_FUNCTION_IMAGE"]
        # the liveness probe's endpoint answers 200 once a reconcile finished (the pods can be
        # seen before the reconcile that made them returns: 503 until then)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200 and b'"ok": true' in r.read()
                    break
            except urllib.error.HTTPError as e:
                assert e.code == 503 and time.monotonic() < deadline, f"/healthz: {e.code}"
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"hearth_controller_pods_created_total" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
