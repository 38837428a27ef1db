"""The slot owner a pod claims when it joins is checked against the connection, and joins are
bounded. A real `hearth up` node and real joining processes: the test process itself, processes
that exited, and a process made pid 1 of its own pid namespace (`unshare`), as a pod's runtime
is. Without the check, any of these claims kept the named owner's slots from being reclaimed
while the connection stayed open; without the bound, joins were unlimited."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys

import pytest
from hearth.agent.join import JOIN_SOCKET
from hearth.agent.peer import PeerView, claim_refusal
from hearth.dataplane.segment import _my_start, proc_start
from hearth.process import AGENT_OWN_FDS, NOFILE_CEILING, FdPlan, StartupError, fd_plan
from joining import IN_OWN_PID_NS, join_node, join_once, join_open, needs_unshare
from realnode import wait_for


def _exited() -> tuple[int, int]:
    """The (pid, start time) of a process that has exited (as a dead instance's, in the table)."""
    code = "from hearth.dataplane.segment import _Me, _my_start; print(_Me.pid, _my_start())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pid, start = (int(v) for v in out.stdout.split())
    return pid, start


def test_claims_are_checked_against_the_joining_process(tmp_path, redis_url):
    node = join_node(tmp_path, redis_url)
    try:
        me, start = os.getpid(), _my_start()
        agent = node.proc.pid
        dead = _exited()
        for owner, detail in (
            # a live process of this namespace (the node agent): not the one that connected
            (
                [agent, proc_start(agent)],
                f"owner: pid {agent} is not the joining process's (pid {me} in its pid namespace)",
            ),
            # a dead process's identity, as read from the slot table
            (
                list(dead),
                f"owner: pid {dead[0]} is not the joining process's (pid {me} in its pid namespace)",
            ),
            # its own pid with another start time (an earlier process with the same pid)
            (
                [me, start - 1],
                f"owner: start time {start - 1} is not the joining process's ({start})",
            ),
        ):
            hello = {"instance_id": "claim-pod-1", "function": None, "owner": owner}
            assert join_once(node, hello) == {"error": "bad_join", "detail": detail}
        boot = join_once(
            node, {"instance_id": "claim-pod-2", "function": None, "owner": [me, start]}
        )
        assert boot["instance_id"] == "claim-pod-2" and "error" not in boot
    finally:
        node.stop()


# pid 1 of its own pid namespace (as a pod's runtime): joins claiming the given pid and its own
# start time (+ the given offset); prints the agent's reply
_IN_OWN_NS = """
import json, socket, sys
from hearth.dataplane.segment import _my_start
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
owner = [int(sys.argv[3]), _my_start() + int(sys.argv[4])]
s.sendall(json.dumps({"instance_id": sys.argv[2], "function": None, "owner": owner}).encode() + b"\\n")
print(s.makefile().readline(), end="", flush=True)
"""


@needs_unshare
def test_a_pod_in_its_own_pid_namespace_is_checked_by_its_pid_there(tmp_path, redis_url):
    """The agent sees the joining process under another pid; its claim is checked against its
    pid in its own namespace (NSpid's last field: 1), as its slots name it."""
    node = join_node(tmp_path, redis_url)
    try:

        def claim(iid: str, pid: int, start_offset: int) -> dict:
            out = subprocess.run(
                [*IN_OWN_PID_NS, _IN_OWN_NS, str(node.sock_dir / JOIN_SOCKET), iid]
                + [str(pid), str(start_offset)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            return json.loads(out.stdout)

        reply = claim("ns-pod-1", 2, 0)
        assert reply == {
            "error": "bad_join",
            "detail": "owner: pid 2 is not the joining process's (pid 1 in its pid namespace)",
        }
        reply = claim("ns-pod-2", 1, 1)
        assert reply["error"] == "bad_join" and reply["detail"].startswith("owner: start time")
        reply = claim("ns-pod-3", 1, 0)  # what it is: admitted
        assert reply["instance_id"] == "ns-pod-3" and "error" not in reply
    finally:
        node.stop()


def test_a_claim_that_cannot_be_checked_may_not_name_a_process_of_the_agents_namespace():
    """A peer in a pid namespace the agent cannot see into (a pod beside the agent's pod) is
    pid 0 to SO_PEERCRED: its claim is taken unless it names a live process of the agent's own
    namespace (with that pid and start time), which it cannot be."""
    hidden = PeerView(0)
    assert claim_refusal((1, 500), hidden, None) is None  # no such pid here
    assert claim_refusal((1, 500), hidden, 7) is None  # pid 1 here is another process
    assert claim_refusal((1234, 500), hidden, 500) == (
        "owner: [1234, 500] is a process of the node agent's pid namespace, not the joining one"
    )
    # a peer it sees whose /proc entry is gone (it exited) cannot be checked: refused
    assert "could not be read" in (claim_refusal((5, 1), PeerView(77), None) or "")


def test_join_connections_are_bounded(tmp_path, redis_url):
    """At most HEARTH_MAX_JOINED join connections are open at once; one more is refused with
    a clear error, and a place is free again once a connection closes."""
    node = join_node(tmp_path, redis_url, {"HEARTH_MAX_JOINED": "2"})
    held: list[socket.socket] = []
    try:
        for i in range(2):
            boot, s = join_open(node, {"instance_id": f"cap-pod-{i}", "function": None})
            held.append(s)
            assert boot["instance_id"] == f"cap-pod-{i}"
        reply, s = join_open(node, {"instance_id": "cap-pod-2", "function": None})
        s.close()
        assert reply == {
            "error": "join_limit",
            "detail": "this node agent has 2 join connections open, as many as it allows "
            "(HEARTH_MAX_JOINED)",
        }
        held.pop().close()  # one leaves: a place is free (once the agent has seen it go)

        def joins() -> bool:
            reply, s = join_open(node, {"instance_id": "cap-pod-3", "function": None})
            held.append(s)
            return reply.get("instance_id") == "cap-pod-3"

        wait_for(joins, 30, "a join once a place is free")
    finally:
        for s in held:
            s.close()
        node.stop()


def test_a_pod_refused_before_it_sent_its_hello_reads_why(tmp_path, redis_url):
    """The agent refuses a join past its bound as soon as it accepts the connection, before it
    reads the hello, and closes it. A pod whose hello comes after that close (descheduled
    between connect and send: seen once under load) must still report the agent's reason.
    Before: `join` raised BrokenPipeError (the pod's log: "cannot join the node agent ...
    Broken pipe"). The hello is sent here once the agent has surely hung up."""
    import select

    from hearth.runtime.pod import connect, join_on

    node = join_node(tmp_path, redis_url, {"HEARTH_MAX_JOINED": "1"})
    held: list[socket.socket] = []
    try:
        boot, s = join_open(node, {"instance_id": "early-pod-0", "function": None})
        held.append(s)
        assert boot["instance_id"] == "early-pod-0"
        late = connect(str(node.sock_dir))
        held.append(late)
        p = select.poll()
        p.register(late, select.POLLRDHUP)
        assert p.poll(30_000), "the agent did not hang up on a join past its bound"
        with pytest.raises(RuntimeError, match="join refused: .*HEARTH_MAX_JOINED"):
            join_on(late, "early-pod-1", None)
    finally:
        for s in held:
            s.close()
        node.stop()


def test_a_claim_that_cannot_be_checked_is_refused_naming_why():
    """getsockopt or /proc failing (here: the connection's socket already closed) gives a
    bad_join detail, not an exception that ends the join handler with a traceback."""
    from hearth.agent.peer import check_claim

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    a.close()
    why = check_claim((os.getpid(), 1), a)
    assert why is not None and why.startswith("owner: the joining process could not be checked (")


def test_the_join_bound_must_fit_the_descriptor_limit():
    """Each join connection is a descriptor: a node agent raises its soft RLIMIT_NOFILE to the
    hard limit and keeps room for HEARTH_MAX_JOINED joins and its own descriptors (a join past
    it failed with EMFILE, not `join_limit`). Where that does not fit, a node whose instances
    are pods refuses to start; any other node lowers its join bound to what fits and says so."""
    assert AGENT_OWN_FDS == 1024
    assert fd_plan(1024, 4096, 256) == FdPlan(4096, 256)  # raised to the hard limit
    assert fd_plan(1000, 1280, 256, pods=True) == FdPlan(1280, 256)  # just enough
    short = (
        "HEARTH_MAX_JOINED=256 join connections and 1024 descriptors of the node agent's own "
        "need 1280 open files, but the hard RLIMIT_NOFILE is 1279"
    )
    with pytest.raises(StartupError) as e:
        fd_plan(1000, 1279, 256, pods=True)
    assert str(e.value) == (
        f"{short}: raise it (ulimit -Hn, a container's nofile limit) or lower HEARTH_MAX_JOINED"
    )
    assert fd_plan(1000, 1279, 256) == FdPlan(
        1279,
        255,
        f"{short}: at most 255 join connections at once on this node (raise the "
        "hard limit for more)",
        "the hard RLIMIT_NOFILE of 1279, less 1024 descriptors of its own; "
        "HEARTH_MAX_JOINED=256 does not fit",
    )
    low = fd_plan(1024, 1024, 256)  # `ulimit -Hn 1024`: runs, every join refused
    assert (low.soft, low.max_joined) == (1024, 0) and low.warning
    assert fd_plan(1000, 1279, 200, pods=True) == FdPlan(1279, 200)  # fewer joins fit
    assert fd_plan(100, 200, None) == FdPlan(200, None)  # the front gateway: no joins
    # an infinite hard limit (not on Linux: fs.nr_open bounds it): a finite soft one, raised
    assert fd_plan(2048, -1, 256, infinity=-1) == FdPlan(NOFILE_CEILING, 256)
    assert fd_plan(512, -1, None, infinity=-1) == FdPlan(NOFILE_CEILING, None)


def test_a_pods_node_whose_descriptor_limit_is_too_low_for_its_joins_refuses_to_start(
    tmp_path, redis_url
):
    """`hearth up` with HEARTH_INSTANCES=pods (its instances can only join) under a hard limit
    of 1100 descriptors with the default bound (256 joins): a one-line error naming both
    numbers and exit code 1, before it starts anything."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, 1100))

    env = {k: v for k, v in os.environ.items() if k != "HEARTH_MAX_JOINED"}
    env.update(
        HEARTH_STATE_DIR=str(tmp_path / "state"),
        HEARTH_REDIS_URL=redis_url,
        HEARTH_INSTANCES="pods",
    )
    out = subprocess.run(
        [sys.executable, "-m", "hearth.cli", "up"],
        env=env,
        preexec_fn=low_limit,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert (
        "HEARTH_MAX_JOINED=256 join connections and 1024 descriptors of the node agent's own "
        "need 1280 open files, but the hard RLIMIT_NOFILE is 1100" in out.stderr + out.stdout
    )
    assert "Traceback" not in out.stderr


def test_a_node_under_a_low_descriptor_limit_runs_with_fewer_joins(tmp_path, redis_url):
    """Any other node (its own instances; pods may still join) under a hard limit of 1026:
    it serves, its log names the numbers, and its join bound is the 2 joins that fit -- a
    third is refused with `join_limit`, not met with EMFILE (before: it refused to start)."""
    node = join_node(tmp_path, redis_url, {"HEARTH_MAX_JOINED": "256"}, nofile=1026)
    held: list[socket.socket] = []
    try:
        assert node.client.request("GET", "/healthz", ok=(200,)) is not None
        assert (
            "need 1280 open files, but the hard RLIMIT_NOFILE is 1026: at most 2 join "
            "connections at once on this node" in node.log_path.read_text()
        )
        for i in range(2):
            boot, s = join_open(node, {"instance_id": f"low-pod-{i}", "function": None})
            held.append(s)
            assert boot["instance_id"] == f"low-pod-{i}"
        reply, s = join_open(node, {"instance_id": "low-pod-2", "function": None})
        held.append(s)
        assert reply == {  # names the limit that lowered the bound, not the setting's 256
            "error": "join_limit",
            "detail": "this node agent has 2 join connections open, as many as it allows "
            "(the hard RLIMIT_NOFILE of 1026, less 1024 descriptors of its own; "
            "HEARTH_MAX_JOINED=256 does not fit)",
        }
    finally:
        for s in held:
            s.close()
        node.stop()
