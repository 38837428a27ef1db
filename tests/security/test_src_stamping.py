"""H5: a descriptor's `src` is stamped by the data plane from the sender's registered socket,
in both modes: the AF_UNIX proxy daemon rewrites it while relaying, and in eBPF mode the SK_MSG
program rewrites it in the kernel (the daemon never sees those descriptors). Real daemon, real
sockets, and as root the real bcc-loaded program."""

from __future__ import annotations

import os
import tempfile

import pytest
from hearth.dataplane.descriptor import MAX_FRAMES, PROXY_ID, Descriptor, Kind
from hearth.dataplane.endpoint import Endpoint, proxy_stats
from hearth.proxies.daemon import ProxyDaemon
from hearth.proxies.ebpf import ebpf_unavailable_reason


@pytest.fixture(params=[pytest.param("ebpf", marks=pytest.mark.ebpf), "unix"])
def proxy(request):
    mode = request.param
    if mode == "ebpf" and (why := ebpf_unavailable_reason()):
        if os.geteuid() == 0:  # as root `make test` installs bcc: a broken install fails
            pytest.fail(f"running as root but eBPF does not load: {why}")
        pytest.skip(f"eBPF mode needs root: {why}")
    with tempfile.TemporaryDirectory(prefix="hsrc-") as d:
        p = ProxyDaemon(os.path.join(d, "proxy.sock"), mode).start_in_thread()
        assert p.mode == mode
        yield p
        p.stop()


def test_a_forged_src_arrives_stamped_with_the_senders_true_id(proxy):
    path = proxy.socket_path
    with (
        Endpoint.register(path, 11) as liar,
        Endpoint.register(path, 22) as victim,
        Endpoint.register(path, 33) as target,
    ):
        # one descriptor posing as another instance, one posing as the proxy itself
        for forged in (22, PROXY_ID):
            liar.send(Descriptor(dst=33, src=forged, kind=Kind.INVOKE, aux=forged))
            got = target.recv(timeout=10)
            assert (got.aux, got.src) == (forged, 11)
        # several descriptors in one message: every one of them is stamped
        ds = [Descriptor(dst=33, src=22, kind=Kind.REPLY, aux=i) for i in range(MAX_FRAMES)]
        liar.send_frame(b"".join(d.pack() for d in ds))
        got = [target.recv(timeout=10) for _ in range(MAX_FRAMES)]
        assert [d.aux for d in got] == list(range(MAX_FRAMES))
        assert {d.src for d in got} == {11}
        # an honest sender keeps its id
        victim.send(Descriptor(dst=33, src=22, kind=Kind.INVOKE))
        assert target.recv(timeout=10).src == 22
        if proxy.mode == "ebpf":  # the kernel did it: the daemon relayed nothing
            assert proxy_stats(path)["daemon_relayed"] == 0


def test_a_message_past_the_stamped_bound_or_not_whole_descriptors_cannot_smuggle_a_src(proxy):
    """The kernel stamps at most MAX_FRAMES descriptors of a message: a longer message, or one
    that is not whole descriptors, must not deliver unstamped bytes (a forged src in a later
    descriptor, or a receiver's 64-byte framing shifted). eBPF drops it (the sender gets
    EACCES); the AF_UNIX daemon frames each sender's stream itself and stamps every frame."""
    path = proxy.socket_path
    with (
        Endpoint.register(path, 11) as liar,
        Endpoint.register(path, 22) as victim,
        Endpoint.register(path, 33) as target,
    ):
        forged = [Descriptor(dst=33, src=22, kind=Kind.REPLY, aux=i) for i in range(MAX_FRAMES + 1)]
        raw = b"".join(d.pack() for d in forged)
        sock = liar.data_socket
        refused = []
        for blob in (raw, raw[:100]):  # 65 descriptors in one write; 1 descriptor + 36 bytes
            try:
                sock.sendall(blob)
                refused.append(False)
            except PermissionError:
                refused.append(True)
        victim.send(Descriptor(dst=33, src=22, kind=Kind.INVOKE, aux=999))
        # eBPF: nothing of either message; unix: all 65, then the first of the 100 bytes
        expected = [] if proxy.mode == "ebpf" else [*range(MAX_FRAMES + 1), 0]
        got = [target.recv(timeout=10) for _ in range(len(expected) + 1)]
        honest = [d for d in got if d.aux == 999]
        assert [(d.src, d.kind) for d in honest] == [(22, Kind.INVOKE)]
        smuggled = [d for d in got if d.aux != 999]
        assert sorted(d.aux for d in smuggled) == sorted(expected)
        assert {d.src for d in smuggled} <= {11}
        assert refused == [proxy.mode == "ebpf"] * 2
        with pytest.raises(TimeoutError):  # and nothing else arrives (no garbled tail)
            target.recv(timeout=0.3)
