"""The chart's manifests and the controller's own pod manifests, run with `podman kube play`.

    with KubePlay(image, tmp) as kp:                 # a private podman network of its own
        kp.start_platform()                          # chart: Redis, the node agent, the gateway
        kp.play(kp.instance_pod(spec, "inst-1"))     # controller/k8s/pods.py's manifest
        kp.front.invoke(...)

What podman 4.3.1's `kube play` takes (checked): `Pod`, `Deployment`, `Secret`, `ConfigMap`,
`PersistentVolumeClaim`; a `DaemonSet` or a `StatefulSet` is silently ignored, so their pod
template is run as a Pod (as the kubelet would run it on one node). Only what a Kubernetes
cluster supplies and podman cannot is filled in (resolve_env, set_env), nothing else of the
rendered manifests is changed:

- Service DNS (`<release>-hearth-redis`, the node-agent headless Service): the podman network's
  addresses of the pods instead;
- `fieldRef: spec.nodeName` / `metadata.namespace` / `status.podIP` ("not valid or not
  supported"): their values; the node agent's pod gets a fixed address on the network
  (`kube play --ip`), which is its `status.podIP` (the link listens on it and announces it);
- `secretKeyRef`: the rendered Secret's value (a Secret kube-played by podman 4.3 is rejected by
  its own secretKeyRef as "not valid JSON");
- `$(VAR)` expansion in env values (the Redis URL);
- `containerPort`s are dropped: podman 4.3 publishes each on the host's 0.0.0.0, where
  Kubernetes only documents them (nothing here may listen beyond the private network).

The hostPath directories the agent DaemonSet and instance pods share (`nodeAgent.socketDir`,
`nodeAgent.shm.hostPath`) are per-session temporary directories (the slot pool in a tmpfs
under /dev/shm). Every pod, secret and the network are removed by id when the session closes,
also after a failure.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml
from cluster import ROOT, podman, poll, session_network
from hearth.client import Client, ClientError
from hearth.controller.k8s.pods import PodSettings, pod_manifest, pool_pod_manifest
from hearth.spec import FunctionSpec

HELM = ROOT / ".tools" / "bin" / "helm"
LABEL = "dev.hearth.kube-play-session"
NODE = "node-a"
AGENT_PORT = 8082
GATEWAY_PORT = 8080
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR) in env values


def helm_template(release: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """`helm template` of charts/hearth with the project's helm; the parsed documents."""
    args = [str(HELM), "template", release, str(ROOT / "charts" / "hearth")]
    for k, v in values.items():
        args += ["--set-string" if isinstance(v, str) else "--set", f"{k}={v}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"helm template failed:\n{r.stderr}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def as_pod(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The pod a workload (Deployment, DaemonSet, StatefulSet) runs: its template, unchanged."""
    tpl = copy.deepcopy(doc["spec"]["template"])
    meta = {"name": name, **{k: v for k, v in tpl.get("metadata", {}).items() if k != "name"}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]}


def set_env(pod: dict[str, Any], values: dict[str, str]) -> None:
    """Replace env entries (value or valueFrom) by literal values, in every container."""
    for c in pod["spec"]["containers"]:
        for e in c.get("env") or []:
            if e["name"] in values:
                e.pop("valueFrom", None)
                e["value"] = values[e["name"]]


def resolve_env(pod: dict[str, Any], docs: list[dict[str, Any]], fields: dict[str, str]) -> None:
    """What the kubelet does and podman 4.3 does not: `secretKeyRef` from the rendered Secrets
    (podman's kube play stores a Secret in a form its own secretKeyRef then rejects as "not
    valid JSON"), `fieldRef`s it does not support (`spec.nodeName`, `metadata.namespace`), and
    `$(VAR)` expansion of earlier variables in a value."""
    data = {
        d["metadata"]["name"]: {
            **{k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()},
            **(d.get("stringData") or {}),
        }
        for d in docs
        if d["kind"] == "Secret"
    }
    for c in pod["spec"]["containers"]:
        seen: dict[str, str] = {}
        for e in c.get("env") or []:
            ref = e.get("valueFrom") or {}
            if "secretKeyRef" in ref:
                e["value"] = data[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
                del e["valueFrom"]
            elif ref.get("fieldRef", {}).get("fieldPath") in fields:
                e["value"] = fields[ref["fieldRef"]["fieldPath"]]
                del e["valueFrom"]
            if "value" in e:
                e["value"] = VAR_REF.sub(lambda m, v=seen: v.get(m[1], m[0]), e["value"])
                seen[e["name"]] = e["value"]


def find(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"].endswith(suffix):
            return d
    raise AssertionError(f"no {kind} *{suffix} in the rendered chart")


class KubePlay:
    """One session of kube-played pods on a private podman network."""

    def __init__(self, image: str, dataplane: str = "unix") -> None:
        self.image = image
        self.dataplane = dataplane
        self.session = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.prefix = f"kp{uuid.uuid4().hex[:6]}"
        self.token = "hth_" + secrets.token_urlsafe(24)
        self.redis_password = secrets.token_hex(16)
        self.network = ""
        self.pods: dict[str, str] = {}  # name -> pod id
        self.secrets: list[str] = []
        self.ips: dict[str, str] = {}
        self.docs: list[dict[str, Any]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="hearth-kp-"))
        self.sock_dir = self.dir / "sock"
        # the node's slot pool: a tmpfs directory on the host, as /run/hearth/shm on a node
        self.shm_dir = Path(tempfile.mkdtemp(prefix="hkp-", dir="/dev/shm"))
        self.sock_dir.mkdir(mode=0o700)
        self.shm_dir.chmod(0o700)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> KubePlay:
        self.network = session_network(LABEL, self.session, self.prefix, "pod", "network")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        ids = list(self.pods.values())
        if ids:
            podman("pod", "rm", "-f", "-t", "2", *ids, check=False, timeout=180)
        self.pods.clear()
        for s in self.secrets:
            podman("secret", "rm", s, check=False)
        self.secrets.clear()
        if self.network:
            podman("network", "rm", "-f", self.network, check=False)
            self.network = ""
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.shm_dir, ignore_errors=True)

    # -- kube play ---------------------------------------------------------------------------
    def play(self, *docs: dict[str, Any], timeout: float = 180, ip: str = "") -> list[str]:
        """`podman kube play --network <ours>` of these documents; the ids of the pods made.
        Pods carry the session label, so a killed session's pods are found and removed.
        `ip`: the pod's address on the network (one pod)."""
        for d in docs:
            if d["kind"] == "Pod":
                d["metadata"].setdefault("labels", {})[LABEL] = self.session
                for c in d["spec"]["containers"]:
                    # podman 4.3 publishes every containerPort on the host's 0.0.0.0 (Kubernetes
                    # only documents it): keep the pods on the private network
                    if not any("hostPort" in p for p in c.get("ports") or []):
                        c.pop("ports", None)
            if d["kind"] == "Secret":
                self.secrets.append(d["metadata"]["name"])
        f = self.dir / f"play-{uuid.uuid4().hex[:6]}.yaml"
        f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        ip_args = ["--ip", ip] if ip else []
        out = podman("kube", "play", "--network", self.network, *ip_args, str(f), timeout=timeout)
        made = []
        for d in docs:
            if d["kind"] == "Pod":
                name = d["metadata"]["name"]
                self.pods[name] = podman("pod", "inspect", "--format", "{{.ID}}", name)
                made.append(self.pods[name])
        assert len(made) == out.count("Pod:") or not made, out
        return made

    def remove(self, name: str) -> None:
        """`podman pod rm -f` of one pod (by id)."""
        podman("pod", "rm", "-f", "-t", "2", self.pods.pop(name), check=False, timeout=120)

    def ip(self, name: str) -> str:
        infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", self.pods[name])
        fmt = f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}'
        return podman("inspect", "--format", fmt, infra)

    def container(self, pod: str, container: str) -> str:
        return f"{pod}-{container}"  # how kube play names a pod's containers

    def state(self, pod: str, container: str) -> str:
        return podman("inspect", "--format", "{{.State.Status}}", self.container(pod, container))

    def exit_code(self, pod: str, container: str) -> int:
        fmt = "{{.State.ExitCode}}"
        return int(podman("inspect", "--format", fmt, self.container(pod, container)))

    def logs(self, pod: str, container: str) -> str:
        r = subprocess.run(
            # the whole log, not --tail: a line written in pieces (partial entries) was seen cut
            # to its last pieces by --tail; the output is bounded below
            ["podman", "logs", self.container(pod, container)],
            env={**os.environ, **_env()},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return (r.stdout + r.stderr)[-6000:]

    def diagnostics(self) -> str:
        """Every pod's containers, each with its state and last log lines: what a failed test's
        report carries (the pods are removed after it)."""
        out = []
        for pod, pid in list(self.pods.items()):
            fmt = "{{range .Containers}}{{.Name}} {{end}}"
            try:
                names = podman("pod", "inspect", "--format", fmt, pid, check=False).split()
            except Exception as e:  # the report must not fail on its own diagnostics
                out.append(f"--- pod {pod}: {e!r}")
                continue
            for name in names:
                if not name.startswith(f"{pod}-") or name.endswith("-infra"):
                    continue
                c = name[len(pod) + 1 :]
                try:
                    tail = "\n".join(self.logs(pod, c).splitlines()[-30:])
                    out.append(f"--- {name} ({self.state(pod, c)}) ---\n{tail}")
                except Exception as e:
                    out.append(f"--- {name}: {e!r}")
        return "\n".join(out)

    def probe(self, pod: str, container: str, command: list[str]) -> bool:
        """Run an exec probe's command in the container, as the kubelet does."""
        r = subprocess.run(
            ["podman", "exec", self.container(pod, container), *command],
            env={**os.environ, **_env()},
            capture_output=True,
            timeout=30,
        )
        return r.returncode == 0

    # -- the chart ---------------------------------------------------------------------------
    def chart_values(self) -> dict[str, Any]:
        repo, tag = self.image.rsplit(":", 1)
        return {
            "image.repository": repo,
            "image.tag": tag,
            "adminToken.value": self.token,
            "redis.password": self.redis_password,
            "redis.image.repository": repo,  # the project image has redis-server too
            "redis.image.tag": tag,
            "redis.persistence.enabled": False,
            "nodeAgent.dataplane": self.dataplane,
            "nodeAgent.socketDir": str(self.sock_dir),
            "nodeAgent.shm.hostPath": str(self.shm_dir),
        }

    def render(self) -> list[dict[str, Any]]:
        self.docs = helm_template(self.prefix, self.chart_values())
        return self.docs

    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@{self.ips['redis']}:6379/0"

    def start_platform(self, timeout: float = 180) -> None:
        """Redis, the node agent and the gateway from the rendered chart, in that order (each
        one's address goes into the next one's environment, where a cluster has Service DNS)."""
        docs = self.docs or self.render()
        fields = {"spec.nodeName": NODE, "metadata.namespace": "default"}
        redis = as_pod(find(docs, "StatefulSet", "-redis"), f"{self.prefix}-redis")
        resolve_env(redis, docs, fields)
        self.play(redis)
        self.ips["redis"] = self.ip(redis["metadata"]["name"])
        self.wait(lambda: self._redis_ping(), "redis", timeout)

        agent = as_pod(find(docs, "DaemonSet", "-node-agent"), f"{self.prefix}-{NODE}")
        pod_ip = self.free_ip()
        resolve_env(agent, docs, {**fields, "status.podIP": pod_ip})
        set_env(agent, {"HEARTH_REDIS_URL": self.redis_url()})
        self.play(agent, ip=pod_ip)
        self.ips["agent"] = self.ip(agent["metadata"]["name"])
        assert self.ips["agent"] == pod_ip, (self.ips["agent"], pod_ip)
        self.wait(lambda: self.healthz(self.agent_url), "node agent /healthz", timeout)

        gw = as_pod(find(docs, "Deployment", "-gateway"), f"{self.prefix}-gateway")
        resolve_env(gw, docs, fields)
        set_env(gw, {"HEARTH_REDIS_URL": self.redis_url(), "HEARTH_NODE_AGENTS": self.agent_url})
        self.play(gw)
        self.ips["gateway"] = self.ip(gw["metadata"]["name"])
        self.wait(lambda: self.healthz(self.front_url), "gateway /healthz", timeout)

    def free_ip(self) -> str:
        """An address of the network that podman's allocator (which counts up from .2) does not
        reach in one session: .200 of its IPv4 subnet."""
        subnet = podman(
            "network", "inspect", "--format", "{{range .Subnets}}{{.Subnet}} {{end}}", self.network
        ).split()[0]
        net = ipaddress.ip_network(subnet)
        return str(net.network_address + 200)

    def _redis_ping(self) -> bool:
        import redis

        return redis.Redis(
            host=self.ips["redis"], password=self.redis_password, socket_timeout=5
        ).ping()

    @property
    def agent_url(self) -> str:
        return f"http://{self.ips['agent']}:{AGENT_PORT}"

    @property
    def front_url(self) -> str:
        return f"http://{self.ips['gateway']}:{GATEWAY_PORT}"

    @property
    def front(self) -> Client:
        return Client(self.front_url, token=self.token, timeout=120)

    @property
    def agent(self) -> Client:
        return Client(self.agent_url, token=self.token, timeout=60)

    def healthz(self, url: str) -> bool:
        try:
            return bool(Client(url, timeout=5).request("GET", "/healthz").json())
        except ClientError:
            return False

    # -- the controller's pods ---------------------------------------------------------------
    def pod_settings(self) -> PodSettings:
        return PodSettings(
            image=self.image, socket_dir=str(self.sock_dir), shm_dir=str(self.shm_dir)
        )

    def instance_pod(self, spec: dict[str, Any], instance_id: str) -> dict[str, Any]:
        """The instance pod the controller creates (controller/k8s/pods.py), unchanged."""
        return pod_manifest(
            FunctionSpec.model_validate(spec), NODE, instance_id, None, self.pod_settings()
        )

    def pool_pod(self, instance_id: str, runtime: str = "python3.11") -> dict[str, Any]:
        return pool_pod_manifest(runtime, NODE, instance_id, self.pod_settings())

    # -- waiting -----------------------------------------------------------------------------
    def wait(self, cond, what: str, timeout: float = 120, every: float = 0.1):
        return poll(cond, what, timeout, every)


def _env() -> dict[str, str]:
    c = ROOT / ".containers"
    return {
        "CONTAINERS_CONF": str(c / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(c / "storage.conf"),
    }
