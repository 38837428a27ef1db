"""Control protocol between endpoints and the per-node proxy daemon (AF_UNIX, 0600).

Frames are ``u32 little-endian length`` + a JSON object. On accept the daemon sends
``{"hello": "hearth-proxy", "mode": "ebpf"|"unix", "version": 1, "pid": P, "parent_pid": A}``
(its own pid and its node agent's, so a restarted node can tell its daemon from an old one).
Requests:

* ``{"op": "register", "id": N, "pid": P}`` with file descriptors attached (SCM_RIGHTS):
  eBPF mode ``[data_sock, peer_sock]`` of a loopback TCP pair (the daemon puts ``data_sock``
  in the SOCKHASH, closes its copy and keeps ``peer_sock`` for unroutable descriptors);
  unix mode ``[peer_sock]`` of an AF_UNIX socketpair (the daemon relays through it).
  Reply ``{"ok": true, "mode": ...}`` or ``{"ok": false, "error": "..."}``. The connection
  then stays open: when it closes, the daemon deletes the endpoint.
* ``{"op": "stats"}`` -> ``{"ok": true, "mode", "reason", "endpoints", "per_dst", ...}``.
* ``{"op": "mode"}`` -> ``{"ok": true, "mode", "reason"}``.
"""

from __future__ import annotations

import json
import socket
import struct

TYPE_CHECKING = False  # typing is not imported on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
_LEN = struct.Struct("<I")


class ProtocolError(ConnectionError):
    """The peer sent something that is not a control frame."""


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def send_msg(
    sock: socket.socket, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
) -> None:
    data = encode(obj)
    if fds:
        n = socket.send_fds(sock, [data], list(fds))
        if n < len(data):
            sock.sendall(data[n:])
    else:
        sock.sendall(data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("proxy control connection closed")
        got += k
    return bytes(buf)


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ProtocolError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        obj = json.loads(recv_exact(sock, n))
    except ValueError as e:
        raise ProtocolError(f"bad control frame: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    return obj


def split_frames(buf: bytearray) -> list[dict[str, Any]]:
    """Pop every complete frame from ``buf`` (daemon side, non-blocking reads)."""
    out = []
    while len(buf) >= 4:
        (n,) = _LEN.unpack_from(buf, 0)
        if n > MAX_FRAME:
            raise ProtocolError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
        if len(buf) < 4 + n:
            break
        body = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise ProtocolError(f"bad control frame: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("control frame is not a JSON object")
        out.append(obj)
    return out


def connect(path: str, timeout: float | None = 5.0) -> tuple[socket.socket, dict[str, Any]]:
    """Connect to the daemon's control socket and read its hello."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        hello = recv_msg(s)
        if hello.get("hello") != "hearth-proxy":
            raise ProtocolError(f"{path} is not a Hearth proxy daemon (hello {hello!r})")
        return s, hello
    except BaseException:
        s.close()
        raise


def probe(path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The hello of the daemon serving ``path``, or None when nobody listens there (no file, or
    the stale file of a dead daemon). ``peer_pid`` is added: the listener's pid as the kernel
    sees it from here (0 from another pid namespace). Raises OSError/ProtocolError when
    something accepts but does not greet like a proxy daemon in time."""
    try:
        s, hello = connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    try:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return {**hello, "peer_pid": struct.unpack("3i", creds)[0]}
    finally:
        s.close()


def request(path: str, obj: dict[str, Any], timeout: float | None = 5.0) -> dict[str, Any]:
    """One request/response on a fresh control connection."""
    s, _hello = connect(path, timeout)
    try:
        send_msg(s, obj)
        return recv_msg(s)
    finally:
        s.close()
