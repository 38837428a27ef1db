"""Which zygote forks a spec's instances (hearth.agent.zygote.zygote_plan, a pure decision)."""

from __future__ import annotations

from hearth.agent.instance import POOL_RUNTIME
from hearth.agent.zygote import BUILTIN_PRELOAD, unused_zygotes, zygote_plan, zygote_wait
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


def test_a_start_waits_for_the_builtins_zygote_only_while_it_comes_up_within_its_bound():
    # ready: fork now; gone (failed, never started): the pool at once
    assert zygote_wait(True, "ready", 100.0, 130.0, 10.0) == 0.0
    assert zygote_wait(True, "gone", None, 130.0, 10.0) is None
    # starting: wait out what is left of the bound, counted from the zygote's own start
    assert zygote_wait(True, "starting", 100.0, 103.0, 10.0) == 7.0
    assert zygote_wait(True, "starting", 100.0, 110.0, 10.0) is None  # late: never again
    assert zygote_wait(True, "starting", 100.0, 100.0, 0.0) is None  # HEARTH_ZYGOTE_WAIT_S=0
    # a user preload zygote is never worth a wait (nor a fork rather than the pool)
    assert zygote_wait(False, "starting", 100.0, 101.0, 10.0) is None
    assert zygote_wait(False, "ready", 100.0, 101.0, 10.0) is None
