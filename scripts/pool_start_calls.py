"""Python and C calls a warm-pool instance makes from its spec's arrival to its handler's first
line, counted inside real pool instances of a real node (issue #19: a pool start is serial CPU
work on one vCPU, so fewer cold calls is the robust measure of a cut; timing confirms it).

A node of a tree (``--platform``, default this one) runs with a warm pool, forking its pool
instances from the runtime's zygote as the cold-start benchmark's node does. The node's
``PYTHONPATH`` starts with a directory of this script's own holding a ``sitecustomize``: in a
zygote process only (``-m hearth.runtime.zygote``) it wraps ``Instance.serve`` so that a pool
instance (started without a spec) runs its serve loop under ``sys.setprofile``. The profiler
stays idle until the serve loop's read of the spec returns (the ``recv`` system call's C
return, the instance's wake-up), counts every Python call and C call from there, and stops at
the call of the handler (its first line), then writes its counts to this script's output
directory. Nothing of it ships, and nothing a benchmark enables: the node runs the tree's code
unchanged (the wrapper's own frame is outside the window counted).

Each call is put in one bucket by the innermost frame that is not the standard library's:
``runtime`` (hearth's runtime, data plane, sdk: the instance's own steps, with the standard
library they call), ``import`` (importlib's frames, ``<frozen importlib._bootstrap*>``,
``importlib/``, ``zipimport``: the import system finding and loading the function's modules)
and ``function`` (the function's module bodies and what they call: its code directory,
``hearth.functions``, site-packages). "Top callers" are the innermost runtime function on the
stack for each call; "top callees" are the functions called.

Four function shapes, so a cut is not tuned to one: the cold-start benchmark's probe
(``cb_probe.py`` importing ``hearth.functions.examples.handlers``, its spec as the benchmark
deploys it), a user-style function in its own code directory (``user``: a top-level module
``app`` importing a package of its own, ``shop``, whose submodule imports numpy) and the same
code with the handler in the package (``pkg``: ``shop.api:handle``), and a module importing
twelve small modules of a package of its own (``wide``: where a cost per module shows).

With ``--cpu`` no profiler runs: the instance's thread CPU time and minor page faults from its
handling of the spec (descriptor read) to the handler's call are reported instead (the
handler wrapped once loaded). ``--against DIR`` starts a second node on another tree's
``platform/`` beside this one and alternates starts between them, as the cold-start benchmark
pairs its warm-pool starts, so both see the same machine load.

    .venv/bin/python scripts/pool_start_calls.py [--samples 3] [--cpu] [--against DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cold_start import PROBE, cold_records, probe_spec, timed_call, wait_pool  # noqa: E402
from hearth.localnode import start_node  # noqa: E402

# The profiler, installed in zygote processes only; OUT is filled in when written.
SITECUSTOMIZE = r'''
"""Counts a pool instance's calls from its spec's arrival to its handler's first line
(scripts/pool_start_calls.py). Active in zygote processes only."""
import sys

OUT = __OUT__
MODE = __MODE__
BUCKETS = ("runtime", "import", "function")


def _kind(filename, code_dirs):
    if filename.startswith("<frozen importlib") or "/importlib/" in filename:
        return "import"
    if filename.endswith("/zipimport.py") or filename == "<frozen zipimport>":
        return "import"
    if "/_distutils_hack/" in filename or "/__editable__" in filename:
        return "import"  # import hooks on sys.meta_path (setuptools', an editable install's)
    if "/hearth/functions/" in filename or "site-packages" in filename:
        return "function"
    if any(filename.startswith(d) for d in code_dirs):
        return "function"
    if "/hearth/" in filename:
        return "runtime"
    return None  # the standard library: whoever called it


class _Counter:
    def __init__(self, inst):
        self.inst = inst
        self.armed = True
        self.rows = []  # (py|c, callee, bucket, runtime caller)
        self.code_dirs = ()

    def where(self, frame):
        """(bucket, innermost runtime function) of a frame and its callers."""
        bucket = caller = None
        f = frame
        while f is not None:
            k = _kind(f.f_code.co_filename, self.code_dirs)
            if k is not None:
                if bucket is None:
                    bucket = k
                if k == "runtime":
                    caller = f.f_code.co_qualname
                    break
            f = f.f_back
        return bucket or "runtime", caller or "?"

    def prof(self, frame, event, arg):
        if self.armed:
            if (
                event == "c_return"
                and getattr(arg, "__name__", "") in ("recv", "recv_into")
                and frame.f_code.co_name in ("recv_frame", "_recv_frame_slow")
            ):
                self.armed = False
            return
        if event == "call":
            h = self.inst.handler
            h = getattr(h, "__func__", h)
            if h is not None and frame.f_code is getattr(h, "__code__", None):
                sys.setprofile(None)
                self.dump()
                return
            spec = self.inst.spec
            if spec is not None and spec.code_path and not self.code_dirs:
                self.code_dirs = (spec.code_path.rstrip("/") + "/",)
            code = frame.f_code
            name = f"{code.co_qualname} ({code.co_filename.rsplit('/', 1)[-1]})"
            self.rows.append(("py", name, *self.where(frame)))
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            mod = getattr(arg, "__module__", None) or type(owner).__name__
            self.rows.append(("c", f"{mod}.{arg.__qualname__}", *self.where(frame)))

    def dump(self):
        import collections
        import json
        import os

        counts = {b: {"py": 0, "c": 0} for b in BUCKETS}
        callees = {b: collections.Counter() for b in BUCKETS}
        callers = {b: collections.Counter() for b in BUCKETS}
        for kind, name, bucket, caller in self.rows:
            counts[bucket][kind] += 1
            callees[bucket][f"{kind} {name}"] += 1
            callers[bucket][caller] += 1
        out = {
            "function": self.inst.spec.name,
            "pid": os.getpid(),
            "counts": counts,
            "total": {k: sum(c[k] for c in counts.values()) for k in ("py", "c")},
            "callees": {b: callees[b].most_common() for b in BUCKETS},
            "callers": {b: callers[b].most_common(20) for b in BUCKETS},
            # the runtime's own calls in order, and the interpreter's import set-up
            "runtime_seq": [f"{k} {n} <- {c}" for k, n, b, c in self.rows if b == "runtime"],
            "sys_path": list(sys.path),
            "meta_path": [repr(f) for f in sys.meta_path],
        }
        _write(out)


def _timed(inst):
    """--cpu: this thread's CPU time and minor page faults from the spec's handling (its
    descriptor read and decoded) to the handler's call, no profiler: the handler is wrapped
    once specialise has loaded it (one call more, outside the window)."""
    import resource
    import time

    import hearth.runtime.instance as ri

    load_entry = ri.load_entry
    specialise = inst.specialise
    handle_specialise = inst.handle_specialise
    mark = {}

    def usage():
        return time.thread_time_ns(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

    def timed_handle_specialise(d):
        mark["t0"], mark["f0"] = usage()
        return handle_specialise(d)

    def timed_load_entry(entry, code_path=None):
        mark["t1"], mark["f1"] = usage()
        try:
            return load_entry(entry, code_path)
        finally:
            mark["t2"], mark["f2"] = usage()

    def timed_specialise(spec):
        ri.load_entry = timed_load_entry
        try:
            specialise(spec)
        finally:
            ri.load_entry = load_entry
        handler = inst.handler

        def first_line(*a, **k):
            t3, f3 = usage()
            inst.handler = handler
            _write(
                {
                    "function": spec.name,
                    "cpu_us": (t3 - mark["t0"]) / 1e3,
                    "minflt": f3 - mark["f0"],
                    # the handler's import (load_entry) and the rest, the runtime's own steps
                    "import_cpu_us": (mark["t2"] - mark["t1"]) / 1e3,
                    "import_minflt": mark["f2"] - mark["f1"],
                    # the runtime's steps: to the import, from it to the ready report, the
                    # report (its send included), from the report to the handler's call
                    "steps_cpu_us": [
                        (mark["t1"] - mark["t0"]) / 1e3,
                        (mark["t4"] - mark["t2"]) / 1e3,
                        (mark["t5"] - mark["t4"]) / 1e3,
                        (t3 - mark["t5"]) / 1e3,
                    ],
                    "steps_minflt": [
                        mark["f1"] - mark["f0"],
                        mark["f4"] - mark["f2"],
                        mark["f5"] - mark["f4"],
                        f3 - mark["f5"],
                    ],
                }
            )
            return handler(*a, **k)

        inst.handler = first_line

    report = inst.report

    def timed_report(*a, **k):
        mark["t4"], mark["f4"] = usage()
        try:
            return report(*a, **k)
        finally:
            mark["t5"], mark["f5"] = usage()

    inst.handle_specialise = timed_handle_specialise
    inst.specialise = timed_specialise
    inst.report = timed_report


def _write(out):
    import json
    import os

    tmp = os.path.join(OUT, f".{out['function']}.json")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.rename(tmp, os.path.join(OUT, f"{out['function']}.json"))


def _install():
    import hearth.runtime.instance as ri

    serve = ri.Instance.serve

    def counted_serve(self):
        if self.spec is None and not self.boot.get("spec"):  # a pool instance
            if MODE == "cpu":
                _timed(self)
            else:
                sys.setprofile(_Counter(self).prof)
        return serve(self)

    ri.Instance.serve = counted_serve


if "hearth.runtime.zygote" in getattr(sys, "orig_argv", ()):
    _install()
'''

USER_APP = """
import time

from shop import pricing


def handle(event):
    t = time.time()  # the handler's first line
    pricing.total(event.bytes())
    return {"t": t}
"""
USER_PKG = {
    "shop/__init__.py": '"""A package of the function\'s own."""\n\nfrom shop import pricing\n',
    "shop/pricing.py": (
        "import numpy as np\n\nfrom shop.rules import DISCOUNT\n\n\n"
        "def total(body: bytes) -> float:\n"
        "    return float(np.frombuffer(body, dtype=np.uint8).sum()) * (1 - DISCOUNT)\n"
    ),
    "shop/rules.py": "DISCOUNT = 0.1\n",
    "shop/api.py": (
        "import time\n\nfrom shop import pricing\n\n\n"
        "def handle(event):\n"
        "    t = time.time()  # the handler's first line\n"
        "    pricing.total(event.bytes())\n"
        '    return {"t": t}\n'
    ),
}


# ``wide``: a handler whose module imports a package of its own of WIDE_MODULES modules, as a
# service's code does (each module a few definitions): where a cost per module shows
WIDE_MODULES = 12
WIDE_APP = (
    "import time\n\n"
    + "".join(f"from lib import m{i}\n" for i in range(WIDE_MODULES))
    + "\n\ndef handle(event):\n"
    "    t = time.time()  # the handler's first line\n"
    "    m0.f(1)\n"
    '    return {"t": t}\n'
)
WIDE_MODULE = (
    '"""Module {i} of the function\'s own package."""\n\n'
    "LIMIT = {i}\n\n\n"
    "class Item{i}:\n    def __init__(self, name, qty=0):\n"
    "        self.name, self.qty = name, qty\n\n\n"
    "def f(x):\n    return x + LIMIT\n\n\n"
    "def g(items):\n    return sum(i.qty for i in items)\n"
)


def write_code(base: Path, mode: str) -> tuple[Path, Path, Path]:
    """(the sitecustomize's directory, the probe's code directory, the user function's: its
    ``app`` and ``shop`` for the user and pkg shapes, ``wide_app`` and ``lib`` for wide)."""
    out, site, probe, user = base / "out", base / "site", base / "probe", base / "user"
    for d in (out, site, probe, user / "shop", user / "lib"):
        d.mkdir(parents=True)
    text = SITECUSTOMIZE.replace("__OUT__", repr(str(out))).replace("__MODE__", repr(mode))
    (site / "sitecustomize.py").write_text(text)
    (probe / "cb_probe.py").write_text(PROBE)
    (user / "app.py").write_text(USER_APP)
    for rel, text in USER_PKG.items():
        (user / rel).write_text(text)
    (user / "wide_app.py").write_text(WIDE_APP)
    (user / "lib" / "__init__.py").write_text("")
    for i in range(WIDE_MODULES):
        (user / "lib" / f"m{i}.py").write_text(WIDE_MODULE.format(i=i))
    return site, probe, user


def spec_for(shape: str, name: str, k: int, code: Path) -> tuple[dict, bytes, str]:
    if shape == "probe":
        return probe_spec(name, k, code)
    handler = {"user": "app:handle", "pkg": "shop.api:handle", "wide": "wide_app:handle"}[shape]
    return {"name": name, "handler": handler, "code_path": str(code)}, b"abc", "text/plain"


SHAPES = ("probe", "user", "pkg", "wide")


def one_start(node, out: Path, name: str, shape: str, code: Path, k: int) -> dict | None:
    """Deploy `name` (of `shape`), start it from the node's pool with one request, and return
    what its instance wrote (None if the start did not come from the pool); then delete it, so
    its instance stops and the node keeps room for the next pool instance."""
    spec, body, ctype = spec_for(shape, name, k, code)
    node.client.deploy(spec)
    wait_pool(node, 1)
    timed_call(node, name, body, ctype)
    rec = cold_records(node, [name]).get(name, {})
    f = out / f"{name}.json"
    t0 = time.monotonic()
    while not f.exists() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    node.client.delete(name)
    if not rec.get("from_pool") or not f.exists():
        print(f"{name}: not a pool start, left out", file=sys.stderr)
        return None
    return json.loads(f.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=3, help="pool starts per function shape")
    ap.add_argument("--platform", default=str(ROOT / "platform"), help="the tree's platform/")
    ap.add_argument(
        "--against",
        help="another tree's platform/ (e.g. a checkout of main): its node runs beside this "
        "one's, one start on each in turn (who goes first alternating), both reported",
    )
    ap.add_argument("--json", help="write every sample's figures here")
    ap.add_argument("--top", type=int, default=12, help="callees and callers shown per bucket")
    ap.add_argument("--seq", action="store_true", help="also list the runtime's calls in order")
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="instead of counting calls (no profiler): the instance's CPU time and minor faults "
        "from the spec's handling to the handler's call",
    )
    a = ap.parse_args()
    trees = {"this": a.platform, **({"against": a.against} if a.against else {})}
    base = Path(tempfile.mkdtemp(prefix="hearth-poolcalls-"))
    results = {t: {s: [] for s in SHAPES} for t in trees}
    try:
        site, probe, user = write_code(base, "cpu" if a.cpu else "calls")
        codes = {"probe": probe, "user": user, "pkg": user, "wide": user}
        with contextlib.ExitStack() as stack:
            nodes = {
                t: stack.enter_context(
                    start_node(
                        base / f"node-{t}",
                        env={"HEARTH_RUNNER": "zygote", "PYTHONPATH": f"{site}:{plat}"},
                        warm_pool=1,
                    )
                )
                for t, plat in trees.items()
            }
            order = list(trees)
            for k in range(a.samples):
                for shape in SHAPES:
                    for t in order if k % 2 == 0 else order[::-1]:
                        for n in nodes.values():  # no node refilling its pool meanwhile
                            wait_pool(n, 1)
                        name = f"calls-{t}-{shape}-{k}"
                        got = one_start(nodes[t], base / "out", name, shape, codes[shape], k)
                        if got is not None:
                            results[t][shape].append(got)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for t in trees:
        print(f"#### {t}: {trees[t]}")
        show(results[t], a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def show(results: dict[str, list[dict]], a: argparse.Namespace) -> None:
    for shape, rows in results.items():
        if not rows:
            continue
        if a.cpu:
            cpu = sorted(r["cpu_us"] for r in rows)
            flt = statistics.median(r["minflt"] for r in rows)
            imp = statistics.median(r["import_cpu_us"] for r in rows)
            iflt = statistics.median(r["import_minflt"] for r in rows)
            print(
                f"== {shape}: {len(rows)} pool starts: instance CPU us p50 "
                f"{statistics.median(cpu):.0f} (min {cpu[0]:.0f}, max {cpu[-1]:.0f}), "
                f"minor faults p50 {flt:.0f}; of which the handler's import: CPU us p50 "
                f"{imp:.0f}, minor faults {iflt:.0f}"
            )
            steps = [statistics.median(r["steps_cpu_us"][i] for r in rows) for i in range(4)]
            flts = [statistics.median(r["steps_minflt"][i] for r in rows) for i in range(4)]
            print(
                "   runtime steps, CPU us p50 (minor faults): to the import "
                f"{steps[0]:.0f} ({flts[0]:.0f}), import to report {steps[1]:.0f} ({flts[1]:.0f}), "
                f"report {steps[2]:.0f} ({flts[2]:.0f}), report to handler {steps[3]:.0f} "
                f"({flts[3]:.0f})"
            )
            continue
        print(f"== {shape}: {len(rows)} pool starts (median; py = Python calls, c = C calls)")
        for b in ("runtime", "import", "function"):
            py = statistics.median(r["counts"][b]["py"] for r in rows)
            c = statistics.median(r["counts"][b]["c"] for r in rows)
            print(f"  {b:<9} py {py:6.0f}  c {c:6.0f}")
        py = statistics.median(r["total"]["py"] for r in rows)
        c = statistics.median(r["total"]["c"] for r in rows)
        print(f"  {'total':<9} py {py:6.0f}  c {c:6.0f}")
        last = rows[-1]
        for b in ("runtime", "import"):
            print(f"  {b}: top callers  " + ", ".join(f"{n} {c}" for n, c in last["callers"][b]))
            print(f"  {b}: top callees")
            for n, c in last["callees"][b][: a.top]:
                print(f"    {c:5d}  {n}")
        if a.seq:
            print(f"  sys.path {last['sys_path']}")
            print(f"  meta_path {last['meta_path']}")
            print("  runtime calls in order:")
            for row in last["runtime_seq"]:
                print(f"    {row}")


if __name__ == "__main__":
    main()
