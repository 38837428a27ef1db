"""`python -m hearth.controller.k8s --namespace NS`: run the Kubernetes controller until SIGTERM.

Uses the in-cluster service account when present, else the kubeconfig. One replica per
namespace: there is no leader election (the chart runs one replica with a Recreate strategy,
so an upgrade never runs two at once)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from hearth.controller.decide import DecisionCore
from hearth.controller.k8s.controller import DEFAULT_IMAGE, KubernetesController
from hearth.controller.k8s.pods import PodSettings
from hearth.controller.k8s.registry_sync import LoadReader, RegistrySync
from hearth.controller.k8s.serve import serve
from hearth.controller.keepalive import POLICIES, PolicySet
from kubernetes import client, config


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    pools = _pools(ap, a.pool)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if (err := _load_config()) is not None:
        print(
            f"error: no Kubernetes configuration (in-cluster or kubeconfig): {err}", file=sys.stderr
        )
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctl = _controller(a, pools, os.environ.get("HEARTH_REDIS_URL"))
    srv = None
    if a.http_port:
        import time

        srv = serve(ctl, a.http_host, a.http_port, stale_after_s=3 * a.resync + 30, clock=time.time)
    ctl.run(stop)
    if srv is not None:
        srv.shutdown()
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hearth.controller.k8s", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    ap.add_argument("--image", default=os.environ.get("HEARTH_FUNCTION_IMAGE", DEFAULT_IMAGE))
    ap.add_argument(
        "--keepalive-policy",
        default="fixed",
        choices=sorted(POLICIES),
        help="global default (a Function's spec may choose its own)",
    )
    ap.add_argument("--resync", type=float, default=30.0, help="seconds between full reconciles")
    ap.add_argument(
        "--node-socket-dir",
        default=os.environ.get("HEARTH_NODE_SOCKET_DIR", "/run/hearth"),
        help="host directory of the node agents' proxy socket (hostPath in instance pods)",
    )
    ap.add_argument(
        "--shm-dir",
        default=os.environ.get("HEARTH_SHM_DIR", "/run/hearth/shm"),
        help="host directory of the nodes' slot pools (hostPath, mounted at /dev/shm)",
    )
    ap.add_argument(
        "--instance-uid",
        type=int,
        default=0,
        help="uid/gid of instance pods: the node agent's (its pool and socket are owner-only)",
    )
    ap.add_argument(
        "--pending-timeout", type=float, default=120.0, help="re-place a pod Pending this long"
    )
    ap.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="RUNTIME=N",
        help="warm-pool pods per node for a runtime (repeatable), e.g. python3.11=1",
    )
    ap.add_argument("--http-host", default=os.environ.get("HEARTH_CONTROLLER_HOST", "127.0.0.1"))
    ap.add_argument("--http-port", type=int, default=8081, help="/metrics and /healthz (0: off)")
    return ap


def _pools(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    """Warm-pool pods per node by runtime, from the repeated ``--pool RUNTIME=N``."""
    pools = {}
    for item in items:
        runtime, _, n = item.partition("=")
        if not n.isdigit():
            ap.error(f"--pool {item!r}: expected RUNTIME=N")
        pools[runtime] = int(n)
    return pools


def _load_config() -> Exception | None:
    """The in-cluster service account when present, else the kubeconfig; why neither loads."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError) as e:
            return e
    return None


def _controller(
    a: argparse.Namespace, pools: dict[str, int], redis_url: str | None
) -> KubernetesController:
    return KubernetesController(
        client.ApiClient(),
        a.namespace,
        core=DecisionCore(policies=PolicySet(a.keepalive_policy)),
        resync_s=a.resync,
        settings=PodSettings(
            image=a.image,
            socket_dir=a.node_socket_dir,
            shm_dir=a.shm_dir,
            run_as_user=a.instance_uid,
            run_as_group=a.instance_uid,
        ),
        pending_timeout_s=a.pending_timeout,
        pool_targets=pools,
        registry=RegistrySync(redis_url, a.namespace) if redis_url else None,
        loads=LoadReader(redis_url) if redis_url else None,
    )


if __name__ == "__main__":
    sys.exit(main())
