"""Fork simulation (8 Dec 2026, idle7-experiments.log): a pool-like child waits `idle` s (with a
warm-up import every 0.2 s, or its shared pages copied ahead: idle7-precow.py), then imports the
cold-start benchmark's probe. Run as it was: from /tmp/kw holding code/cb_probe.py (the
benchmark's PROBE, hello only, compiled) and precow.py; `python sim.py ROUNDS` with the tree's venv."""
import os, sys, time, statistics, importlib
sys.path.insert(0, "/work/wt/integ/platform")
import numpy, asyncio
import hearth.runtime.instance, hearth.sdk
from hearth.runtime import loading
loading.install()
import gc; gc.collect(); gc.freeze()
N = 0
def keepwarm():
    global N
    N += 1
    name = f"kw_dummy{N}"
    with open(f"/tmp/kw/dummy/{name}.py", "w") as f:
        f.write("import time\nfrom hearth import sdk\n\ndef h(e):\n    return 1\n")
    sys.path.insert(0, "/tmp/kw/dummy")
    try:
        loading.load_module(name, "/tmp/kw/dummy")
    finally:
        sys.path.remove("/tmp/kw/dummy"); sys.modules.pop(name, None)
        os.unlink(f"/tmp/kw/dummy/{name}.py")
def child(idle, tick, w):
    keepwarm(); keepwarm()
    time.sleep(0.05)
    t_end = time.monotonic() + idle
    if tick == -1:
        sys.path.insert(0, '/tmp/kw'); import precow; print('precow', precow.precow(), file=sys.stderr); sys.path.remove('/tmp/kw')
    elif tick:
        while time.monotonic() + tick < t_end:
            time.sleep(tick); keepwarm()
    time.sleep(max(0, t_end - time.monotonic()))
    r0 = __import__("resource").getrusage(0).ru_minflt
    sys.path.insert(0, "/tmp/kw/code")
    t0 = time.perf_counter()
    loading.load_entry("cb_probe:hello", "/tmp/kw/code")
    t1 = time.perf_counter()
    r1 = __import__("resource").getrusage(0).ru_minflt
    os.write(w, f"{(t1-t0)*1000:.3f} {r1-r0}".encode()); os._exit(0)
conds = [("idle0.2", 0.2, 0), ("idle2", 2.0, 0), ("idle2+precow", 2.0, -1)]
res = {c[0]: [] for c in conds}; flt = {c[0]: [] for c in conds}
for rnd in range(int(sys.argv[1])):
    for name, idle, tick in conds[rnd % 3:] + conds[:rnd % 3]:
        r, w = os.pipe(); pid = os.fork()
        if pid == 0: child(idle, tick, w)
        os.waitpid(pid, 0); ms, f = os.read(r, 100).decode().split(); os.close(r); os.close(w)
        res[name].append(float(ms)); flt[name].append(int(f))
for k in res: print(k, "median ms", round(statistics.median(res[k]),3), "faults", statistics.median(flt[k]), [round(x,2) for x in res[k]])
