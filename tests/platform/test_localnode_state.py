"""start_node(None) gives the node a private temporary state directory and removes it when the
node stops or fails to start: benchmarks that made one with mkdtemp left a /tmp/hearth-bench-*
directory (logs, sockets, Redis data) behind per run."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hearth.localnode import NodeStartError, start_node


@pytest.fixture
def tmpdir_of_mine(monkeypatch):
    """tempfile's directory for this test only, so what is left there is this test's (short:
    the node's sockets live under it, and a unix socket path has at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="hls-"))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_node_with_a_private_state_directory_removes_it_when_it_stops(tmpdir_of_mine, redis_url):
    node = start_node(None, redis_url=redis_url, dataplane="unix")
    try:
        assert node.state.parent == tmpdir_of_mine and node.state.name.startswith("hearth-node-")
        assert (node.state / "hearth-up.log").exists()  # in use while the node runs
    finally:
        node.stop()
    assert list(tmpdir_of_mine.iterdir()) == []


def test_a_private_state_directory_is_removed_when_the_node_fails_to_start(tmpdir_of_mine):
    with pytest.raises(NodeStartError, match="HEARTH_RUNNER"):
        start_node(None, dataplane="unix", env={"HEARTH_RUNNER": "bogus"}, timeout=30)
    assert list(tmpdir_of_mine.iterdir()) == []


def test_a_given_state_directory_is_kept(tmp_path, redis_url):
    with start_node(tmp_path / "n", redis_url=redis_url, dataplane="unix") as node:
        pass
    assert node.state == tmp_path / "n" and (node.state / "hearth-up.log").exists()
