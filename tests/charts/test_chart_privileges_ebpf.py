"""The node agent's capability set, taken from the rendered DaemonSet, is enough to load the
real SK_MSG program (proxies/sk_msg.c via hearth.proxies.ebpf) and redirect a descriptor on
this kernel, and removing any one of them breaks it: least privilege that works, measured.

The container is imitated with `setpriv --bounding-set`: a root process whose capabilities
are limited to the rendered list (what Kubernetes gives uid 0 with drop: ALL + add). Not
imitated: the runtime's seccomp profile, AppArmor/SELinux, the hostPath mounts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from chart_helpers import ROOT, template

PROBE = textwrap.dedent(
    """
    import json, socket, struct, sys
    sys.path.append("/usr/lib/python3/dist-packages")
    out = {"stage": "load", "ok": False}
    try:
        from hearth.proxies.ebpf import SockmapRouter
        r = SockmapRouter(max_endpoints=64)
        out["stage"] = "insert"
        def pair():
            l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
            a = socket.create_connection(l.getsockname()); b, _ = l.accept(); l.close()
            return a, b
        (a1, b1), (a2, b2) = pair(), pair()
        r.insert(1, a1.fileno()); r.insert(2, a2.fileno())
        out["stage"] = "redirect"
        msg = struct.pack("<IIQQ", 2, 1, 0, 0).ljust(64, b"\\0")
        a1.sendall(msg)          # without the redirect this would reach b1, not a2
        a2.settimeout(5)
        out["ok"] = a2.recv(64) == msg and r.counters().get(2, {}).get("msgs", 0) >= 1
        r.close()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(out))
    """
)


def _missing_as_root() -> str | None:
    """What this test needs besides root; as root each is installed by scripts/install.sh (or
    is part of Debian), so a missing one is a failure, not a skip."""
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) missing"
    try:
        from hearth.proxies.ebpf import ebpf_unavailable_reason
    except ImportError:
        return "hearth.proxies.ebpf not present"
    return ebpf_unavailable_reason()


pytestmark = [
    pytest.mark.ebpf,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root (to drop to the rendered capability set)"
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _ebpf_ready_as_root() -> None:
    why = _missing_as_root()
    if why:
        pytest.fail(f"running as root but eBPF cannot be tested: {why} (run scripts/install.sh)")


def rendered_caps(*args: str) -> list[str]:
    (ds,) = [d for d in template("hearth", *args) if d["kind"] == "DaemonSet"]
    return ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"].get(
        "add", []
    )


def run_with_caps(caps: list[str]) -> dict:
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    p = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={bounding}",
            "--inh-caps=-all",
            "--",
            sys.executable,
            "-c",
            PROBE,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    lines = p.stdout.strip().splitlines()
    assert lines, p.stderr[-2000:]
    return json.loads(lines[-1])


def test_rendered_capabilities_load_and_redirect():
    caps = rendered_caps()
    assert sorted(caps) == ["BPF", "NET_ADMIN"]
    res = run_with_caps(caps)
    assert res["ok"], res


@pytest.mark.parametrize("missing", ["BPF", "NET_ADMIN"])
def test_each_rendered_capability_is_necessary(missing):
    caps = [c for c in rendered_caps() if c != missing]
    res = run_with_caps(caps)
    assert not res["ok"] and res["stage"] == "load", res


def test_legacy_kernel_set_also_works_here():
    caps = rendered_caps("--set", "nodeAgent.legacyKernel=true")
    assert sorted(caps) == ["NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]
    assert run_with_caps(caps)["ok"]


def test_unix_fallback_has_no_capabilities_and_ebpf_cannot_load_there():
    assert rendered_caps("--set", "nodeAgent.dataplane=unix") == []
    res = run_with_caps([])
    assert not res["ok"] and res["stage"] == "load"
