"""How an instance loads its handler's module (hearth.runtime.instance.load_module): a module or
package of the function's own code directory (and a module of such a package) straight from its
file, and only when that file is what ``import`` would load, as the import would have made it;
otherwise (and for everything else) the import itself."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
from hearth.runtime.instance import load_entry, load_module


@pytest.fixture
def code(tmp_path, monkeypatch):
    """A code directory first on sys.path, as `Instance.specialise` puts it; every module the
    test loads is forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]
    sys.path_importer_cache.pop(str(tmp_path), None)


def test_a_module_of_the_code_directory_is_loaded_from_its_file(code):
    (code / "hl_direct.py").write_text("X = 'file'\ndef h(event):\n    return X\n")
    sys.path_importer_cache.pop(str(code), None)
    mod = load_module("hl_direct", str(code))
    assert mod.X == "file" and mod.__file__ == str(code / "hl_direct.py")
    assert sys.modules["hl_direct"] is mod
    assert str(code) not in sys.path_importer_cache  # no finder was asked
    assert load_entry("hl_direct:h", str(code))(None) == "file"
    assert load_module("hl_direct", str(code)) is mod  # loaded once


def test_what_import_would_load_instead_is_loaded_by_import(code):
    # a package directory is found before a module file of the same name
    (code / "hl_both").mkdir()
    (code / "hl_both" / "__init__.py").write_text("X = 'package'\n")
    (code / "hl_both.py").write_text("X = 'file'\n")
    assert load_module("hl_both", str(code)).X == "package"
    # a module already loaded (the runtime's json) is not replaced by a file of that name
    (code / "json.py").write_text("X = 'shadow'\n")
    assert load_module("json", str(code)) is json
    # a built-in module is found before sys.path
    builtin = next(m for m in sys.builtin_module_names if m not in sys.modules)
    (code / f"{builtin}.py").write_text("X = 'shadow'\n")
    assert not hasattr(load_module(builtin, str(code)), "X")
    # a namespace portion (no __init__) beside a module file: the import decides
    (code / "hl_ns").mkdir()
    (code / "hl_ns.py").write_text("X = 'file'\n")
    assert load_module("hl_ns", str(code)).X == "file"
    # an extension module's __init__ is found before the package's __init__.py
    (code / "hl_ext").mkdir()
    (code / "hl_ext" / "__init__.py").write_text("X = 'source'\n")
    (code / "hl_ext" / "__init__.so").write_bytes(b"not an extension")
    with pytest.raises(ImportError):
        load_module("hl_ext", str(code))
    # modules outside the code directory: the import, as before
    assert load_module("hearth.sdk", str(code)) is importlib.import_module("hearth.sdk")


def _import_spec(name: str, path: list[str]):
    """The spec the path finder makes for `name` in `path`, nothing loaded."""
    return importlib.machinery.PathFinder.find_spec(name, path)


def test_a_package_of_the_code_directory_and_its_module_are_loaded_as_import_would(code):
    (code / "hl_shop").mkdir()
    (code / "hl_shop" / "__init__.py").write_text("X = 'package'\n")
    (code / "hl_shop" / "api.py").write_text("import hl_shop\nX = hl_shop.X\n")
    want = {
        "hl_shop": _import_spec("hl_shop", [str(code)]),
        "hl_shop.api": _import_spec("hl_shop.api", [str(code / "hl_shop")]),
    }
    sys.path_importer_cache.pop(str(code), None)
    sys.path_importer_cache.pop(str(code / "hl_shop"), None)
    api = load_entry("hl_shop.api:X", str(code))
    assert api == "package"
    # neither the code directory's finder nor the package's was asked: loaded from the files
    assert str(code) not in sys.path_importer_cache
    assert str(code / "hl_shop") not in sys.path_importer_cache
    pkg, mod = sys.modules["hl_shop"], sys.modules["hl_shop.api"]
    assert pkg.api is mod  # bound to its package, as the import binds it
    for name, module in (("hl_shop", pkg), ("hl_shop.api", mod)):
        got, exp = module.__spec__, want[name]
        assert type(got.loader) is type(exp.loader) and got.loader.path == exp.loader.path
        assert (got.origin, got.cached, got.has_location, got.parent) == (
            exp.origin,
            exp.cached,
            exp.has_location,
            exp.parent,
        )
        assert got.submodule_search_locations == exp.submodule_search_locations
        assert module.__file__ == exp.origin and not got._initializing
    assert pkg.__path__ == [str(code / "hl_shop")]
    assert load_module("hl_shop.api", str(code)) is mod  # loaded once


def test_a_failed_module_of_a_package_leaves_the_package_loaded_and_unbound(code):
    (code / "hl_half").mkdir()
    (code / "hl_half" / "__init__.py").write_text("")
    (code / "hl_half" / "bad.py").write_text("raise ValueError('bad module')\n")
    with pytest.raises(ValueError, match="bad module"):
        load_module("hl_half.bad", str(code))
    assert "hl_half" in sys.modules and "hl_half.bad" not in sys.modules
    assert not hasattr(sys.modules["hl_half"], "bad")  # as a failed import leaves it


def test_a_package_that_changes_its_path_leaves_its_modules_to_import(code, tmp_path_factory):
    """A package whose ``__path__`` is not its one directory (pkgutil.extend_path, a plugin
    directory put first) is searched by the import, in its order."""
    other = tmp_path_factory.mktemp("other")
    (other / "plug.py").write_text("X = 'elsewhere'\n")
    (code / "hl_ext_path").mkdir()
    (code / "hl_ext_path" / "__init__.py").write_text(f"__path__.insert(0, {str(other)!r})\n")
    (code / "hl_ext_path" / "plug.py").write_text("X = 'own directory'\n")
    assert load_module("hl_ext_path.plug", str(code)).X == "elsewhere"


def test_a_path_hook_or_finder_of_the_directory_keeps_what_it_finds(code, monkeypatch):
    """A hook on sys.path_hooks (added before the function's import) or another finder cached
    for the directory is what the import asks: what it finds is loaded, not the file."""
    import importlib.util

    (code / "hl_via_hook.py").write_text("X = 'file'\n")

    class Finder:
        def __init__(self, path: str) -> None:
            if path != str(code):
                raise ImportError("not ours")

        def find_spec(self, name, target=None):
            loader = type("L", (), {"create_module": lambda s, spec: None})()
            loader.exec_module = lambda m: setattr(m, "X", "hook")
            return importlib.util.spec_from_loader(name, loader)

    monkeypatch.setattr(sys, "path_hooks", [Finder, *sys.path_hooks])
    sys.path_importer_cache.pop(str(code), None)
    assert load_module("hl_via_hook", str(code)).X == "hook"
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(code))
    del sys.modules["hl_via_hook"]
    sys.path_importer_cache[str(code)] = Finder(str(code))  # the finder, cached
    assert load_module("hl_via_hook", str(code)).X == "hook"


def test_a_module_that_fails_to_load_is_not_left_half_loaded(code):
    (code / "hl_broken.py").write_text("raise ValueError('broken on import')\n")
    with pytest.raises(ValueError, match="broken on import"):
        load_module("hl_broken", str(code))
    assert "hl_broken" not in sys.modules
    (code / "hl_broken.py").write_text("X = 'fixed'\n")  # a later start gets the new file
    assert load_module("hl_broken", str(code)).X == "fixed"


def test_an_import_hook_ahead_of_the_path_finder_keeps_the_module_it_claims(code, monkeypatch):
    """An import hook on sys.meta_path before the path finder (setuptools' distutils shim, a
    user's hook) is asked first by `import`: a name it claims is not loaded from the file."""
    import importlib.machinery
    import importlib.util

    (code / "hl_hooked.py").write_text("X = 'file'\n")

    class Hook:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "hl_hooked":
                return None
            return importlib.util.spec_from_loader(name, Loader())

    class Loader:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            module.X = "hook"

    monkeypatch.setattr(sys, "meta_path", [Hook, *sys.meta_path])
    assert load_module("hl_hooked", str(code)).X == "hook"


@pytest.mark.parametrize("shape", ["module", "package"])
def test_a_thread_the_module_starts_waits_for_it_as_under_import(code, shape):
    """A module (or package) that starts a thread while it runs, the thread importing from it:
    under ``import`` the thread waits on the import's lock for that name and sees the module
    whole; loaded from its file, it must too (without the lock it saw it half made and failed
    with "partially initialized module")."""
    body = (
        "import threading, time\n"
        "got = []\n"
        "def _warm():\n"
        "    try:\n"
        "        from hl_thr import LATE\n"
        "        got.append(LATE)\n"
        "    except ImportError as e:\n"
        "        got.append(repr(e))\n"
        "t = threading.Thread(target=_warm)\n"
        "t.start()\n"
        "time.sleep(0.2)\n"
        "LATE = 1\n"
    )
    if shape == "package":
        (code / "hl_thr").mkdir()
        (code / "hl_thr" / "__init__.py").write_text(body)
    else:
        (code / "hl_thr.py").write_text(body)
    mod = load_module("hl_thr", str(code))
    mod.t.join(5)
    assert mod.got == [1]
