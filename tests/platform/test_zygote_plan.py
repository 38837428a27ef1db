"""Which zygote forks a spec's instances (hearth.agent.zygote.zygote_plan, a pure decision)."""

from __future__ import annotations

from hearth.agent.instance import POOL_RUNTIME
from hearth.agent.zygote import BUILTIN_PRELOAD, unused_zygotes, zygote_plan
from hearth.agent.zygote_wait import ZygoteProgress, cpu_sample, progressed, zygote_wait
from hearth.spec import parse_spec


def spec(**kw):
    return parse_spec({"name": "f", "handler": "m:h", **kw})


def test_plain_and_pool_specs_use_the_runtime_zygote():
    assert zygote_plan(None) == (POOL_RUNTIME, (), None)
    assert zygote_plan(spec(code_path="/code")) == (POOL_RUNTIME, (), None)


def test_preload_gets_a_zygote_per_list_and_code_directory():
    a = zygote_plan(spec(preload=["numpy", "scipy.sparse"]))
    b = zygote_plan(spec(preload=["scipy.sparse", "numpy"]))  # same set, same zygote
    assert a == b == ("preload:numpy,scipy.sparse", ("numpy", "scipy.sparse"), None)
    c = zygote_plan(spec(preload=["numpy"], code_path="/a"))
    d = zygote_plan(spec(preload=["numpy"], code_path="/b"))
    # a module of that name may live in either directory: never the same zygote
    assert c[0] != d[0] and c[2] == "/a" and d[2] == "/b"


def test_builtins_keep_their_zygote_and_add_a_preload_on_top():
    fed = "hearth.functions.fedavg.handlers:aggregate"
    assert zygote_plan(spec(handler=fed)) == ("builtins", BUILTIN_PRELOAD, None)
    key, extra, _ = zygote_plan(spec(handler=fed, preload=["scipy"]))
    assert key == "builtins+scipy" and extra == (*BUILTIN_PRELOAD, "scipy")
    # a user handler named like a built-in but with its own code is not a built-in
    assert zygote_plan(spec(handler=fed, code_path="/x"))[0] == POOL_RUNTIME


def test_zygotes_of_deleted_functions_stop_once_their_instances_have_ended():
    numpy = spec(name="a", preload=["numpy"])
    scipy = spec(name="b", preload=["scipy"])
    key_np, key_sp = zygote_plan(numpy)[0], zygote_plan(scipy)[0]
    running = {POOL_RUNTIME: 0, "builtins": 0, key_np: 0, key_sp: 0}
    # both deployed: nothing stops
    assert unused_zygotes(running, [numpy, scipy]) == set()
    # b deleted: its zygote stops; the node's own two never do, even with nothing deployed
    assert unused_zygotes(running, [numpy]) == {key_sp}
    assert unused_zygotes(running, []) == {key_np, key_sp}
    # an instance forked from it still runs (it would die with its zygote): not yet
    assert unused_zygotes({**running, key_sp: 1}, [numpy]) == set()
    # another function with the same preload list keeps it
    assert unused_zygotes(running, [numpy, spec(name="c", preload=["scipy"])]) == set()


def test_a_start_waits_for_the_builtins_zygote_while_it_shows_progress():
    # ready: fork now; gone (failed, timed out, never started): the pool at once
    assert zygote_wait(True, "ready", 0.0, 2.0) == 0.0
    assert zygote_wait(True, "gone", 0.0, 2.0) is None
    # starting: no fixed bound from its start: it waits while the zygote works (progress seen
    # `idle_s` ago), however long that has been going on ...
    assert zygote_wait(True, "starting", 0.0, 2.0) == 2.0
    assert zygote_wait(True, "starting", 0.5, 2.0) == 1.5
    # ... and takes the pool once it has shown none for the bound (a hung preload), at once for
    # every later start
    assert zygote_wait(True, "starting", 2.0, 2.0) is None
    assert zygote_wait(True, "starting", 60.0, 2.0) is None
    assert zygote_wait(True, "starting", 0.0, 0.0) is None  # HEARTH_ZYGOTE_WAIT_S=0
    # a user preload zygote is never worth a wait (nor a fork rather than the pool)
    assert zygote_wait(False, "starting", 0.0, 2.0) is None
    assert zygote_wait(False, "ready", 0.0, 2.0) is None


def test_progress_is_cpu_used_or_a_runnable_or_disk_waiting_process():
    assert progressed((10, "S"), (12, "S"))  # used CPU between the samples
    assert progressed(None, (0, "R"))  # runnable: waiting for a CPU on a busy node
    assert progressed((10, "D"), (10, "D"))  # disk wait: importing from a cold page cache
    assert not progressed((10, "S"), (10, "S"))  # asleep, no CPU used: a hung preload
    assert not progressed(None, (10, "S"))  # a first sample alone says nothing
    assert not progressed((10, "S"), None)  # gone


def test_progress_of_real_processes(tmp_path):
    """`ZygoteProgress` on /proc: a busy process keeps its idle time at zero, a sleeping one's
    grows from the zygote's start."""
    import subprocess
    import sys
    import time

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    asleep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t0 = time.monotonic()
        p_busy, p_asleep = ZygoteProgress(t0), ZygoteProgress(t0)
        deadline = t0 + 30
        while time.monotonic() < deadline:
            now = time.monotonic()
            idle_busy = p_busy.idle_s(busy.pid, now)
            idle_asleep = p_asleep.idle_s(asleep.pid, now)
            if now - t0 > 1.0 and idle_asleep > 1.0:
                break
            time.sleep(0.05)
        assert idle_busy < 0.5 < 1.0 < idle_asleep
        # no pid yet (the zygote's process not spawned): counted from the zygote's start
        assert ZygoteProgress(100.0).idle_s(None, 105.0) == 5.0
        assert cpu_sample(asleep.pid) is not None
    finally:
        for p in (busy, asleep):
            p.kill()
            p.wait()
    assert cpu_sample(asleep.pid) is None  # reaped: gone
