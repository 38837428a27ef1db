"""Which zygote forks a spec's instances (hearth.agent.zygote.zygote_plan, a pure decision)."""

from __future__ import annotations

from hearth.agent.instance import POOL_RUNTIME
from hearth.agent.zygote import BUILTIN_PRELOAD, unused_zygotes, zygote_plan
from hearth.agent.zygote_wait import (
    DISK_WAIT_S,
    ZygoteProgress,
    cpu_sample,
    progressed,
    zygote_wait,
)
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
    # progress or not, a start waits at most its cap in all (`left_s`: what is left of it): a
    # preload that spins, or a zygote stuck in disk wait, looks like progress
    assert zygote_wait(True, "starting", 0.0, 2.0, left_s=30.0) == 2.0
    assert zygote_wait(True, "starting", 0.0, 2.0, left_s=0.5) == 0.5
    assert zygote_wait(True, "starting", 0.0, 2.0, left_s=0.0) is None
    assert zygote_wait(True, "starting", 0.0, 2.0, left_s=-1.0) is None
    assert zygote_wait(True, "ready", 0.0, 2.0, left_s=0.0) == 0.0  # ready: fork, cap or not
    # a user preload zygote is never worth a wait (nor a fork rather than the pool)
    assert zygote_wait(False, "starting", 0.0, 2.0) is None
    assert zygote_wait(False, "ready", 0.0, 2.0) is None


def test_progress_is_cpu_used_or_a_runnable_or_disk_waiting_process():
    assert progressed((10, "S"), (12, "S"), 0.0)  # used CPU between the samples
    assert progressed((10, "D"), (12, "D"), 60.0)
    assert progressed(None, (0, "R"), 0.0)  # runnable: waiting for a CPU on a busy node
    assert progressed((10, "R"), (10, "R"), 60.0)
    assert progressed((10, "D"), (10, "D"), 0.5)  # disk wait: importing from a cold page cache
    # ... but not for long without CPU used: a hung NFS/FUSE mount on sys.path
    assert not progressed((10, "D"), (10, "D"), DISK_WAIT_S)
    assert not progressed((10, "S"), (10, "S"), 0.0)  # asleep, no CPU used: a hung preload
    assert not progressed(None, (10, "S"), 0.0)  # a sample with nothing to compare says nothing
    assert not progressed((10, "S"), None, 0.0)  # gone


def test_a_zygote_that_used_cpu_since_its_spawn_has_progressed_at_its_first_sample(tmp_path):
    """The baseline of a new process is 0 CPU ticks: a start that first looks at the zygote
    while it is momentarily asleep, later than the bound after its start, still sees the CPU
    it used (before: no baseline, the start took the pool at once)."""
    import subprocess
    import sys
    import time

    script = (
        "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 0.5: pass\ntime.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        t0 = time.monotonic()
        prog = ZygoteProgress(t0)
        deadline = t0 + 30
        while (s := cpu_sample(p.pid)) is None or s[1] != "S" or s[0] == 0:
            assert time.monotonic() < deadline, "the process never went to sleep"
            time.sleep(0.05)
        # looked at first 10 s after its start, asleep now: it used CPU since then
        assert prog.idle_s(p.pid, t0 + 10.0) == 0.0
        assert prog.idle_s(p.pid, t0 + 11.0) == 1.0  # and nothing since
    finally:
        p.kill()
        p.wait()


def test_an_unparsable_or_missing_stat_is_no_sample(tmp_path, monkeypatch):
    """cpu_sample runs on the request path: no exception, whatever /proc holds."""
    import builtins
    import io

    real_open = builtins.open
    lines = {
        "no parenthesis": b"123 python S 1 2 3",
        "short": b"123 (python) S 1 2 3",
        "not a number": b"123 (py) S " + b"x " * 30,
        "not ascii": b"123 (py) \xff " + b"1 " * 30,
        "empty": b"",
    }
    for why, raw in lines.items():

        def fake_open(path, *a, _raw=raw, **kw):
            if str(path) == "/proc/4242/stat":
                return io.BytesIO(_raw)
            return real_open(path, *a, **kw)

        monkeypatch.setattr(builtins, "open", fake_open)
        assert cpu_sample(4242) is None, why
    monkeypatch.setattr(builtins, "open", real_open)
    # each field holds its proc(5) number (the state is field 3, utime 14, stime 15)
    ok = b"123 (a (b) c) S " + b" ".join(str(n).encode() for n in range(4, 60))
    monkeypatch.setattr(
        builtins,
        "open",
        lambda path, *a, **kw: (
            io.BytesIO(ok) if str(path) == "/proc/4242/stat" else real_open(path, *a, **kw)
        ),
    )
    assert cpu_sample(4242) == (14 + 15, "S")  # a command name with ") " in it


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
