"""The source loader instances load modules with (`hearth.runtime.loading.LeanSourceLoader`, #19):
its short way is taken for a current cache file, and everything else is what the import does
(stale, hash-based, corrupt or missing cache files, `sys.pycache_prefix`, `-O`). Each case runs
in a fresh interpreter (`install` changes the import system of the process it runs in), and
once through the pool instance of a real node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio
from call_outcomes import Outcomes, pool_node, pool_ready
from hearth.invoke import InvokeResult
from hearth.spec import parse_spec

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")

# Run in a fresh interpreter: install, import `mod` from `code`, say what was loaded and how.
PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys
    from importlib.machinery import SourceFileLoader
    from hearth.runtime import loading
    code, mod = sys.argv[1], sys.argv[2]
    loading.install()
    short = []  # modules whose code the base class made (the long way)
    base = SourceFileLoader.get_code
    def counted(self, name):
        short.append(name)
        return base(self, name)
    SourceFileLoader.get_code = counted
    sys.path.insert(0, code)
    m = importlib.import_module(mod)
    print(json.dumps({
        "value": m.VALUE,
        "loader": type(m.__loader__).__name__,
        "cached": m.__cached__,
        "spec_cached": m.__spec__.cached,
        "expected_cached": importlib.util.cache_from_source(m.__file__),
        "co_filename": m.f.__code__.co_filename,
        "file": m.__file__,
        "long_way": short,
    }))
    """
)


def _run(code: Path, mod: str, *flags: str, env: dict[str, str] | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    e["PYTHONPATH"] = PLATFORM
    e.update(env or {})
    r = subprocess.run(
        [sys.executable, *flags, "-c", PROBE, str(code), mod],
        capture_output=True,
        text=True,
        timeout=60,
        env=e,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _module(code: Path, name: str, value: str) -> Path:
    p = code / f"{name}.py"
    p.write_text(f"VALUE = {value!r}\n\n\ndef f():\n    return VALUE\n")
    return p


def test_a_current_cache_file_is_read_the_short_way(tmp_path: Path) -> None:
    _module(tmp_path, "ll_cur", "one")
    first = _run(tmp_path, "ll_cur")  # no cache file yet: compiled, and the cache written
    assert first["value"] == "one" and first["long_way"] == ["ll_cur"]
    assert Path(first["expected_cached"]).is_file()
    again = _run(tmp_path, "ll_cur")
    assert again["value"] == "one"
    assert again["long_way"] == []  # read without the base class
    assert again["loader"] == "LeanSourceLoader"
    assert again["cached"] == again["spec_cached"] == again["expected_cached"]
    assert again["co_filename"] == again["file"] == str(tmp_path / "ll_cur.py")


def test_a_stale_cache_file_is_not_used(tmp_path: Path) -> None:
    src = _module(tmp_path, "ll_stale", "old")
    assert _run(tmp_path, "ll_stale")["value"] == "old"
    _module(tmp_path, "ll_stale", "newer")  # another size
    assert _run(tmp_path, "ll_stale")["value"] == "newer"
    _module(tmp_path, "ll_stale", "fresh")  # same size: the mtime tells
    st = src.stat()
    os.utime(src, (st.st_atime, st.st_mtime + 5))
    got = _run(tmp_path, "ll_stale")
    assert got["value"] == "fresh" and got["long_way"] == ["ll_stale"]
    assert _run(tmp_path, "ll_stale")["long_way"] == []  # the cache written again


def test_hash_based_and_corrupt_cache_files_take_the_imports_way(tmp_path: Path) -> None:
    import py_compile

    src = _module(tmp_path, "ll_hash", "hashed")
    mode = py_compile.PycInvalidationMode.CHECKED_HASH
    py_compile.compile(str(src), doraise=True, invalidation_mode=mode)
    got = _run(tmp_path, "ll_hash")
    assert got["value"] == "hashed" and got["long_way"] == ["ll_hash"]

    src = _module(tmp_path, "ll_bad", "good")
    _run(tmp_path, "ll_bad")
    pyc = Path(_run(tmp_path, "ll_bad")["expected_cached"])
    pyc.write_bytes(b"\x00" * 20)  # a wrong magic number: recompiled, as the import does
    got = _run(tmp_path, "ll_bad")
    assert got["value"] == "good" and got["long_way"] == ["ll_bad"]


def test_the_interpreters_own_settings_are_kept(tmp_path: Path) -> None:
    _module(tmp_path, "ll_opt", "x")
    _run(tmp_path, "ll_opt")
    optimized = _run(tmp_path, "ll_opt", "-O")  # another cache file: .opt-1.pyc
    assert optimized["long_way"] == ["ll_opt"]
    assert optimized["cached"].endswith(".opt-1.pyc") and Path(optimized["cached"]).is_file()
    prefix = tmp_path / "prefix"
    moved = _run(tmp_path, "ll_opt", env={"PYTHONPYCACHEPREFIX": str(prefix)})
    assert moved["long_way"] == ["ll_opt"]
    assert moved["cached"].startswith(str(prefix)) and Path(moved["cached"]).is_file()


def test_install_leaves_foreign_path_hooks_alone(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "sys.path_hooks.insert(0, lambda p: (_ for _ in ()).throw(ImportError()))\n"
        "import importlib.machinery as m\n"
        "from hearth.runtime import loading\n"
        "before = list(sys.path_hooks)\n"
        "loading.install()\n"
        "print(sys.path_hooks == before, loading._SOURCE_LOADER is m.SourceFileLoader)\n"
    )
    e = {**os.environ, "PYTHONPATH": PLATFORM}
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=e
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


# ---- through a real node's pool instance --------------------------------------------------

FUNC = textwrap.dedent(
    """
    import importlib.util
    import sys

    from llshop import cart


    def h(event):
        me = sys.modules[__name__]
        return {
            "value": cart.VALUE,
            "loaders": [type(me.__loader__).__name__, type(cart.__loader__).__name__],
            "cached": [me.__cached__, cart.__cached__],
            "expected": [importlib.util.cache_from_source(me.__file__),
                         importlib.util.cache_from_source(cart.__file__)],
        }
    """
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server):
    async with pool_node(redis_server.url, "hearth-ll-") as p:
        yield p


@pytest.mark.asyncio(loop_scope="module")
async def test_a_pool_instance_loads_the_functions_modules_with_it(platform, tmp_path) -> None:
    agent = platform.agent
    (tmp_path / "llshop").mkdir()
    (tmp_path / "llshop" / "__init__.py").write_text("")
    cart = tmp_path / "llshop" / "cart.py"
    cart.write_text("VALUE = 'first'\n")
    (tmp_path / "llapp.py").write_text(FUNC)

    async def start(name: str) -> dict:
        await agent.deploy(
            parse_spec({"name": name, "handler": "llapp:h", "code_path": str(tmp_path)})
        )
        await pool_ready(agent)
        out = Outcomes()
        assert agent.invoker.start_call(name, b"{}", done=out, content_type="application/json")
        res = await out.one()
        assert isinstance(res, InvokeResult), res
        return json.loads(res.body)

    got = await start("ll-a")  # the first start writes the cache files
    assert got["value"] == "first"
    assert got["loaders"] == ["LeanSourceLoader", "LeanSourceLoader"]
    assert got["cached"] == got["expected"]
    # a second function from the same code, in another pool instance: the cache files are read
    assert (await start("ll-b"))["value"] == "first"
    cart.write_text("VALUE = 'second, longer'\n")  # changed: not the stale cache file
    assert (await start("ll-c"))["value"] == "second, longer"
