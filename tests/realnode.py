"""Real `hearth up` nodes for tests in any folder (tests/ is on sys.path through its conftest),
with the one check every such fixture needs: as root, a node asked for `auto` (or `ebpf`) must
really run eBPF. Falling back to AF_UNIX there means the eBPF setup broke, and the suite would
otherwise stay green on the fallback; the failure names the proxy daemon's own reason."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hearth.client import Client
from hearth.localnode import LocalNode, start_node

T = TypeVar("T")


def proxy_reason(state: Path) -> str:
    """The mode line the proxy daemon logged ("mode=unix (auto: no bcc ...)"), or ''."""
    for log in sorted((Path(state) / "run").glob("proxy-*.log")):
        m = re.findall(r"mode=\S+ \((.*)\)", log.read_text(errors="replace"))
        if m:
            return m[-1]
    return ""


def check_dataplane(asked: str, got: str, state: Path) -> None:
    """Fail (never skip) when a root run asked for eBPF, directly or through `auto`, and got
    something else. Non-root runs may fall back: eBPF needs root here."""
    if asked == "unix":
        assert got == "unix", f"asked for unix, running {got}"
        return
    if os.geteuid() == 0 and got != "ebpf":
        pytest.fail(
            f"data plane asked for {asked!r} as root but running {got!r}: "
            f"{proxy_reason(state) or 'no reason logged'} (eBPF setup is broken: run scripts/install.sh)"
        )


def start_checked(state: Path | str, *, dataplane: str = "auto", **kw: Any) -> LocalNode:
    """`start_node`, then the data-plane check above (the node is stopped if it fails)."""
    node = start_node(state, dataplane=dataplane, **kw)
    try:
        check_dataplane(dataplane, node.dataplane, node.state)
    except BaseException:
        node.stop()
        raise
    return node


def wait_for(
    cond: Callable[[], T], timeout: float = 30.0, what: str = "condition", every: float = 0.05
) -> T:
    """Poll `cond` until it returns something truthy; fail naming `what` after `timeout`."""
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def alive(pid: int) -> bool:
    """The process `pid` still exists (signal 0 delivers nothing, it only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def live_instances(c: Client, name: str) -> list[dict]:
    st = c.status()["functions"].get(name) or {}
    return [i for i in st.get("instances", []) if i["state"] not in ("stopping", "dead")]


def metric(c: Client, name: str, **labels: str) -> float:
    """One sample of the node's /metrics (Prometheus text), summed over unnamed labels; 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    text = c.request("GET", "/metrics", admin=True).body.decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
