"""One Hearth set of the round benchmark: a server process, client processes, N rounds.

Round time: from the coordinator's "go" to the last client holding the model
(``time.monotonic``, one clock for all processes). Between rounds (never during one): memory
bandwidth samples and, for TCP sets, the same updates sent to a bare socket.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
import uuid
from pathlib import Path

from fedavg.exactness import exact_model, max_rel_err, model_arrays
from fedavg.flower_app import app_module
from fedavg.procfs import descendants
from fedavg.references import BandwidthProbe, BareSink
from fedavg.round_clients import client_proc
from fedavg.round_server import server_proc
from fedavg.sizes import FAN_IN


def recv(conn, timeout: float, what: str):
    """The next message on a process's pipe; an ``("error", ...)`` message raises."""
    if not conn.poll(timeout):
        raise TimeoutError(f"waited {timeout}s for {what}")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"while waiting for {what}: {msg[1]}")
    return msg


def update_bytes(m, n: int, params: int) -> int:
    """The packed size of client 0's update (every client's has the same layout)."""
    from hearth.functions.fedavg import wire

    _bufs, total = wire.update_iov(
        [(str(j), a) for j, a in enumerate(m.update_arrays(0, params))],
        m.num_examples(n, 1),
        round=1,
        client="c0",
    )
    m._CACHE.clear()
    return total


class HearthSet:
    """A server process and ``procs`` client processes (spawned), driven over pipes."""

    def __init__(
        self,
        n: int,
        params: int,
        app_dir: Path,
        bridge: bool,
        procs: int,
        shm: bool,
        in_place: bool,
        probe: BandwidthProbe | None,
        handover: bool,
    ):
        self.n, self.params, self.app_dir, self.bridge = n, params, app_dir, bridge
        self.procs, self.shm, self.in_place = procs, shm, in_place
        self.probe, self.handover = probe, handover
        self.errors: list[str] = []
        self.sink: BareSink | None = None

    def _start(self) -> None:
        """The server first (on glibc's heap), then the clients, each connected when it ends."""
        ctx = mp.get_context("spawn")
        self.sp, sc = ctx.Pipe()
        token = "bench-round-token-" + uuid.uuid4().hex
        os.environ["PYTHONMALLOC"] = "malloc"  # the server's objects on glibc's kept heap
        self.server = ctx.Process(
            target=server_proc,
            args=(sc, self.n, self.params, str(self.app_dir), FAN_IN, token, self.handover),
        )
        self.server.start()
        os.environ.pop("PYTHONMALLOC", None)
        _, addr, self.rss_base, self.spid = recv(self.sp, 300, "the server to start")
        k = min(self.procs, self.n)
        groups = [list(range(self.n))[g::k] for g in range(k)]
        self.clients = []
        for ids in groups:
            a, b = ctx.Pipe()
            p = ctx.Process(
                target=client_proc,
                args=(
                    b,
                    addr,
                    ids,
                    self.params,
                    str(self.app_dir),
                    self.bridge,
                    token,
                    self.shm,
                    self.in_place,
                ),
            )
            p.start()
            self.clients.append((p, a))
        for _p, a in self.clients:
            recv(a, 300, "the clients to connect")

    def _pids(self) -> set[int]:
        return {self.spid, *(p.pid for p, _ in self.clients)} | descendants(os.getpid())

    def references(self, rnd: int) -> dict:
        """Bandwidth samples now and, for TCP sets, one transfer to the bare socket."""
        out: dict = {"bw_gbps": self.probe.probe() if self.probe is not None else []}
        if self.sink is not None:

            def go(port: int) -> None:
                for _p, a in self.clients:
                    a.send(("bare", port, rnd))

            out["bare_gbps"] = self.sink.run(go)
            for _p, a in self.clients:
                recv(a, 120, "the bare-socket senders")
        return out

    def _round(self, m, rnd: int, rounds: int, before: dict) -> tuple[dict, dict, list | None]:
        """Round ``rnd``: its row, the references taken after it, and (digest rounds) the
        model the clients got."""
        digest = rnd in (1, rounds)
        t_go = time.monotonic()
        for _p, a in self.clients:
            a.send(("go", rnd, digest))
        replies = [recv(a, 600, f"round {rnd}") for _p, a in self.clients]
        t_end = max(r[1] for r in replies)
        self.sp.send(("wait", rnd))
        _, st, held = self.sp.recv()
        digests = {}
        payload = None
        for r in replies:
            digests.update(r[2])
            payload = payload or r[3]
            self.errors.extend(r[4])
        row = {"round": rnd, "s": t_end - t_go, "server": st, "slots_held_after": held}
        after = self.references(rnd)
        # this round's references: the samples taken right before and right after it
        row["bw_gbps"] = statistics.median(before["bw_gbps"] + after["bw_gbps"] or [0.0])
        row["bw_samples"] = before["bw_gbps"] + after["bw_gbps"]
        if self.sink is not None:
            row["bare_gbps"] = (before["bare_gbps"] + after["bare_gbps"]) / 2
        got = None
        if digest and payload is not None:
            want = exact_model(m, self.n, self.params, rnd)
            got = model_arrays(payload)
            row["max_rel_err_vs_exact"] = max_rel_err(got, want)
            row["all_clients_same_model"] = (
                len(set(digests.values())) == 1 and len(digests) == self.n
            )
        return row, after, got

    def _stop(self, res: dict) -> None:
        """Stop every process (the server last: its peak RSS and slots are read as it stops)."""
        for _p, a in self.clients:
            try:
                a.send(("stop",))
                recv(a, 60, "a client process to stop")
            except (OSError, EOFError, TimeoutError, RuntimeError):
                pass
        try:
            self.sp.send(("stop",))
            _, hwm, used, _threads = recv(self.sp, 60, "the server to stop")
            res["server_peak_rss"] = hwm
            res["server_rss_base"] = self.rss_base
            res["pool_slots_used_after_close"] = used
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        for p in [self.server, *(p for p, _ in self.clients)]:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    def run(self, rounds: int) -> dict:
        """Start the processes, run ``rounds`` rounds with their references, stop everything."""
        self._start()
        n, params = self.n, self.params
        m = app_module(self.app_dir)
        res: dict = {
            "clients": n,
            "params": params,
            "bridge": self.bridge,
            "shm": self.shm,
            "rounds": [],
        }
        res["in_place"] = self.in_place
        pids_after_r1: set[int] = set()
        self.sink = None if self.shm else BareSink(n, update_bytes(m, n, params))
        try:
            before = self.references(0)
            res["references_before_round1"] = before
            for rnd in range(1, rounds + 1):
                row, before, got = self._round(m, rnd, rounds, before)
                if rnd == 1 and got is not None:
                    res["round1_model"] = got
                res["rounds"].append(row)
                if rnd == 1:
                    pids_after_r1 = self._pids()
            res["new_processes_after_round1"] = len(self._pids() - pids_after_r1)
        finally:
            self._stop(res)
        res["errors"] = self.errors
        return res


def hearth_set(
    n: int,
    params: int,
    rounds: int,
    app_dir: Path,
    bridge: bool,
    procs: int,
    shm: bool,
    in_place: bool = False,
    probe: BandwidthProbe | None = None,
    handover: bool = False,
) -> dict:
    """One set: a server process and ``procs`` client processes, ``rounds`` rounds. Between
    rounds (never during one): memory-bandwidth samples, and for TCP sets a transfer of the
    same updates to a bare socket (:class:`BareSink`)."""
    return HearthSet(n, params, app_dir, bridge, procs, shm, in_place, probe, handover).run(rounds)
