"""The source loader instances load modules with (`hearth.runtime.loading.LeanSourceLoader`, #19):
its short way is taken for a current cache file, and everything else is what the import does
(stale, hash-based, foreign or missing cache files, a non-code body, `sys.pycache_prefix`, `-O`,
`-v`, no cache tag), with the same attributes and the same tracebacks. Each case runs in a fresh
interpreter (`install` changes the import system of the process it runs in), and once through
the pool instance of a real node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio
from call_outcomes import pool_node, pool_start
from hearth.invoke import InvokeResult

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")

# Run in a fresh interpreter: install (unless told not to), import `mod` from `code`, say what
# was loaded and how; an import error is printed as the interpreter prints it.
PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys, traceback
    import importlib._bootstrap_external as ext
    from importlib.machinery import SourceFileLoader
    from hearth.runtime import loading
    code, mod, how = sys.argv[1], sys.argv[2], sys.argv[3]
    if not how.startswith("plain"):
        loading.install()
    if how == "no-tag":
        sys.implementation.cache_tag = None
    long_way = []  # modules whose code the base class made
    paths = []  # cache paths importlib worked out
    base, cfs = SourceFileLoader.get_code, ext.cache_from_source
    def counted(self, name):
        long_way.append(name)
        return base(self, name)
    def cache_from_source(*a, **k):
        paths.append(a[0])
        return cfs(*a, **k)
    if not how.endswith("bare"):  # (a frame of this file's would show in a traceback)
        SourceFileLoader.get_code = counted
        ext.cache_from_source = cache_from_source
    sys.path.insert(0, code)
    try:
        m = importlib.import_module(mod)
    except BaseException as e:
        print(json.dumps({"error": traceback.format_exc()}))
        raise SystemExit(0)
    print(json.dumps({
        "value": m.VALUE,
        "loader": type(m.__loader__).__name__,
        "cached": getattr(m, "__cached__", None),
        "spec_cached": m.__spec__.cached,
        "expected_cached": cfs(m.__file__) if sys.implementation.cache_tag else None,
        "co_filename": m.f.__code__.co_filename,
        "file": m.__file__,
        "long_way": long_way,
        "cache_paths_made": len(paths),
    }))
    """
)


def _run(
    code: Path, mod: str, *flags: str, how: str = "lean", env: dict[str, str] | None = None
) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    e["PYTHONPATH"] = PLATFORM
    e.update(env or {})
    r = subprocess.run(
        [sys.executable, *flags, "-c", PROBE, str(code), mod, how],
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


def _pyc(src: Path) -> Path:
    import importlib.util

    return Path(importlib.util.cache_from_source(str(src)))


def _header(src: Path) -> bytes:
    """A timestamp cache file's mtime and size words for `src`."""
    st = src.stat()
    return (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (
        st.st_size & 0xFFFFFFFF
    ).to_bytes(4, "little")


def test_a_current_cache_file_is_read_the_short_way(tmp_path: Path) -> None:
    _module(tmp_path, "ll_cur", "one")
    first = _run(tmp_path, "ll_cur")  # no cache file yet: compiled, and the cache written
    assert first["value"] == "one" and first["long_way"] == ["ll_cur"]
    assert Path(first["expected_cached"]).is_file()
    again = _run(tmp_path, "ll_cur")
    assert again["value"] == "one"
    assert again["long_way"] == []  # read without the base class
    assert again["cache_paths_made"] == 0  # __cached__ too (create_module)
    assert again["loader"] == "LeanSourceLoader"
    assert again["cached"] == again["spec_cached"] == again["expected_cached"]
    assert again["co_filename"] == again["file"] == str(tmp_path / "ll_cur.py")


def test_a_copied_directorys_code_names_its_new_place(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _module(tmp_path / "a", "ll_moved", "x")
    _run(tmp_path / "a", "ll_moved")  # the cache file written in a/
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # mtimes kept: the cache file is current
    got = _run(tmp_path / "b", "ll_moved")
    assert got["long_way"] == []
    assert got["co_filename"] == got["file"] == str(tmp_path / "b" / "ll_moved.py")


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


def test_a_cache_file_of_another_kind_takes_the_imports_way(tmp_path: Path) -> None:
    """Each of these has the source's own mtime and size in its header, so only the check
    named keeps the short way from reading it."""
    import py_compile

    src = _module(tmp_path, "ll_hash", "hashed")  # flags: a checked hash-based file
    mode = py_compile.PycInvalidationMode.CHECKED_HASH
    py_compile.compile(str(src), doraise=True, invalidation_mode=mode)
    pyc = _pyc(src)
    data = pyc.read_bytes()
    pyc.write_bytes(data[:8] + _header(src) + data[16:])
    got = _run(tmp_path, "ll_hash")
    assert got["value"] == "hashed" and got["long_way"] == ["ll_hash"]

    src = _module(tmp_path, "ll_magic", "good")  # magic: another Python's file
    _run(tmp_path, "ll_magic")
    pyc = _pyc(src)
    pyc.write_bytes(b"\x00\x0d\x0d\x0a" + pyc.read_bytes()[4:])
    got = _run(tmp_path, "ll_magic")
    assert got["value"] == "good" and got["long_way"] == ["ll_magic"]


def test_a_non_code_body_fails_as_the_import_fails(tmp_path: Path) -> None:
    import marshal
    from importlib.util import MAGIC_NUMBER

    src = _module(tmp_path, "ll_int", "x")
    pyc = _pyc(src)
    pyc.parent.mkdir()
    pyc.write_bytes(MAGIC_NUMBER + b"\0\0\0\0" + _header(src) + marshal.dumps(42))
    (tmp_path / "ll_int_top.py").write_text("import ll_int\n")  # (the import statement's trim)
    lean = _run(tmp_path, "ll_int_top", how="bare")
    plain = _run(tmp_path, "ll_int_top", how="plain-bare")
    assert "ImportError: Non-code object" in lean["error"]
    assert lean["error"] == plain["error"]


def test_an_import_errors_traceback_is_the_interpreters(tmp_path: Path) -> None:
    (tmp_path / "ll_bad.py").write_text("x = (\n")
    (tmp_path / "ll_top.py").write_text("import ll_bad\n")
    lean, plain = _run(tmp_path, "ll_top", how="bare"), _run(tmp_path, "ll_top", how="plain-bare")
    assert "SyntaxError" in plain["error"]
    assert lean["error"] == plain["error"]  # no frame of importlib's, none of the loader's
    assert "loading.py" not in lean["error"]


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
    assert _run(tmp_path, "ll_opt", "-v")["long_way"] == ["ll_opt"]  # its messages printed
    untagged = _run(tmp_path, "ll_opt", how="no-tag")  # caching turned off
    assert untagged["long_way"] == ["ll_opt"] and untagged["cached"] is None


@pytest.mark.parametrize("hook", ["foreign", "own-loaders"])
def test_install_leaves_path_hooks_not_the_interpreters_alone(hook: str) -> None:
    add = {
        "foreign": "sys.path_hooks.insert(0, lambda p: (_ for _ in ()).throw(ImportError()))\n",
        # a FileFinder hook of the user's own, with a loader of theirs
        "own-loaders": (
            "import importlib.machinery as m\n"
            "class Traced(m.SourceFileLoader): pass\n"
            "sys.path_hooks[1] = m.FileFinder.path_hook(\n"
            "    (m.ExtensionFileLoader, m.EXTENSION_SUFFIXES), (Traced, m.SOURCE_SUFFIXES),\n"
            "    (m.SourcelessFileLoader, m.BYTECODE_SUFFIXES))\n"
        ),
    }[hook]
    probe = (
        "import sys\n" + add + "import importlib.machinery as m\n"
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
        res = await pool_start(
            agent, {"name": name, "handler": "llapp:h", "code_path": str(tmp_path)}
        )
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
