"""`python -m hearth.controller.k8s --namespace NS`: run the Kubernetes controller until SIGTERM.

Uses the in-cluster service account when present, else the kubeconfig. One replica per
namespace: there is no leader election."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from hearth.controller.decide import DecisionCore
from hearth.controller.k8s.controller import DEFAULT_IMAGE, KubernetesController
from hearth.controller.keepalive import POLICIES, PolicySet
from kubernetes import client, config


def main(argv: list[str] | None = None) -> int:
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
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError) as e:
            print(
                f"error: no Kubernetes configuration (in-cluster or kubeconfig): {e}",
                file=sys.stderr,
            )
            return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctl = KubernetesController(
        client.ApiClient(),
        a.namespace,
        core=DecisionCore(policies=PolicySet(a.keepalive_policy)),
        image=a.image,
        resync_s=a.resync,
    )
    ctl.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
