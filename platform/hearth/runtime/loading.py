"""How an instance loads its function's code: the handler's module from its file
(`load_entry`, `load_module`), and the loader a directory's source modules are loaded with
(`LeanSourceLoader`, from `install` on).

Issue #19: a warm-pool start is serial CPU work on one vCPU, and most of it is importing the
function's modules in a process that has never run that code (~0.9 of ~1.7 ms on a quiet
machine, ~130-190 calls of importlib per module). Both parts here cut the import system's
own work and keep what it does: the same modules, specs, attributes, cache files and errors.
Nothing here imports or runs any function's code before its start.
"""

from __future__ import annotations

import _imp
import _io
import importlib
import marshal
import os
import posix
import sys
from importlib.machinery import (  # (imported by importlib itself at start-up)
    BYTECODE_SUFFIXES,
    EXTENSION_SUFFIXES,
    SOURCE_SUFFIXES,
    BuiltinImporter,
    ExtensionFileLoader,
    FileFinder,
    FrozenImporter,
    PathFinder,
    SourceFileLoader,
    SourcelessFileLoader,
)
from importlib.util import MAGIC_NUMBER, module_from_spec, spec_from_file_location

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["LeanSourceLoader", "install", "load_entry", "load_module"]

# the import's per-name lock (private, in importlib since 3.3); without it the function's
# modules go through `import` itself (`load_module`)
_ModuleLock = getattr(importlib._bootstrap, "_ModuleLockManager", None)  # type: ignore[attr-defined]


def _file_loaders(hook: Any) -> list[tuple[Any, Any]] | None:
    """The (loader, suffixes) pairs a ``FileFinder.path_hook`` hook makes its finders with."""
    names = getattr(getattr(hook, "__code__", None), "co_freevars", ())
    cells = dict(zip(names, (c.cell_contents for c in hook.__closure__ or ()), strict=False))
    if cells.get("cls") is not FileFinder or not isinstance(cells.get("loader_details"), tuple):
        return None
    return [tuple(d) for d in cells["loader_details"]]


_DEFAULT_LOADERS = [
    (ExtensionFileLoader, EXTENSION_SUFFIXES),
    (SourceFileLoader, SOURCE_SUFFIXES),
    (SourcelessFileLoader, BYTECODE_SUFFIXES),
]
# The interpreter's own path hooks (the zip importer, which refuses a directory, then the
# FileFinder's with its default loaders, not a user's own): while sys.path_hooks is this, a
# directory's modules are what a FileFinder finds, with the loaders `import` would use
_PATH_HOOKS: list[Any] | None = list(sys.path_hooks)
if not (
    len(_PATH_HOOKS) == 2
    and _PATH_HOOKS[0].__name__ == "zipimporter"
    and _PATH_HOOKS[1].__qualname__.startswith("FileFinder.path_hook.")
    and _file_loaders(_PATH_HOOKS[1]) == _DEFAULT_LOADERS
):
    _PATH_HOOKS = None  # not the interpreter's: every module goes through the import
_SOURCE_LOADER: type[SourceFileLoader] = SourceFileLoader  # LeanSourceLoader once installed
_CODE = type(compile("", "", "exec"))
_TIMESTAMP_PYC = b"\0\0\0\0"  # a pyc's flags: checked against the source's mtime and size


class LeanSourceLoader(SourceFileLoader):
    """``SourceFileLoader`` with its common case done in a few calls: a module whose
    ``__pycache__`` file is current (timestamp-checked, as ``compileall`` and every import
    write them). ``SourceLoader.get_code`` spends ~50 Python calls on it (the cache file's path
    built through ``cache_from_source``, the source's ``stat`` as a dict, the header checked by
    three helpers, debug messages), and ``module_from_spec`` builds that path a second time
    for ``__cached__``. Here: one ``stat``, one read, the header compared, ``marshal.loads``.
    Anything else (no cache file, a stale, short or hash-based one or one with another magic
    number, ``sys.pycache_prefix``, ``-O``, ``-v``, no cache tag, a name not this loader's) is
    the base class's own way: it compiles and writes the cache file when the import would, and
    raises what it raises. A cache file whose header is current but whose body is not code
    raises as the import's does (``marshal.loads``' error, or the base class's own for a
    non-code object). Like importlib's own functions, `get_code` is named a frame of importlib
    (its code's file name), so a traceback from a module's import is trimmed as the
    interpreter trims it."""

    def _cached(self) -> str | None:
        """The cache file's path as ``cache_from_source`` gives it, in its common case only."""
        tag = sys.implementation.cache_tag  # (None turns caching off, as for the import)
        if sys.pycache_prefix is not None or sys.flags.optimize or tag is None:
            return None
        head, sep, tail = self.path.rpartition("/")
        if not head or tail[-3:] != ".py" or len(tail) < 4:
            return None
        return f"{head}/__pycache__/{tail[:-3]}.{tag}.pyc"

    def create_module(self, spec: Any) -> None:
        # module_from_spec reads spec.cached for __cached__ next: the same path, made here once
        if (
            spec.loader is self
            and spec.has_location
            and spec.origin == self.path
            and getattr(spec, "_cached", 0) is None
        ):
            cached = self._cached()
            if cached is not None:
                spec.cached = cached
        return None  # the default module, as SourceFileLoader makes it

    def get_code(self, fullname: str) -> Any:
        pyc = self._cached() if fullname == self.name and not sys.flags.verbose else None
        if pyc is not None:
            try:  # through the modules importlib uses (patches of os.stat or io do not reach it)
                st = posix.stat(self.path)
                with _io.open_code(pyc) as f:
                    data = f.read()
            except OSError:
                data = b""
            if (
                len(data) > 16
                and data[:4] == MAGIC_NUMBER
                and data[4:8] == _TIMESTAMP_PYC
                and int.from_bytes(data[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(data[12:16], "little") == st.st_size & 0xFFFFFFFF
            ):
                code = marshal.loads(memoryview(data)[16:])  # raises as the import would
                if type(code) is _CODE:
                    _imp._fix_co_filename(code, self.path)
                    return code
        return super().get_code(fullname)

    # importlib's frames are left out of an import's traceback only when every frame between the
    # import and the module's own code is importlib's (the interpreter checks the file names)
    get_code.__code__ = get_code.__code__.replace(
        co_filename=SourceFileLoader.get_code.__code__.co_filename
    )


def install() -> None:
    """Load every directory's source modules with `LeanSourceLoader` from now on: the
    FileFinder path hook is made with it, and the finders made so far use it. Done once by a
    zygote before its preloads (its forks inherit it) and by every instance before its
    handler loads; not if the path hooks are not the interpreter's own."""
    global _PATH_HOOKS, _SOURCE_LOADER
    if _PATH_HOOKS is None or _SOURCE_LOADER is LeanSourceLoader or sys.path_hooks != _PATH_HOOKS:
        return
    hook = FileFinder.path_hook(
        (ExtensionFileLoader, EXTENSION_SUFFIXES),
        (LeanSourceLoader, SOURCE_SUFFIXES),
        (SourcelessFileLoader, BYTECODE_SUFFIXES),
    )
    sys.path_hooks[1] = hook
    for entry, finder in list(sys.path_importer_cache.items()):
        if type(finder) is not FileFinder:
            continue
        loaders = getattr(finder, "_loaders", None)  # (suffix, loader class) pairs
        if isinstance(loaders, list) and all(isinstance(p, tuple) and len(p) == 2 for p in loaders):
            finder._loaders = [  # type: ignore[attr-defined]
                (s, LeanSourceLoader if c is SourceFileLoader else c) for s, c in loaders
            ]
        else:
            del sys.path_importer_cache[entry]  # made again, by the hook, when next needed
    _PATH_HOOKS = list(sys.path_hooks)
    _SOURCE_LOADER = LeanSourceLoader


def load_entry(entry: str, code_path: str | None = None) -> Any:
    """``module:attr``; the module imported (see `load_module`)."""
    mod, _, attr = entry.partition(":")
    return getattr(load_module(mod, code_path), attr)


def load_module(name: str, code_path: str | None = None) -> Any:
    """``importlib.import_module(name)``, but a module or package of the function's own code
    directory (and a module of such a package) is loaded from its file at once when that file
    is what the import would load: the import asks every finder in turn (the zip importer
    fails on the directory, the path finder lists it), ~0.1 ms of a ~2 ms warm-pool start per
    module, in a process that has never run that code. The first name that is not such a file
    leaves the rest to the import, which finds the packages loaded here as it would have
    loaded them."""
    if (
        not code_path
        or not sys.path
        or sys.path[0] != code_path
        or code_path[:1] != "/"
        or _ModuleLock is None
    ):
        return importlib.import_module(name)
    parent: Any = None
    where = code_path  # the directory searched
    full = ""
    for part in name.split("."):
        full = f"{full}.{part}" if full else part
        if full in sys.modules:
            module = sys.modules[full]
            if module is None:  # a blocked name: the import says so
                return importlib.import_module(name)
        else:
            spec = _own_spec(full, part, where, parent)
            if spec is None:
                return importlib.import_module(name)
            module = _load(spec, parent, part)
        if full == name:
            return module
        # a package of the code directory, of its one directory: its modules are looked for
        path = getattr(module, "__path__", None)
        if path != [f"{where.rstrip('/')}/{part}"]:
            return importlib.import_module(name)
        parent, where = module, path[0]
    raise AssertionError("unreachable")


def _load(spec: Any, parent: Any, part: str) -> Any:
    """Load the module `spec` names as the import does once it has found it (``_load_unlocked``
    and, for a package's module, ``_find_and_load_unlocked``'s bookkeeping), under the
    import's own lock for that name: a thread the module starts while it runs, importing from
    it, waits for it to finish as under ``import`` (without the lock it saw it half made)."""
    with _ModuleLock(spec.name):  # type: ignore[misc]
        return _load_locked(spec, parent, part)


def _load_locked(spec: Any, parent: Any, part: str) -> Any:
    module = module_from_spec(spec)
    pending = getattr(getattr(parent, "__spec__", None), "_uninitialized_submodules", None)
    if pending is not None:
        pending.append(part)  # (a circular import's error message names it)
    spec._initializing = True  # what the import marks: a circular import sees it half-made
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)  # as a failed import leaves it
        raise
    finally:
        spec._initializing = False
        if pending is not None:
            pending.pop()
    # as import returns it (a module may replace itself there), moved to the end as it does
    module = sys.modules.pop(spec.name)
    sys.modules[spec.name] = module
    if parent is not None:
        parent = sys.modules[spec.parent]
        try:
            setattr(parent, part, module)  # as the import binds a module to its package
        except AttributeError:
            import warnings

            msg = f"Cannot set an attribute on {spec.parent!r} for child module {part!r}"
            warnings.warn(msg, ImportWarning, stacklevel=2)
    return module


def _own_spec(full: str, part: str, entry: str, parent: Any) -> Any:
    """The spec the import makes for `full` (`part` in the directory `entry`: a sys.path entry
    or its package's one ``__path__`` entry) if the import would load it from a source file
    there, else None (the import decides). So: no module of that name is built in or frozen
    (found before sys.path is searched), the directory is a FileFinder's (the interpreter's
    path hooks, as at start-up), no import hook ahead of the path finder claims the name, and
    `part` is a package directory with an ``__init__.py`` (and no extension module
    ``__init__``, found first), or no entry named `part` is there (a package, a namespace
    portion, a file without suffix) nor an extension module, and ``part.py`` is a file. The
    spec is the one the FileFinder makes (same loader, origin, search locations, cache)."""
    if not part.isidentifier() or full in sys.builtin_module_names or _imp.is_frozen(full):
        return None
    if sys.path_hooks != _PATH_HOOKS:  # (a hook added since) may claim the directory
        return None
    cached = sys.path_importer_cache.get(entry, FileFinder)
    if cached is not FileFinder and type(cached) is not FileFinder:
        return None  # the directory is another finder's (or none's: the import skips it)
    search = None if parent is None else parent.__path__
    for finder in sys.meta_path:  # an import hook before the path finder may claim the name
        if finder is PathFinder:
            break
        if finder is BuiltinImporter or finder is FrozenImporter:
            continue
        find = getattr(finder, "find_spec", None)
        if find is None or find(full, search) is not None:
            return None
    else:
        return None  # no path finder: leave it all to import
    base = f"{entry.rstrip('/')}/{part}"  # as the FileFinder joins them
    if os.access(base, os.F_OK):  # a package directory, or something the import may prefer
        init = f"{base}/__init__"
        if not os.path.isdir(base):
            return None
        for suffix in EXTENSION_SUFFIXES:
            if os.access(init + suffix, os.F_OK):
                return None
        init += ".py"
        if not os.path.isfile(init):
            return None  # a namespace portion, or a package of bytecode only
        loader = _SOURCE_LOADER(full, init)
        return spec_from_file_location(full, init, loader=loader, submodule_search_locations=[base])
    for suffix in EXTENSION_SUFFIXES:
        if os.access(base + suffix, os.F_OK):
            return None
    base += ".py"
    if not os.path.isfile(base):
        return None
    loader = _SOURCE_LOADER(full, base)
    return spec_from_file_location(full, base, loader=loader, submodule_search_locations=None)
