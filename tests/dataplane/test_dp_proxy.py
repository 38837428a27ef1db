"""Proxy daemon + endpoints, the same suite in eBPF and AF_UNIX mode (real sockets, processes)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import uuid

import dp_workers
import numpy as np
import pytest
from dp_helpers import skip_unless_ebpf, start_daemon_process, wait_for
from hearth.dataplane.async_endpoint import AsyncEndpoint
from hearth.dataplane.descriptor import (
    MAX_FRAMES,
    PROXY_ID,
    SIZE,
    Descriptor,
    Kind,
    Status,
    new_corr,
)
from hearth.dataplane.endpoint import (
    Endpoint,
    RegistrationError,
    proxy_mode,
    proxy_stats,
)
from hearth.proxies.daemon import ProxyDaemon

CTX = mp.get_context("spawn")


def test_control_socket_is_owner_only_and_reports_mode(proxy, mode):
    assert stat.S_IMODE(os.stat(proxy.socket_path).st_mode) == 0o600
    assert proxy_mode(proxy.socket_path) == mode
    st = proxy_stats(proxy.socket_path)
    assert st["mode"] == mode and st["endpoints"] == []


def test_send_recv_between_endpoints(proxy, mode):
    with Endpoint.register(proxy.socket_path, 1) as a, Endpoint.register(proxy.socket_path, 2) as b:
        assert a.mode == b.mode == mode
        d = Descriptor(dst=2, src=1, slot=3, gen=4, length=5, corr=new_corr(), aux=6).stamp()
        a.send(d)
        assert b.recv(timeout=10) == d
        b.send(d.reply())
        r = a.recv(timeout=10)
        assert (r.kind, r.corr, r.dst) == (Kind.REPLY, d.corr, 1)
        with pytest.raises(TimeoutError):
            a.recv(timeout=0.05)


def test_back_to_back_messages_are_never_merged(proxy, mode):
    """Many descriptors from another process, read with exact 64-byte reads, in order."""
    n = 3000
    ep = Endpoint.register(proxy.socket_path, 20)
    parent, child = CTX.Pipe()
    pr = CTX.Process(target=dp_workers.send_burst, args=(proxy.socket_path, 21, 20, n, child))
    pr.start()
    assert parent.recv() == "registered"
    parent.send("go")
    got = [ep.recv(timeout=20) for _ in range(n)]
    assert [d.aux for d in got] == list(range(n))
    assert all(d.length == d.aux and d.src == 21 and d.kind == Kind.EVENT for d in got)
    assert parent.recv() == "sent"
    parent.send("bye")
    pr.join(10)
    ep.close()


def test_counters_match_messages_sent(proxy, mode):
    with Endpoint.register(proxy.socket_path, 5) as a, Endpoint.register(proxy.socket_path, 6) as b:
        for _ in range(250):
            a.send(Descriptor(dst=6, src=5, length=1000))
        for _ in range(40):
            b.send(Descriptor(dst=5, src=6, length=7))
        for _ in range(250):
            b.recv(timeout=10)
        for _ in range(40):
            a.recv(timeout=10)
        st = proxy_stats(proxy.socket_path)
        assert st["mode"] == mode
        assert st["per_dst"]["6"] == {"msgs": 250, "bytes": 250_000}
        assert st["per_dst"]["5"] == {"msgs": 40, "bytes": 280}
        if mode == "ebpf":
            # the kernel redirected every descriptor; the daemon process relayed none
            assert st["daemon_relayed"] == 0
            raw = proxy.router.counters()
            assert raw[6]["msgs"] == 250 and raw[5]["msgs"] == 40


def test_descriptors_sent_together_arrive_one_by_one_and_are_counted(proxy, mode):
    """Under load senders put several descriptors for one destination in one message: each
    arrives as its own descriptor, in order, and the counters count descriptors and bytes."""
    with Endpoint.register(proxy.socket_path, 7) as a, Endpoint.register(proxy.socket_path, 8) as b:
        ds = [Descriptor(dst=8, src=7, length=100 + i, aux=i) for i in range(MAX_FRAMES)]
        a.send_frame(b"".join(d.pack() for d in ds[:10]))  # one sendmsg of 10
        a.send_frame(b"".join(d.pack() for d in ds[10:]))  # and one of the largest size
        first = b.recv(timeout=10)
        assert first.aux == 0
        got = [first] + [b.recv(timeout=10) for _ in range(MAX_FRAMES - 1)]
        assert [d.aux for d in got] == list(range(MAX_FRAMES))
        assert b.buffered() == 0
        with pytest.raises(TimeoutError):
            b.recv(timeout=0.05)
        st = proxy_stats(proxy.socket_path)
        want = {"msgs": MAX_FRAMES, "bytes": sum(100 + i for i in range(MAX_FRAMES))}
        assert st["per_dst"]["8"] == want
        if mode == "ebpf":
            assert st["daemon_relayed"] == 0  # the kernel routed both messages whole
        with pytest.raises(ValueError):
            a.send_frame(b"\0" * (SIZE * (MAX_FRAMES + 1)))  # more than one message may carry
        with pytest.raises(ValueError):
            a.send_frame(b"\0" * (SIZE + 1))  # not whole descriptors


async def test_async_send_many_one_message_per_destination(proxy, mode):
    a = await AsyncEndpoint.register(proxy.socket_path, 1)
    b = Endpoint.register(proxy.socket_path, 2)
    try:
        assert await a.send_many([Descriptor(dst=2, src=1, aux=i) for i in range(20)]) == []
        got = [(await asyncio.to_thread(b.recv, 10)).aux for _ in range(20)]
        assert got == list(range(20))
        with pytest.raises(ValueError):
            await a.send_many([Descriptor(dst=2, src=1), Descriptor(dst=3, src=1)])
        # an unknown destination is answered per descriptor (by the daemon in both modes)
        assert await a.send_many([Descriptor(dst=999, src=1, aux=i) for i in range(3)]) == []
        errs = [await a.recv(timeout=10) for _ in range(3)]
        assert [(e.status, e.aux) for e in errs] == [(Status.UNKNOWN_DST, 999)] * 3
    finally:
        await a.close()
        b.close()


def test_unknown_destination_returns_error_descriptor(proxy, mode):
    with Endpoint.register(proxy.socket_path, 1) as a:
        corr = new_corr()
        a.send(Descriptor(dst=424242, src=1, slot=9, gen=2, corr=corr))
        e = a.recv(timeout=10)
        assert e.kind == Kind.ERROR and e.status == Status.UNKNOWN_DST
        assert (e.src, e.dst, e.aux, e.corr, e.slot, e.gen) == (PROXY_ID, 1, 424242, corr, 9, 2)
        assert proxy_stats(proxy.socket_path)["unrouted"] == 1
        # the endpoint keeps working afterwards
        with Endpoint.register(proxy.socket_path, 2) as b:
            a.send(Descriptor(dst=2, src=1, aux=1))
            assert b.recv(timeout=10).aux == 1


def test_leaving_endpoint_route_is_deleted(proxy, mode):
    a = Endpoint.register(proxy.socket_path, 1)
    b = Endpoint.register(proxy.socket_path, 2)
    assert proxy_stats(proxy.socket_path)["endpoints"] == [1, 2]
    b.close()
    wait_for(lambda: proxy_stats(proxy.socket_path)["endpoints"] == [1], what="route removal")
    if mode == "ebpf":
        assert proxy.router.registered() == [1]
    a.send(Descriptor(dst=2, src=1))
    assert a.recv(timeout=10).status == Status.UNKNOWN_DST
    a.close()


def test_killed_instance_route_is_deleted(proxy, mode):
    parent, child = CTX.Pipe()
    pr = CTX.Process(target=dp_workers.register_and_hang, args=(proxy.socket_path, 33, child))
    pr.start()
    assert parent.recv() == "registered"
    assert 33 in proxy_stats(proxy.socket_path)["endpoints"]
    os.kill(pr.pid, signal.SIGKILL)
    pr.join(10)
    wait_for(lambda: 33 not in proxy_stats(proxy.socket_path)["endpoints"], what="route removal")
    # the id can be taken again (a replacement instance)
    Endpoint.register(proxy.socket_path, 33).close()


def test_duplicate_and_invalid_ids_are_refused(proxy, mode):
    with Endpoint.register(proxy.socket_path, 7):
        with pytest.raises(RegistrationError, match="already registered"):
            Endpoint.register(proxy.socket_path, 7)
    with pytest.raises(RegistrationError, match="id: endpoint id must be an integer"):
        Endpoint.register(proxy.socket_path, -1)


def test_ping_pong_with_another_process(proxy, mode):
    parent, child = CTX.Pipe()
    pr = CTX.Process(target=dp_workers.echo_server, args=(proxy.socket_path, 100, 50, child))
    pr.start()
    assert parent.recv() == "registered"
    with Endpoint.register(proxy.socket_path, 101) as ep:
        for i in range(50):
            ep.send(Descriptor(dst=100, src=101, kind=Kind.PING, aux=i, corr=new_corr()))
            r = ep.recv(timeout=10)
            assert (r.kind, r.aux, r.src) == (Kind.PONG, i, 100)
    assert parent.recv() == "done"
    pr.kill()
    pr.join(10)


def test_64mib_payload_through_the_proxy_is_zero_copy(proxy, mode, pool):
    """Producer process writes once; only the descriptor moves; our view is the slot's memory."""
    n = (64 << 20) // 4
    parent, child = CTX.Pipe()
    pr = CTX.Process(
        target=dp_workers.produce_array, args=(proxy.socket_path, pool.name, 50, 51, n, child)
    )
    pr.start()
    assert parent.recv() == "registered"
    with Endpoint.register(proxy.socket_path, 51) as ep:
        parent.send("go")
        d = ep.recv(timeout=30)
        assert d.kind == Kind.INVOKE and d.length == n * 4 and d.src == 50
        pool.adopt(d.slot, d.gen)
        arr = np.frombuffer(pool.payload(d), np.float32)
        assert np.shares_memory(arr, np.frombuffer(pool.slot(d.slot, d.gen).buf, np.uint8))
        assert arr.sum(dtype=np.float64) == n * (n - 1) / 2
        arr[-1] = 7.0  # visible to the producer: it is the same memory
        ep.send(d.reply(aux=1))
        kind, aux, last = parent.recv()
        assert (kind, aux, last) == (Kind.REPLY, 1, 7.0)
        pool.release(d.slot, d.gen)
    pr.join(10)
    assert pool.stats()["used"] == 0


async def test_async_endpoint(proxy, mode):
    a = await AsyncEndpoint.register(proxy.socket_path, 1)
    b = Endpoint.register(proxy.socket_path, 2)
    assert a.mode == mode
    for i in range(100):
        await a.send(Descriptor(dst=2, src=1, aux=i))
    assert [(await asyncio.to_thread(b.recv, 10)).aux for _ in range(100)] == list(range(100))
    for i in range(100):
        b.send(Descriptor(dst=1, src=2, aux=i))
    assert [(await a.recv(timeout=10)).aux for _ in range(100)] == list(range(100))
    with pytest.raises(TimeoutError):
        await a.recv(timeout=0.05)
    await a.send(Descriptor(dst=999, src=1))
    assert (await a.recv(timeout=10)).status == Status.UNKNOWN_DST
    await a.close()
    b.close()


@pytest.mark.parametrize("mode_", [pytest.param("ebpf", marks=pytest.mark.ebpf), "unix"])
def test_daemon_restart_endpoints_reregister(mode_, sockdir):
    """kill -9 the daemon process, start a new one: later messages still arrive."""
    skip_unless_ebpf(mode_)
    path = os.path.join(sockdir, "proxy.sock")
    proc = start_daemon_process(path, mode_)
    try:
        a = Endpoint.register(path, 1)
        b = Endpoint.register(path, 2)
        a.send(Descriptor(dst=2, src=1, aux=1))
        assert b.recv(timeout=10).aux == 1
        proc.kill()
        proc.wait(10)
        proc = start_daemon_process(path, mode_)  # removes the dead daemon's socket file
        wait_for(lambda: a.registrations == 2 and b.registrations == 2, what="re-registration")
        assert proxy_stats(path)["endpoints"] == [1, 2]
        for i in range(10):
            a.send(Descriptor(dst=2, src=1, aux=100 + i))
        assert [b.recv(timeout=10).aux for _ in range(10)] == list(range(100, 110))
        b.send(Descriptor(dst=1, src=2, aux=5))
        assert a.recv(timeout=10).aux == 5
        assert proxy_stats(path)["per_dst"]["2"]["msgs"] == 10
        a.close()
        b.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert not os.path.exists(path)  # a clean stop removes the control socket


def test_second_daemon_on_same_socket_is_refused(proxy, mode):
    with pytest.raises(RuntimeError, match="already serving"):
        ProxyDaemon(proxy.socket_path, "unix").start()


def test_cli_errors_are_one_line(sockdir):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth.proxies.daemon",
            "--socket",
            "/" + "x" * 120,
            "--mode",
            "unix",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: socket path too long")
    assert "Traceback" not in r.stderr


def test_auto_mode_picks_ebpf_when_root_with_bcc(sockdir):
    d = ProxyDaemon(os.path.join(sockdir, f"{uuid.uuid4().hex[:6]}.sock"), "auto").start_in_thread()
    try:
        from hearth.proxies.ebpf import ebpf_unavailable_reason

        # as root (CI) auto must pick eBPF; only a non-root run may fall back
        expected = (
            "ebpf" if os.geteuid() == 0 else ("unix" if ebpf_unavailable_reason() else "ebpf")
        )
        assert d.mode == expected and d.reason.startswith("auto")
    finally:
        d.stop()


def test_cli_shows_mode_and_counters(proxy, mode, pool):
    with Endpoint.register(proxy.socket_path, 1) as a, Endpoint.register(proxy.socket_path, 2) as b:
        for _ in range(3):
            a.send(Descriptor(dst=2, src=1, length=10))
            b.recv(timeout=10)
        cmd = [sys.executable, "-m", "hearth.cli", "dataplane"]
        r = subprocess.run(
            cmd + ["stats", "--socket", proxy.socket_path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"mode: {mode}")
        assert "dst 2: 3 msgs, 30 payload bytes" in r.stdout
    r = subprocess.run(cmd + ["pool", pool.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"slots": 14' in r.stdout
    r = subprocess.run(
        cmd + ["stats", "--socket", proxy.socket_path + ".missing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and r.stderr.startswith(
        f"error: no proxy daemon at {proxy.socket_path}.missing: is `hearth up` running?"
    )


def test_chain_gateway_a_b_passes_the_same_slot(proxy, mode, pool):
    """gateway -> A -> B: A forwards the descriptor (no copy); B's write is seen by the gateway."""
    n = (8 << 20) // 4
    pa, ca = CTX.Pipe()
    pb, cb = CTX.Pipe()
    a = CTX.Process(target=dp_workers.chain_hop, args=(proxy.socket_path, pool.name, 61, 62, ca))
    b = CTX.Process(target=dp_workers.chain_hop, args=(proxy.socket_path, pool.name, 62, None, cb))
    a.start()
    b.start()
    assert pa.recv() == pb.recv() == "registered"
    with Endpoint.register(proxy.socket_path, 60) as gw:
        src = np.arange(n, dtype=np.float32)
        slot = pool.put(src, meta={"dtype": "f4"})
        used_before = pool.stats()["used"]
        gw.send(slot.descriptor(dst=61, src=60, corr=new_corr()))
        kind, offset_in_slot = pa.recv()
        assert kind == "forwarded" and offset_in_slot == 64  # A's array is inside the slot
        kind, total = pb.recv()
        assert kind == "summed" and total == float(src.sum(dtype=np.float64))
        r = gw.recv(timeout=30)
        assert r.kind == Kind.REPLY and (r.slot, r.gen) == (slot.index, slot.gen)
        mine = np.frombuffer(pool.payload(r), np.float32)
        assert mine[0] == -42.0  # B wrote into the gateway's own pages: one slot end to end
        assert pool.stats()["used"] == used_before  # nobody allocated a copy
        pool.release(r.slot, r.gen)
    for p in (pa, pb):
        p.send("bye")
    a.join(10)
    b.join(10)


async def restart_daemon(proc: subprocess.Popen, path: str, mode_: str, *eps) -> subprocess.Popen:
    """Kill the proxy daemon, start a new one, wait until each endpoint has registered again."""
    proc.kill()
    proc.wait(10)
    proc = await asyncio.to_thread(start_daemon_process, path, mode_)
    t0 = asyncio.get_running_loop().time()
    while not all(ep.registrations == 2 for ep in eps):  # each re-registered
        if asyncio.get_running_loop().time() - t0 > 60:
            break
        await asyncio.sleep(0.02)
    assert [ep.registrations for ep in eps] == [2] * len(eps)
    return proc


@pytest.mark.parametrize("mode_", [pytest.param("ebpf", marks=pytest.mark.ebpf), "unix"])
async def test_async_endpoint_reregisters_after_daemon_restart(mode_, sockdir):
    skip_unless_ebpf(mode_)
    path = os.path.join(sockdir, "proxy.sock")
    proc = start_daemon_process(path, mode_)
    try:
        a = await AsyncEndpoint.register(path, 1)
        b = Endpoint.register(path, 2)
        await a.send(Descriptor(dst=2, src=1, aux=1))
        assert (await asyncio.to_thread(b.recv, 10)).aux == 1
        pending = asyncio.create_task(a.recv(timeout=30))  # blocked across the restart
        proc = await restart_daemon(proc, path, mode_, a, b)
        await a.send(Descriptor(dst=2, src=1, aux=2))
        assert (await asyncio.to_thread(b.recv, 10)).aux == 2
        b.send(Descriptor(dst=1, src=2, aux=3))
        assert (await pending).aux == 3
        await a.close()
        b.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_daemon_exits_when_parent_dies_or_socket_removed(sockdir):
    """A node agent that is kill -9'ed (or whose run dir is deleted) does not leak its daemon."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    path = os.path.join(sockdir, "p1.sock")
    d1 = subprocess.Popen(
        [sys.executable, "-m", "hearth.proxies.daemon", "--socket", path, "--mode", "unix",
         "--parent-pid", str(parent.pid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert "mode=unix" in d1.stdout.readline()
    parent.kill()
    parent.wait(10)
    assert d1.wait(15) == 0
    assert not os.path.exists(path)
    d2 = start_daemon_process(os.path.join(sockdir, "p2.sock"), "unix")
    os.unlink(os.path.join(sockdir, "p2.sock"))
    assert d2.wait(15) == 0


@pytest.mark.parametrize("mode_", [pytest.param("ebpf", marks=pytest.mark.ebpf), "unix"])
def test_register_with_bad_pid_is_refused_and_leaves_nothing(mode_, sockdir):
    import socket as _socket

    from hearth.dataplane import control
    from hearth.dataplane.endpoint import Endpoint
    from hearth.proxies.daemon import ProxyDaemon

    skip_unless_ebpf(mode_)
    d = ProxyDaemon(os.path.join(sockdir, "p.sock"), mode_).start_in_thread()
    try:
        s, _ = control.connect(d.socket_path)
        a, b = _socket.socketpair()
        try:
            control.send_msg(
                s, {"op": "register", "id": 77, "pid": "abc"}, [a.fileno(), b.fileno()]
            )
            reply = control.recv_msg(s)
        finally:
            for x in (a, b, s):
                x.close()
        assert reply["ok"] is False and "pid" in reply["error"]
        assert control.request(d.socket_path, {"op": "stats"})["endpoints"] == []
        ep = Endpoint.register(d.socket_path, 77)  # the id is still free
        ep.close()
    finally:
        d.stop()


def test_an_endpoint_registered_ahead_serves_the_process_it_is_handed_to(proxy, mode):
    """What the node agent does for cold starts: register an endpoint, hand its two sockets to
    another process (which builds it with Endpoint.from_fds, no round trip to the daemon) and
    close its own copies. The route is the new holder's, and it ends when that process exits."""
    from hearth.dataplane.endpoint import open_registration

    child_code = (
        "import sys\n"
        "from hearth.dataplane.endpoint import Endpoint\n"
        "ctrl, data, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
        "ep = Endpoint.from_fds(sys.argv[4], 9, ctrl, data, mode)\n"
        "d = ep.recv(timeout=20)\n"
        "ep.send(d.reply())\n"
    )
    ctrl, data, got_mode = open_registration(proxy.socket_path, 9, 5.0)
    assert got_mode == mode
    with Endpoint.register(proxy.socket_path, 1) as a:
        d = Descriptor(dst=9, src=1, slot=3, gen=4, corr=new_corr()).stamp()
        a.send(d)  # queued on the endpoint's socket before its process even runs
        fds = (ctrl.fileno(), data.fileno())
        child = subprocess.Popen(
            [sys.executable, "-c", child_code, str(fds[0]), str(fds[1]), mode, proxy.socket_path],
            pass_fds=fds,
        )
        ctrl.close()  # the child holds the registration now
        data.close()
        r = a.recv(timeout=20)
        assert (r.kind, r.corr, r.src) == (Kind.REPLY, d.corr, 9)
        assert child.wait(20) == 0
        # the holder exited: the daemon dropped the route, the next send bounces
        wait_for(lambda: proxy_stats(proxy.socket_path)["endpoints"] == [1], what="route removal")
        a.send(Descriptor(dst=9, src=1, corr=new_corr()).stamp())
        assert a.recv(timeout=10).status == Status.UNKNOWN_DST


@pytest.mark.parametrize("mode_", [pytest.param("ebpf", marks=pytest.mark.ebpf), "unix"])
async def test_async_endpoint_read_into_gets_every_descriptor_across_a_daemon_restart(
    mode_, sockdir
):
    """The agent's reader: descriptors reach the callback from the loop's reader callback, in
    order, several per read; an unknown destination comes back as an ERROR; a daemon restart
    moves the reading on to the new registration."""
    skip_unless_ebpf(mode_)
    path = os.path.join(sockdir, "proxy.sock")
    proc = start_daemon_process(path, mode_)
    got: list[Descriptor] = []
    arrived = asyncio.Event()

    def on(d: Descriptor) -> None:
        got.append(d)
        arrived.set()

    async def wait_count(n: int) -> None:
        for _ in range(500):
            if len(got) >= n:
                return
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), 0.02)
            except TimeoutError:
                pass
        raise AssertionError(f"{len(got)} of {n} descriptors arrived: {got}")

    try:
        a = await AsyncEndpoint.register(path, 1)
        a.read_into(on)
        b = Endpoint.register(path, 2)
        b.send_frame(b"".join(Descriptor(dst=1, src=2, aux=i).pack() for i in range(3)))
        await wait_count(3)
        assert [d.aux for d in got] == [0, 1, 2] and all(d.src == 2 for d in got)
        await a.send(Descriptor(dst=99, src=1, corr=b"x" * 16))
        await wait_count(4)
        assert got[3].status == Status.UNKNOWN_DST and bytes(got[3].corr) == b"x" * 16
        proc = await restart_daemon(proc, path, mode_, a, b)
        b.send(Descriptor(dst=1, src=2, aux=7))
        await wait_count(5)
        assert got[4].aux == 7
        await a.close()
        b.close()
    finally:
        proc.terminate()
        proc.wait(10)
