"""The instance runtime's import path stays lean (issue #19: `python -X importtime -c "import
hearth.runtime.instance"` within 30 ms). Time is not asserted (it depends on the machine's load):
the modules the import brings are counted instead, and the heavy ones named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules the import must never bring: each costs tens to hundreds of milliseconds per cold start.
HEAVY = ("numpy", "pydantic", "pydantic_core", "yaml", "asyncio", "uuid", "aiohttp", "redis")
# Standard-library modules it no longer brings, a few milliseconds each (issue #19: 30 ms in all):
# dataclasses imports inspect (ast, dis, tokenize); concurrent.futures imports logging, which
# imports traceback and string; typing. Loaded where needed (error printing, handler threads)
# and preloaded by the zygote.
STDLIB_KEPT_OUT = ("dataclasses", "inspect", "typing", "logging", "concurrent", "traceback")
# New modules (beyond a bare interpreter's and json) of `import hearth.runtime.instance`: 41 (35,
# then the instance's own parts: replies, handling, calls, and since 7 Dec 2026 loading, the
# handler's module loader moved out of instance.py; the msgpack wheel's `_cython_3_3_0` and
# `cython_runtime`, from the Cython it was built with; 63 before the lean runtime's second round,
# ~330 before the first, numpy and pydantic included). No room for a new dependency: a split of
# the runtime's own code counts here, and says so.
MAX_MODULES = 41


def _imported(code: str) -> list[str]:
    """The modules `code` adds to a fresh interpreter's sys.modules."""
    probe = (
        "import sys, json; before = set(sys.modules)\n"
        f"{code}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_instance_import_is_lean() -> None:
    new = _imported("import hearth.runtime.instance")
    heavy = sorted({m.split(".")[0] for m in new} & set(HEAVY))
    assert not heavy, f"the runtime imports {heavy}"
    stdlib = sorted({m.split(".")[0] for m in new} & set(STDLIB_KEPT_OUT))
    assert not stdlib, f"the runtime imports {stdlib}"
    assert len(new) <= MAX_MODULES, f"{len(new)} modules: {new}"


def test_a_pods_runtime_imports_nothing_of_the_agent() -> None:
    """An instance pod (python -m hearth.runtime.pod) joins the agent, then runs the same
    runtime: its import path is as lean (no pydantic, asyncio or numpy)."""
    new = _imported("import hearth.runtime.pod, hearth.runtime.instance")
    heavy = sorted({m.split(".")[0] for m in new} & set(HEAVY))
    assert not heavy, f"the pod runtime imports {heavy}"
    assert not [m for m in new if m.startswith("hearth.agent")]


def test_numpy_comes_only_when_a_handler_asks_for_arrays() -> None:
    """A bytes payload read through Event.payload needs no numpy; Event.array() imports it."""
    setup = (
        "from hearth.runtime.instance import RunSpec\n"
        "from hearth.runtime.codec import encode_result\n"
        "from hearth.sdk import Context, Event\n"
        "ev = Event(payload=memoryview(b'\\0' * 8), context=Context(function='f', "
        "instance_id='i', invocation_id='x', deadline=0.0), content_type='', headers={})\n"
        "encode_result({'n': len(ev.payload)}, {})\n"
        "encode_result(b'ok', {})\n"
    )
    assert "numpy" not in _imported(setup)
    assert "numpy" in _imported(setup + "ev.array('float32')\n")


def test_the_runtimes_own_checks_agree_with_inspect() -> None:
    """The runtime tells async handlers and awaitable results apart without importing inspect;
    its answers are inspect's on every kind of callable and result it can meet."""
    import functools
    import inspect
    import types

    from hearth.runtime.instance import _awaitable, _coroutine_function

    async def coro_fn(event):
        return 1

    def sync_fn(event):
        return 1

    def gen_fn():
        yield 1

    @types.coroutine
    def old_style():
        yield

    class Handlers:
        async def a(self, event):
            return 1

        def s(self, event):
            return 1

    class AwaitMe:
        def __await__(self):
            yield

    h = Handlers()
    fns = [coro_fn, sync_fn, gen_fn, functools.partial(coro_fn), functools.partial(sync_fn)]
    fns += [h.a, h.s, lambda e: e, functools.partial(functools.partial(coro_fn)), print]
    assert [_coroutine_function(f) for f in fns] == [inspect.iscoroutinefunction(f) for f in fns]
    assert sum(map(_coroutine_function, fns)) == 4  # the check can fail both ways
    c = coro_fn(None)
    results = [c, old_style(), gen_fn(), AwaitMe(), 1, None, b"x", {"a": 1}]
    assert [_awaitable(r) for r in results] == [inspect.isawaitable(r) for r in results]
    assert sum(map(_awaitable, results)) == 3
    c.close()


def test_records_compare_and_print_as_the_dataclasses_did() -> None:
    from hearth.dataplane.descriptor import Descriptor, Kind
    from hearth.invoke import InvokeResult
    from hearth.sdk import Context, Response

    d = Descriptor(dst=5, src=7, kind=Kind.REPLY, corr=b"c" * 16)
    assert d == Descriptor(5, 7, kind=Kind.REPLY, corr=b"c" * 16)
    assert d != d.replace(aux=1)
    e = d.replace(dst=9, src=1)
    assert (e.dst, e.src, e.kind, e.corr, d.dst) == (9, 1, Kind.REPLY, b"c" * 16, 5)
    assert Descriptor.unpack(d.pack()) == d
    assert repr(Descriptor()).startswith("Descriptor(dst=0, src=0, slot=4294967295, gen=0,")
    ctx = Context("f", "i", "x", 1.0, _invoke=print)
    assert repr(ctx) == (
        "Context(function='f', instance_id='i', invocation_id='x', deadline=1.0, node='local', "
        "idempotency_key=None, caller=None)"
    )
    assert ctx != Context("f", "i", "x", 1.0)  # hidden from the repr, still compared
    assert Response(b"x") == Response(body=b"x", status=200) != Response(b"x", 201)
    r = InvokeResult(200, b"")
    assert r.ok and r.headers == {} and r.headers is not InvokeResult(200, b"").headers
    with pytest.raises(TypeError):  # a mutable record must not be hashable
        hash(d)
