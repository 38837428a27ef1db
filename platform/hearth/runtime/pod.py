"""The entry point of an instance pod: join the node agent, then run as an ordinary instance.

`python -m hearth.runtime.pod` with
  HEARTH_NODE_SOCKET_DIR  the node's socket directory (hostPath; the agent's `join.sock` is there)
  HEARTH_INSTANCE_ID      this instance's id (the pod name)
  HEARTH_FUNCTION         the function to serve; unset for a generic warm-pool pod
  HEARTH_READY_FILE       written once the agent has the instance in its table (readiness probe)
The agent answers the join with the boot record a spawned instance gets in HEARTH_INSTANCE; the
runtime then registers its socket with the proxy and serves (hearth.runtime.instance). The join
connection stays open: when the agent closes it, the runtime exits at once; on SIGTERM the runtime
asks the agent over it to drain the instance.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

# the node agent's join socket in the node's socket directory (hearth.agent.join serves it);
# defined on this side so a pod's runtime imports nothing of the agent's
JOIN_SOCKET = "join.sock"


def join(sock_dir: str, instance_id: str, function: str | None, timeout: float = 30.0):
    """Connect and join; (boot record, the connection). Raises RuntimeError with the agent's
    reason when it refuses."""
    return join_on(connect(sock_dir, timeout), instance_id, function)


def connect(sock_dir: str, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(os.path.join(sock_dir, JOIN_SOCKET))
    return s


def join_on(s: socket.socket, instance_id: str, function: str | None):
    """`join` on a connected socket `s`."""
    from hearth.dataplane.segment import _Me, _my_start

    # how this process names itself in the slot table (pid and start time in its own pid
    # namespace): the agent keeps its slots while this connection is open (`reclaim_dead`)
    hello = {"instance_id": instance_id, "function": function, "owner": [_Me.pid, _my_start()]}
    try:
        s.sendall(json.dumps(hello).encode() + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        # the agent refuses some joins as soon as it accepts them (join_limit), before it reads
        # the hello, and closes: its reason is already here to read (else "Broken pipe")
        pass
    f = s.makefile("rb")
    line = f.readline()
    if not line:
        raise RuntimeError("the node agent closed the join connection")
    boot = json.loads(line)
    if "error" in boot:
        raise RuntimeError(f"join refused: {boot.get('detail') or boot['error']}")
    s.settimeout(None)
    return boot, s, f


def _life_line(f, ready_file: str | None) -> None:
    """Wait for `registered` (then write the ready file), and exit when the agent hangs up."""
    try:
        for line in f:
            if ready_file and json.loads(line).get("registered"):
                os.makedirs(os.path.dirname(ready_file) or ".", exist_ok=True)
                with open(ready_file, "w") as out:
                    out.write("registered\n")
    except (OSError, ValueError):
        pass
    os._exit(0)


def main() -> int:
    sock_dir = os.environ.get("HEARTH_NODE_SOCKET_DIR", "/run/hearth")
    iid = os.environ.get("HEARTH_INSTANCE_ID") or socket.gethostname()
    try:
        boot, conn, f = join(sock_dir, iid, os.environ.get("HEARTH_FUNCTION") or None)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"hearth pod: cannot join the node agent in {sock_dir}: {e}", file=sys.stderr)
        return 1
    threading.Thread(
        target=_life_line, args=(f, os.environ.get("HEARTH_READY_FILE")), daemon=True
    ).start()
    from hearth.runtime.instance import run_instance

    def leave() -> None:
        """SIGTERM (pod deletion, after preStop): ask the agent to drain us. It stops routing
        here, waits for in-flight invocations, then tells the runtime to exit; if that does not
        happen within the grace period, the kubelet's SIGKILL ends it."""
        try:
            conn.sendall(b'{"leave": true}\n')
        except OSError:
            os._exit(0)

    rc = run_instance(boot, leave=leave)
    conn.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
