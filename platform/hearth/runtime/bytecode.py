"""A function's code compiled at deploy (#19): its first start imports bytecode instead of
compiling its modules on the request path.

When a function with a ``code_path`` is deployed and a ``.py`` under it has no up-to-date cache,
the node agent runs ``python -m hearth.runtime.bytecode CODE_PATH`` (a process of its own, at a
lower priority: a compile holds its interpreter's GIL, 0.3 s for 70 KB of small functions at
load 11, which the agent's event loop must not wait for), which compiles each stale file into
the standard ``__pycache__`` beside it (where ``import`` looks). The files are *checked-hash* pycs (PEP 552): every import hashes the source
and compares, so code edited after the deploy is never run from the old bytecode, even when the
edit keeps the file's size and modification second (a timestamp pyc's blind spot). A file the
node cannot write beside is left alone: it is compiled at each start, as without this.
"""

from __future__ import annotations

import os
import py_compile
import sys
from importlib.util import MAGIC_NUMBER, cache_from_source, source_hash

MAX_FILES = 2_000  # a code directory is a function's code, not a file system to crawl
MAX_BYTES = 1 << 20  # larger sources: compiled by their first import (one compile holds the GIL)
_CHECKED_HASH = 0b11  # PEP 552 flags: hash-based, checked at every import


def sources(root: str) -> list[str]:
    """The ``.py`` files under `root` (hidden and cache directories skipped), at most
    MAX_FILES, each at most MAX_BYTES."""
    out: list[str] = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(files):
            path = os.path.join(top, f)
            if f.endswith(".py") and not f.startswith("."):
                try:
                    if os.path.getsize(path) <= MAX_BYTES:
                        out.append(path)
                except OSError:
                    continue
                if len(out) >= MAX_FILES:
                    return out
    return out


def fresh(path: str) -> bool:
    """Whether `path` has a checked-hash pyc of its current source (what `compile` writes)."""
    try:
        with open(cache_from_source(path), "rb") as f:
            head = f.read(16)
        with open(path, "rb") as f:
            src = f.read()
    except OSError:
        return False
    return (
        head[:4] == MAGIC_NUMBER
        and int.from_bytes(head[4:8], "little") == _CHECKED_HASH
        and head[8:16] == source_hash(src)
    )


def compile_tree(root: str) -> tuple[int, int]:
    """Compile what is stale under `root`: (files compiled, files that could not be: not
    writable there, or not valid Python; their import reports the error as before)."""
    done = failed = 0
    for path in sources(root):
        if fresh(path):
            continue
        try:
            py_compile.compile(
                path, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH
            )
            done += 1
        except (OSError, py_compile.PyCompileError):
            failed += 1
    return done, failed


def stale(root: str) -> bool:
    """Whether any source under `root` lacks its checked-hash pyc (reads and hashes them)."""
    return not all(fresh(p) for p in sources(root))


def main() -> int:
    os.nice(10)  # behind the node's serving work
    done, failed = compile_tree(sys.argv[1])
    print(f"{sys.argv[1]}: {done} compiled, {failed} not", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
