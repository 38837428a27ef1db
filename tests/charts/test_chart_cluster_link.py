"""The node agents' cluster link as the platform chart wires it (rendered by the real helm
binary): the cluster token from a Secret (stable under `helm template` with `secretSeed`, kept
across upgrades, or an existing one), the link on the pod IP (fieldRef) announced to the peers,
and an environment the agent itself accepts."""

from __future__ import annotations

import base64
import re

import pytest
from chart_helpers import CHARTS, helm, template
from hearth.config import Settings

LINK_ENV = (
    "POD_IP",
    "HEARTH_CLUSTER_TOKEN",
    "HEARTH_LINK_HOST",
    "HEARTH_LINK_PORT",
    "HEARTH_ADVERTISE",
    "HEARTH_HEARTBEAT_S",
)


def component(docs, kind, name):
    found = [
        d
        for d in docs
        if d["kind"] == kind and d["metadata"]["labels"].get("app.kubernetes.io/component") == name
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def agent(docs):
    return component(docs, "DaemonSet", "node-agent")["spec"]["template"]["spec"]["containers"][0]


def secrets(docs):
    return {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for d in docs
        if d["kind"] == "Secret"
    }


def kubelet_env(c, docs, pod_ip: str, node: str) -> dict[str, str]:
    """The environment the kubelet would give this container: fieldRefs, secretKeyRefs of the
    rendered Secrets, `$(VAR)` of earlier variables (unknown references stay as written)."""
    fields = {"status.podIP": pod_ip, "spec.nodeName": node, "metadata.namespace": "default"}
    data = secrets(docs)
    out: dict[str, str] = {}
    for e in c["env"]:
        ref = e.get("valueFrom") or {}
        if "fieldRef" in ref:
            v = fields[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            v = data[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        else:
            v = re.sub(r"\$\((\w+)\)", lambda m: out.get(m[1], m[0]), e["value"])
        out[e["name"]] = v
    return out


def test_agents_link_on_the_pod_ip_with_the_token_from_the_chart_secret(monkeypatch):
    docs = template("hearth", "--set", "secretSeed=s3cret")
    c = agent(docs)
    env = kubelet_env(c, docs, "10.244.1.7", "worker-1")
    names = [e["name"] for e in c["env"]]
    # $(POD_IP) only expands when POD_IP comes first
    assert names.index("POD_IP") < names.index("HEARTH_LINK_HOST") < names.index("HEARTH_ADVERTISE")
    assert env["HEARTH_LINK_HOST"] == env["HEARTH_ADVERTISE"] == "10.244.1.7"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env["HEARTH_LINK_PORT"] == str(ports["link"]) == "7070"
    # the token: a Secret of its own, referenced (never inlined), distinct from the admin token
    ref = next(e for e in c["env"] if e["name"] == "HEARTH_CLUSTER_TOKEN")["valueFrom"]
    name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
    token = secrets(docs)[name][key]
    assert name.endswith("-cluster") and len(token) >= 16
    admin = next(v["token"] for k, v in secrets(docs).items() if k.endswith("-admin"))
    assert token != admin
    assert all(token not in str(d) for d in docs if d["kind"] != "Secret")
    # only the node agents hold it: not the gateway, the controller or function pods' templates
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Pod"):
            assert "HEARTH_CLUSTER_TOKEN" not in str(d), d["metadata"]["name"]
    # the agent accepts this environment as it is (names and formats it reads)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings.from_env()
    assert (s.cluster_token, s.link_host, s.link_port) == (token, "10.244.1.7", 7070)
    assert (s.advertise, s.heartbeat_s, s.node) == ("10.244.1.7", 1.0, "worker-1")


def test_cluster_token_is_stable_with_a_seed_and_kept_across_upgrades():
    def token(*args):
        return next(
            v["token"]
            for k, v in secrets(template("hearth", *args)).items()
            if k.endswith("-cluster")
        )

    seeded = token("--set", "secretSeed=s3cret")
    assert seeded == token("--set", "secretSeed=s3cret")  # helm template / GitOps: no drift
    assert seeded != token("--set", "secretSeed=other")
    assert token() != token()  # no seed: random per render (install); upgrades keep the
    # live one (lookup: test_chart_render.test_secrets_are_kept_across_upgrades_with_lookup)


@pytest.mark.parametrize(
    "args, secret, port",
    [
        (
            [
                "--set",
                "nodeAgent.link.existingSecret=my-cluster",
                "--set",
                "nodeAgent.link.secretKey=k",
            ],
            False,
            7070,
        ),
        (
            [
                "--set",
                "nodeAgent.link.port=9100",
                "--set-json",
                "nodeAgent.link.heartbeatSeconds=0.5",
            ],
            True,
            9100,
        ),
    ],
    ids=["existing-secret", "port-and-heartbeat"],
)
def test_link_values(args, secret, port):
    docs = template("hearth", *args)
    c = agent(docs)
    env = {e["name"]: e for e in c["env"]}
    ref = env["HEARTH_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert any(n.endswith("-cluster") for n in secrets(docs)) == secret
    if not secret:
        assert (ref["name"], ref["key"]) == ("my-cluster", "k")
    assert env["HEARTH_LINK_PORT"]["value"] == str(port)
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["link"] == port
    if "0.5" in str(args):
        assert env["HEARTH_HEARTBEAT_S"]["value"] == "0.5"


def test_link_off_renders_no_token_no_port_no_link_env():
    docs = template("hearth", "--set", "nodeAgent.link.enabled=false")
    c = agent(docs)
    assert not set(LINK_ENV) & {e["name"] for e in c["env"]}
    assert [p["name"] for p in c["ports"]] == ["http"]
    assert not [n for n in secrets(docs) if n.endswith("-cluster")]


@pytest.mark.parametrize(
    "value, needle",
    [("nodeAgent.link.port=0", "port"), ("nodeAgent.link.heartbeatSeconds=0", "heartbeatSeconds")],
)
def test_bad_link_values_fail_naming_the_value(value, needle):
    p = helm("template", "t", str(CHARTS / "hearth"), "--set", value)
    assert p.returncode != 0 and needle in p.stderr, p.stderr
