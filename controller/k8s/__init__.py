"""Kubernetes backend: reconciles `Function` custom resources into pods with the official client."""

from hearth.controller.k8s.backend import KubernetesBackend
from hearth.controller.k8s.controller import (
    KubernetesController,
    parse_cpu,
    parse_memory_mb,
)

__all__ = ["KubernetesBackend", "KubernetesController", "parse_cpu", "parse_memory_mb"]
