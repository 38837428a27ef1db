"""Checking the slot owner a pod claims when it joins against the process that connected.

The claim (`{"owner": [pid, start]}`: the joining process as its slots name it, pid in its own
pid namespace) keeps that owner's slots from `SlotPool.reclaim_dead` while the join connection is
open. Taken on trust, anything that reaches join.sock could keep any owner's slots -- a dead local
instance's, read from the shared slot table -- until the pool ran out. So the agent checks it with
what the kernel says of the connection: SO_PEERCRED's pid (as the agent's pid namespace sees the
peer), that process's pid in its own namespace (`/proc/<pid>/status`, the last field of `NSpid:`)
and its start time (`/proc/<pid>/stat`). Both must equal the claim.

A peer in a pid namespace that is neither the agent's nor below it -- a pod beside the agent's
pod on Kubernetes or under `podman kube play`, where the agent has no hostPID -- is pid 0 to
SO_PEERCRED (the kernel has no number for it here) and has no /proc entry the agent can read: its
claim cannot be checked. It is accepted unless it names a live process of the agent's own pid
namespace, which the peer cannot be. Such a peer shares the slot table's memory (it mounts the
same pool), so the claim gives it nothing it could not write there anyway; the number of joins
is bounded (`HEARTH_MAX_JOINED`)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from hearth.dataplane.segment import proc_start


@dataclass(frozen=True)
class PeerView:
    """What the agent sees of a join connection's process. `pid`: SO_PEERCRED's (0: in a pid
    namespace the agent cannot see into); `own_pid`: its pid in its own namespace and `start`:
    its start time (clock ticks since boot), None when /proc could not be read (it exited)."""

    pid: int
    own_pid: int | None = None
    start: int | None = None


def claim_refusal(claim: tuple[int, int], peer: PeerView, local_start: int | None) -> str | None:
    """Why the owner a joining process claims is refused (a `bad_join` detail), or None.
    `local_start`: the start time of the process with the claimed pid in the agent's own pid
    namespace (None: there is none)."""
    pid, start = claim
    if peer.pid > 0:
        if peer.own_pid is None or peer.start is None:
            return f"owner: the joining process (pid {peer.pid} here) could not be read in /proc"
        if pid != peer.own_pid:
            return (
                f"owner: pid {pid} is not the joining process's "
                f"(pid {peer.own_pid} in its pid namespace)"
            )
        if start != peer.start:
            return f"owner: start time {start} is not the joining process's ({peer.start})"
        return None
    if local_start is not None and local_start == start:
        return (
            f"owner: [{pid}, {start}] is a process of the node agent's pid namespace, "
            "not the joining one"
        )
    return None


def _own_pid(pid: int) -> int | None:
    """`pid` (of this pid namespace) in its own, innermost pid namespace: the last field of
    NSpid in /proc/<pid>/status (`pid` itself on a kernel without pid namespaces)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return pid


def read_peer(sock: Any) -> PeerView:
    """The process at the other end of the unix socket `sock`, as this agent can see it (had
    it exited and its pid been reused since it connected, the process read here started later:
    its start time does not match the claim)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    if pid <= 0:
        return PeerView(0)
    return PeerView(pid, _own_pid(pid), proc_start(pid))


def check_claim(claim: tuple[int, int], sock: Any) -> str | None:
    """`claim_refusal` for the process at the other end of `sock` (reads /proc). A failure to
    read either (a socket gone, /proc mounted with hidepid) refuses the claim, naming it."""
    try:
        peer = read_peer(sock)
        local = proc_start(claim[0]) if peer.pid == 0 else None
    except OSError as e:
        return f"owner: the joining process could not be checked ({e.strerror or e})"
    return claim_refusal(claim, peer, local)
