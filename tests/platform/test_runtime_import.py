"""The instance runtime's import path stays lean (issue #19: `python -X importtime -c "import
hearth.runtime.instance"` within 30 ms). Time is not asserted (it depends on the machine's load):
the modules the import brings are counted instead, and the heavy ones named."""

from __future__ import annotations

import json
import subprocess
import sys

# Modules the import must never bring: each costs tens to hundreds of milliseconds per cold start.
HEAVY = ("numpy", "pydantic", "pydantic_core", "yaml", "asyncio", "uuid", "aiohttp", "redis")
# New modules (beyond a bare interpreter's) of `import hearth.runtime.instance`: 68 with this
# change (333 before it, numpy and pydantic included); a little room for the standard library's
# own changes between Python versions, none for a new heavy dependency.
MAX_MODULES = 80


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
