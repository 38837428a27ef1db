"""bcc loader for ``sk_msg.c``: the SOCKHASH router and its per-destination counters.

bcc's Python ``Table`` has no SOCKHASH type, so sockets are inserted and removed through
``lib.bpf_update_elem`` / ``lib.bpf_delete_elem`` on the map fd (``lib.bpf_table_fd``).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from hearth.dataplane.descriptor import MAX_FRAMES

SOURCE = Path(__file__).with_name("sk_msg.c")


def ebpf_unavailable_reason() -> str | None:
    """Why eBPF mode cannot work here (None if it looks possible; loading is the real test)."""
    if os.geteuid() != 0:
        return "not root (eBPF mode needs CAP_BPF + CAP_NET_ADMIN)"
    try:
        import bcc  # noqa: F401
    except Exception as e:  # ImportError, or bcc's own errors when libbcc is missing
        return f"bcc is not importable: {e}"
    return None


def choose_mode(requested: str, max_endpoints: int) -> tuple[str, str, SockmapRouter | None]:
    """The daemon's mode (``ebpf`` or ``unix``), why, and the loaded router in eBPF mode.
    ``requested``: ``auto`` falls back to unix and says why; ``ebpf`` raises RuntimeError
    instead; ``unix`` never loads anything."""
    if requested == "unix":
        return "unix", "forced by configuration", None
    why = ebpf_unavailable_reason()
    if why is None:
        try:
            router = SockmapRouter(max_endpoints)
            reason = (
                "forced by configuration"
                if requested == "ebpf"
                else "auto: root and bcc loaded sk_msg.c"
            )
            return "ebpf", reason, router
        except Exception as e:  # bcc raises plain Exception on compile/load failure
            why = f"loading sk_msg.c failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    if requested == "ebpf":
        raise RuntimeError(f"eBPF mode requested but unavailable: {why}")
    return "unix", f"auto: {why}", None


class SockmapRouter:
    """The loaded program: insert/remove endpoint sockets, read counters."""

    def __init__(self, max_endpoints: int = 65536):
        from bcc import BPF, BPFAttachType, lib

        self._lib = lib
        self._BPF = BPF
        self._attach_type = BPFAttachType.SK_MSG_VERDICT
        self.bpf = BPF(
            src_file=str(SOURCE).encode(),
            cflags=[f"-DMAX_ENDPOINTS={max_endpoints}", f"-DMAX_FRAMES={MAX_FRAMES}"],
        )
        self._fn = self.bpf.load_func(b"sk_msg_prog", BPF.SK_MSG)
        self._map_fd = lib.bpf_table_fd(self.bpf.module, b"sock_hash")
        if self._map_fd < 0:
            raise RuntimeError("bcc: sock_hash map fd not found")
        BPF.attach_func(self._fn, self._map_fd, self._attach_type)
        self._endpoints = self.bpf[b"endpoints"]
        self._stats = self.bpf[b"dst_stats"]
        self._unrouted = self.bpf[b"unrouted"]
        self._src_fd = lib.bpf_table_fd(self.bpf.module, b"src_of")  # socket -> endpoint id
        if self._src_fd < 0:
            raise RuntimeError("bcc: src_of map fd not found")
        self._closed = False

    def insert(self, endpoint_id: int, sock_fd: int) -> None:
        """Put a connected TCP socket into the SOCKHASH under ``endpoint_id``, and give the
        socket that identity: the program stamps it as ``src`` on everything the socket sends."""
        fd, eid = ctypes.c_int(sock_fd), ctypes.c_uint32(endpoint_id)
        # socket-local storage is keyed by a socket fd from user space; it dies with the socket
        ret = self._lib.bpf_update_elem(
            ctypes.c_int(self._src_fd), ctypes.byref(fd), ctypes.byref(eid), 0
        )
        if ret < 0:
            err = ctypes.get_errno() or -ret
            raise OSError(err, f"identity of endpoint {endpoint_id}: {os.strerror(err)}")
        key = ctypes.c_uint32(endpoint_id)
        val = ctypes.c_int(sock_fd)
        ret = self._lib.bpf_update_elem(
            ctypes.c_int(self._map_fd), ctypes.byref(key), ctypes.byref(val), 0
        )
        if ret < 0:
            err = ctypes.get_errno() or -ret
            raise OSError(err, f"sockhash insert of endpoint {endpoint_id}: {os.strerror(err)}")
        self._endpoints[self._endpoints.Key(endpoint_id)] = self._endpoints.Leaf(1)

    def remove(self, endpoint_id: int) -> None:
        """Forget an endpoint (the LIFL bug was never doing this)."""
        try:
            del self._endpoints[self._endpoints.Key(endpoint_id)]
        except KeyError:
            pass
        key = ctypes.c_uint32(endpoint_id)
        self._lib.bpf_delete_elem(ctypes.c_int(self._map_fd), ctypes.byref(key))

    def registered(self) -> list[int]:
        return sorted(int(k.value) for k in self._endpoints.keys())

    def counters(self) -> dict[int, dict[str, int]]:
        """Per destination: messages redirected and payload bytes they named."""
        return {
            int(k.value): {"msgs": int(v.msgs), "bytes": int(v.bytes)}
            for k, v in self._stats.items()
        }

    def unrouted(self) -> int:
        return int(self._unrouted[0].value)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._BPF.detach_func(self._fn, self._map_fd, self._attach_type)
        except Exception:
            pass
        self.bpf.cleanup()
