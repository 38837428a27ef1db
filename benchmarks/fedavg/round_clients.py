"""The round benchmark's client processes: several clients each, one thread per client.

A process answers the coordinator's pipe: ``("go", rnd, digest)`` runs a round on every client
-> ``("done", last model time, digests, client 0's model if asked, errors)``; ``("bare", port,
rnd)`` sends every client's update to a bare socket instead (the ingestion reference) ->
``("bared",)``; ``("stop",)`` closes the clients -> ``("stopped",)``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from pathlib import Path

from fedavg.flower_app import app_module


class ClientGroup:
    """The clients of one process. Each command goes to every client's thread; the group
    answers once all of them have finished it."""

    def __init__(self, m, ids: list[int], params: int, bridge: bool, ups: dict, conns: dict):
        self.m, self.ids, self.params, self.bridge = m, ids, params, bridge
        self.ups, self.conns = ups, conns
        self.cmds: dict[int, list] = {i: [] for i in ids}
        self.cv = threading.Condition()
        self.done: dict[int, tuple] = {}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in ids]

    # -- one client's steps ------------------------------------------------------------------
    def _native(self, i: int, c, rnd: int, model):
        return c.round(self.ups[i], self.m.num_examples(i, rnd))

    def _via_bridge(self, i: int, c, rnd: int, model):
        from flwr.app import Context, RecordDict
        from hearth.functions.fedavg.flower_bridge import reply_update, train_message

        ctx = Context(0, i + 1, {"partition-id": i}, RecordDict(), {"params": self.params})
        layers, n = reply_update(self.m.app(train_message(model, rnd, i + 1, None), ctx))
        return c.round(layers, n)

    def _bare_send(self, i: int, port: int, rnd: int) -> None:
        from hearth.functions.fedavg import wire

        bufs, _total = wire.update_iov(
            self.ups[i], self.m.num_examples(i, rnd), round=rnd, client=f"c{i}"
        )
        s = socket.create_connection(("127.0.0.1", port))
        wire.tune(s)
        wire.send_iov(s, bufs)  # as RoundClient.send_update does, less the 16-byte frame
        s.recv(1)
        s.close()

    def _finished(self, i: int, entry: tuple, error: str | None = None) -> None:
        with self.cv:
            if error is not None:
                self.errors.append(error)
            self.done[i] = entry
            self.cv.notify_all()

    def _worker(self, i: int) -> None:
        """One client: waits for "go", runs its round, reports when it holds the model."""
        c = self.conns[i]
        model = c.model
        step = self._via_bridge if self.bridge else self._native
        while True:
            with self.cv:
                while not self.cmds[i]:
                    self.cv.wait()
                cmd = self.cmds[i].pop(0)
            if cmd is None:
                c.close()
                return
            if cmd[0] == "bare":  # the ingestion reference: the same bytes to a bare socket
                self._bare_send(i, cmd[1], cmd[2])
                self._finished(i, (time.monotonic(), None, None))
                continue
            _, rnd, digest = cmd
            try:
                model = step(i, c, rnd, model)
                t = time.monotonic()
                d = zlib.crc32(model.payload) if digest else None
                self._finished(i, (t, d, model.payload if (digest and i == 0) else None))
            except Exception as e:  # noqa: BLE001 - reported to the coordinator
                self._finished(i, (time.monotonic(), None, None), f"c{i}: {e!r}")

    # -- the coordinator's side --------------------------------------------------------------
    def start(self) -> None:
        for t in self.threads:
            t.start()

    def command(self, msg: tuple) -> dict[int, tuple]:
        """Give ``msg`` to every client; when all are done: (time, digest, payload) per client."""
        with self.cv:
            self.done.clear()
            for i in self.ids:
                self.cmds[i].append(msg)
            self.cv.notify_all()
            while len(self.done) < len(self.ids):
                self.cv.wait()
            return dict(self.done)

    def done_message(self, res: dict[int, tuple]) -> tuple:
        """A round's answer to the coordinator; the errors reported are then forgotten."""
        payload = next((p for _t, _d, p in res.values() if p is not None), None)
        msg = (
            "done",
            max(t for t, _d, _p in res.values()),
            {i: d for i, (_t, d, _p) in res.items()},
            bytes(payload) if payload is not None else None,
            list(self.errors),
        )
        self.errors.clear()
        return msg

    def stop(self) -> None:
        with self.cv:
            for i in self.ids:
                self.cmds[i].append(None)
            self.cv.notify_all()
        for t in self.threads:
            t.join(timeout=30)


def client_proc(
    conn,
    addr,
    ids: list[int],
    params: int,
    app_dir: str,
    bridge: bool,
    token: str,
    shm: bool,
    in_place: bool = False,
) -> None:
    """A client process (spawned): connects its clients, then serves the coordinator's pipe."""
    from hearth.functions.fedavg.client import RoundClient

    m = app_module(Path(app_dir))
    ups = {i: [(str(j), a) for j, a in enumerate(m.update_arrays(i, params))] for i in ids}
    try:
        conns = {
            i: RoundClient(tuple(addr), token, f"c{i}", shm=shm, in_place=in_place) for i in ids
        }
    except Exception as e:  # noqa: BLE001 - reported to the coordinator
        conn.send(("error", repr(e)))
        return
    group = ClientGroup(m, ids, params, bridge, ups, conns)
    group.start()
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            group.stop()
            conn.send(("stopped",))
            return
        res = group.command(msg)
        if msg[0] == "bare":
            conn.send(("bared",))
            continue
        conn.send(group.done_message(res))
