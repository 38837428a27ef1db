"""docs/vecsearch.md's `hearth vec build --npy ... --attrs ... --ids-column id`, through the
real CLI: the index keeps int64 ids, so an id column of other values is refused with one line
naming the option, the column and a bad value (it said only "invalid literal for int() with
base 10: np.str_('v0')"), and integer ids come back from a query."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def hearth(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ids_column_must_hold_integers_and_they_are_returned(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "vecs.npy", rng.standard_normal((300, 8)).astype(np.float32))
    bad = tmp_path / "bad.csv"
    bad.write_text("id,rank\n" + "".join(f"v{i},{i}\n" for i in range(300)))
    build = ("vec", "build", "--npy", tmp_path / "vecs.npy", "--no-progress", "--ids-column", "id")
    p = hearth(*build, "--attrs", bad, "-o", tmp_path / "bad.hvx")
    assert p.returncode == 1
    assert p.stderr.strip() == (
        f"error: --ids-column: column 'id' in {bad} must hold integer ids; it holds 'v0'"
    )
    half = tmp_path / "half.csv"
    half.write_text("id,rank\n" + "".join(f"{i + 0.5},{i}\n" for i in range(300)))
    p = hearth(*build, "--attrs", half, "-o", tmp_path / "half.hvx")
    assert p.returncode == 1 and "it holds '0.5'" in p.stderr, p.stderr
    good = tmp_path / "good.csv"
    good.write_text("id,rank\n" + "".join(f"{7000 + i},{i}\n" for i in range(300)))
    p = hearth(*build, "--attrs", good, "-o", tmp_path / "good.hvx")
    assert p.returncode == 0, p.stderr
    q = hearth("vec", "query", tmp_path / "good.hvx", "--vector", "[0,0,0,0,0,0,0,1]", "--json")
    assert q.returncode == 0, q.stderr
    ids = json.loads(q.stdout)["results"][0]["ids"]
    assert ids and all(7000 <= i < 7300 for i in ids)
