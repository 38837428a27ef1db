"""Chart hygiene for operations: the gateway's PodDisruptionBudget and NetworkPolicy, the
controller's single-replica Recreate strategy with probes, and Secrets that stay the same
across `helm template` renders when a seed is given (GitOps)."""

from __future__ import annotations

import base64

from chart_helpers import template


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_gateway_pdb_never_blocks_a_one_replica_drain():
    (pdb,) = kinds(template("hearth"), "PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": pdb["spec"]["selector"]["matchLabels"]},
    }
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert (
        kinds(
            template("hearth", "--set", "gateway.podDisruptionBudget.enabled=false"),
            "PodDisruptionBudget",
        )
        == []
    )


def test_gateway_network_policy_allows_only_its_port_in_and_agents_redis_dns_out():
    docs = template("hearth")
    (np,) = kinds(docs, "NetworkPolicy")
    spec = np["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}] and "from" not in rule
    targets = [
        (
            e.get("to", [{}])[0]
            .get("podSelector", {})
            .get("matchLabels", {})
            .get("app.kubernetes.io/component"),
            [p["port"] for p in e["ports"]],
        )
        for e in spec["egress"]
    ]
    assert targets == [("node-agent", [8082]), ("redis", [6379]), (None, [53, 53])]
    # the selectors match the pods they mean
    agents = next(d for d in docs if d["kind"] == "DaemonSet")
    labels = agents["spec"]["template"]["metadata"]["labels"]
    sel = spec["egress"][0]["to"][0]["podSelector"]["matchLabels"]
    assert sel.items() <= labels.items()
    peers = [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]
    (np,) = kinds(
        template(
            "hearth",
            "--set-json",
            f"gateway.networkPolicy.ingressFrom={__import__('json').dumps(peers)}",
        ),
        "NetworkPolicy",
    )
    assert np["spec"]["ingress"][0]["from"] == peers


def test_controller_is_one_replica_recreated_with_probes():
    (dep,) = [
        d
        for d in kinds(template("hearth"), "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"
    ]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8081, "protocol": "TCP"}]
    args = c["args"]
    assert "--pending-timeout=120" in args and "--http-port=8081" in args
    pools = template("hearth", "--set", "controller.warmPool.python3\\.11=2")
    (dep,) = [
        d
        for d in kinds(pools, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"
    ]
    assert "--pool=python3.11=2" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def _secrets(*args):
    return {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for d in kinds(template("hearth", *args), "Secret")
    }


def test_secrets_are_stable_across_renders_with_a_seed():
    a, b = _secrets("--set", "secretSeed=s3cret"), _secrets("--set", "secretSeed=s3cret")
    assert a == b and len(a) == 3  # admin token, Redis password, cluster token
    assert _secrets("--set", "secretSeed=other") != a  # the seed matters
    token = next(v["token"] for k, v in a.items() if "admin" in k)
    assert token.startswith("hth_") and len(token) == 44
    assert _secrets() != _secrets()  # without a seed: random on each render
