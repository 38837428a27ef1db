"""The benchmarks' `--rev REV` helper (benchmarks/revtree.py): a revision's platform/ on disk
(by git archive), the working tree for '.', and a mistyped revision that exits with git's
message and leaves no directory behind."""

from __future__ import annotations

import subprocess

import pytest
from benchmark_module import load_benchmark

rt = load_benchmark("revtree")


def test_a_revision_is_its_platform_tree_by_git_archive(tmp_path):
    got = rt.platform_of("HEAD", tmp_path / "work")
    assert got == tmp_path / "work" / "rev" / "platform"
    assert (got / "hearth" / "__init__.py").is_file()
    committed = subprocess.run(
        ["git", "-C", str(rt.ROOT), "show", "HEAD:platform/hearth/localnode.py"],
        capture_output=True,
        check=True,
    ).stdout
    assert (got / "hearth" / "localnode.py").read_bytes() == committed


def test_the_working_tree_and_no_revision_read_nothing(tmp_path):
    assert rt.checkout(".", tmp_path / "x") == rt.ROOT / "platform"
    assert rt.platform_of(None, tmp_path / "work") is None
    assert not (tmp_path / "x").exists() and not (tmp_path / "work").exists()


def test_a_mistyped_revision_exits_naming_it_and_removes_the_directory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "state").write_text("started before the revision was read")
    with pytest.raises(SystemExit, match=r"cannot read revision 'no-such-rev-x9': .*no-such-rev"):
        rt.platform_of("no-such-rev-x9", work)
    assert not work.exists()
