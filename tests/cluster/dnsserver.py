"""A small authoritative DNS server for the cluster tests, run in a container of the image on the
cluster network: a container started with `--dns <its address>` resolves through it with its own
resolver (glibc, /etc/resolv.conf), as it would through podman's aardvark-dns or a Kubernetes
cluster DNS. The test can make it fall silent, as those do for seconds after a container is
killed (measured 2026-12-06 with podman 4.3 / aardvark-dns 1.4: lookups of every name on the
network, the live ones too, took 40 s and failed for ~10 s after a `podman kill`).

    box = DnsServer.start(cluster, {"agent-a": ip_a})   # A records; other names: NXDOMAIN
    box.mute()                                          # no answer to any query
    box.answer()                                        # answers again

Queries arrive on UDP port 53; "mute" / "answer" datagrams on CONTROL_PORT switch it (only the
test process sends them, over the private cluster network)."""

from __future__ import annotations

import json
import socket

CONTROL_PORT = 5300

# Run as `python -c SERVER` in the container; RECORDS (JSON name -> IPv4) comes from the env.
SERVER = r"""
import json, os, select, socket, struct
records = json.loads(os.environ["RECORDS"])
q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); q.bind(("0.0.0.0", 53))
ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); ctl.bind(("0.0.0.0", CONTROL_PORT))
muted, dropped = False, 0
print("dns: serving", sorted(records), flush=True)
while True:
    ready, _, _ = select.select([q, ctl], [], [])
    if ctl in ready:
        cmd, peer = ctl.recvfrom(64)
        if cmd in (b"mute", b"answer"):
            muted = cmd == b"mute"
            print("dns:", cmd.decode(), flush=True)
        ctl.sendto(b"ok %d" % dropped, peer)
    if q not in ready:
        continue
    msg, peer = q.recvfrom(512)
    if muted:
        dropped += 1
        continue
    if len(msg) < 12:
        continue
    # the question: labels, then type and class
    i, labels = 12, []
    while i < len(msg) and msg[i]:
        labels.append(msg[i + 1 : i + 1 + msg[i]].decode("ascii", "replace")); i += 1 + msg[i]
    qtype = struct.unpack("!H", msg[i + 1 : i + 3])[0]
    question = msg[12 : i + 5]
    ip = records.get(".".join(labels).lower())
    flags = 0x8400 if ip is not None else 0x8403  # response, authoritative; NXDOMAIN if unknown
    answers = b""
    if ip is not None and qtype == 1:  # A; other types: an empty answer (no IPv6 here)
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(ip)
    head = msg[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
    q.sendto(head + question + answers, peer)
""".replace("CONTROL_PORT", str(CONTROL_PORT))


class DnsServer:
    def __init__(self, cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name

    @classmethod
    def start(cls, cluster, records: dict[str, str], name: str = "dns") -> DnsServer:
        env = {"RECORDS": json.dumps(records)}
        cluster.run(name, "dns", ["python", "-c", SERVER], env)
        server = cls(cluster, name)
        cluster.wait(lambda: server._send(b"answer") >= 0, what="the test DNS server", timeout=60)
        return server

    @property
    def ip(self) -> str:
        return self.cluster.boxes[self.name].ip

    def _send(self, cmd: bytes) -> int:
        """Send a command; the number of queries dropped so far (while muted)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(cmd, (self.ip, CONTROL_PORT))
            reply = s.recv(64).split()
        assert reply[0] == b"ok", reply
        return int(reply[1])

    def mute(self) -> None:
        self._send(b"mute")

    def answer(self) -> None:
        self._send(b"answer")

    @property
    def dropped(self) -> int:
        """Queries that got no answer (sent while muted)."""
        return self._send(b"stats")
