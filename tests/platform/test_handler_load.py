"""How an instance loads its handler's module (hearth.runtime.instance.load_module): a module of
the function's own code directory straight from its file, and only when that file is what
``import`` would load; otherwise (and for everything else) the import itself."""

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
    # dotted names and modules outside the code directory: the import, as before
    (code / "hl_pkg").mkdir()
    (code / "hl_pkg" / "__init__.py").write_text("")
    (code / "hl_pkg" / "inner.py").write_text("X = 'inner'\n")
    assert load_module("hl_pkg.inner", str(code)).X == "inner"
    assert load_module("hearth.sdk", str(code)) is importlib.import_module("hearth.sdk")


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
