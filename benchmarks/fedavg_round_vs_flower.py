"""A whole federated round: Hearth's round endpoint vs Flower 1.42's real deployment engine.

One round = every client sends its update, the aggregation folds them, every client has the new
global model. Both sides run the same Flower app, which this script writes into a temp dir: a
``ClientApp`` returning ``--params`` float32 parameters (62 tensors, no training; the values
depend on the partition id, the weight ``num-examples`` on the partition and the round) and a
``ServerApp`` running ``FedAvg`` that records when each round ends and saves the global model.

* **Flower** (N in ``--flower-clients``): ``flower-superlink`` (HTTP Fleet API, 127.0.0.1:8000,
  ``--insecure --disable-runtime-dependency-installation``), N ``flower-supernode`` with their
  own ``--port`` and ``--node-config partition-id=i``, then ``flwr run`` of the app against a
  federation defined in ``$FLWR_HOME/config.toml``. Round time: between the ServerApp's
  ``evaluate_fn`` calls (round 0 is called before round 1 starts). Every process started here is
  stopped at the end, also on error.
* **Hearth** (N in ``--clients`` x ``--params``): a server process runs
  :class:`~hearth.functions.fedavg.roundserver.RoundServer` on its own slot pool; client
  processes (several clients each, one thread per client) connect with
  :class:`~hearth.functions.fedavg.client.RoundClient` and send the ClientApp's arrays. Round time:
  from the coordinator's "go" to the last client holding the model (``time.monotonic``, one
  clock for all processes). ``--bridge`` rounds run the same ClientApp through the Flower bridge
  (a Flower ``train`` message per round, in a persistent process).

References, same run, interleaved with the rounds (never during one): memory bandwidth
(``np.copyto`` of 256 MB, 3 samples before round 1 and after every round; a round is compared
with the samples right before and after it) and, for TCP sets, the same client processes
sending the same update bytes to a bare loopback socket read the way the endpoint reads
(:class:`BareSink`). The bandwidth limit of a round is the time to copy its N updates and N
model downloads once at that bandwidth. Figures per set: round 1 and rounds 2+ (median and
best), vs Flower, vs the limit, ingestion GB/s into slots vs the bare socket, bytes copied on
the server per byte received, server peak RSS in models, page faults of the server's hot path
(fold + receiving threads) in rounds 2+, processes started after round 1, exactness vs float64
FedAvg and vs Flower's model.

``--quick`` (about a minute on a quiet machine, most of it Flower's start-up): Flower and Hearth
at N=2 for the comparison with Flower, and Hearth's own targets (bandwidth limit, ingestion,
memory, faults, exactness) at N=8 with the 11.2 M model; no 58 M set, no copying-client and no
bridge sets. The full run has Flower at N=8 and 16 and Hearth at 8, 16, 32 and 58 M params.

Ends with one JSON line; the exit status is 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

GB = 1e9
R18, R152 = 11_210_000, 58_270_000
FAN_IN = 4

# --------------------------------------------------------------------------------------------
# the Flower app (both sides run it)

APP_CLIENT = '''
"""ClientApp: returns PARAMS float32 parameters without training (deterministic per partition)."""
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

NLAYERS = 62
_CACHE = {}


def layer_sizes(params):
    base = params // NLAYERS
    return [base] * (NLAYERS - 1) + [params - base * (NLAYERS - 1)]


def update_arrays(pid, params):
    """The update of partition `pid` (cached: a persistent process builds it once)."""
    key = (pid, params)
    if key not in _CACHE:
        out = []
        for j, size in enumerate(layer_sizes(params)):
            a = np.linspace(-1.0, 1.0, size, dtype=np.float32)
            a *= np.float32(1.0 + 0.01 * pid + 0.001 * j)
            a += np.float32(0.001 * pid)
            out.append(a)
        _CACHE[key] = out
    return _CACHE[key]


def num_examples(pid, server_round):
    return 10 + 7 * pid + 3 * server_round


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    params = int(context.run_config["params"])
    rnd = int(msg.content["config"]["server-round"])
    arrays = ArrayRecord(update_arrays(pid, params))
    metrics = MetricRecord({"num-examples": num_examples(pid, rnd)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
'''

APP_SERVER = '''
"""ServerApp: FedAvg over every node; records round ends and saves the final model."""
import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from hearthbench.client_app import layer_sizes

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["num-clients"])
    rounds = int(context.run_config["num-server-rounds"])
    out = str(context.run_config["out"])
    params = int(context.run_config["params"])
    init = ArrayRecord([np.zeros(s, np.float32) for s in layer_sizes(params)])
    ends = {}

    def evaluate(server_round, arrays):
        ends[server_round] = time.monotonic()
        if server_round == rounds:
            np.savez(out + ".npz", *arrays.to_numpy_ndarrays())
        return MetricRecord({})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                      min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=init, num_rounds=rounds,
                   train_config=ConfigRecord({}), evaluate_fn=evaluate)
    with open(out + ".json", "w") as f:
        json.dump({"ends": ends}, f)
'''

APP_TOML = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hearthbench"
version = "1.0.0"
dependencies = ["flwr>=1.42"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "hearth"

[tool.flwr.app.components]
serverapp = "hearthbench.server_app:app"
clientapp = "hearthbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
num-clients = 8
params = 1000
out = "/tmp/out"
"""


def write_app(root: Path) -> Path:
    app = root / "app"
    (app / "hearthbench").mkdir(parents=True)
    (app / "pyproject.toml").write_text(APP_TOML)
    (app / "hearthbench" / "__init__.py").write_text("")
    (app / "hearthbench" / "client_app.py").write_text(textwrap.dedent(APP_CLIENT))
    (app / "hearthbench" / "server_app.py").write_text(textwrap.dedent(APP_SERVER))
    return app


def app_module(app_dir: Path):
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    import hearthbench.client_app as m

    return m


# --------------------------------------------------------------------------------------------
# physical references


class BandwidthProbe:
    """This machine's memory bandwidth, sampled between rounds: ``np.copyto`` of 256 MB between
    two buffers kept (pre-faulted) for the whole run. The bandwidth moves with what else runs
    (2.4x between two runs of this benchmark), so each round is compared with the samples
    taken right before and right after it, never with one figure from the start of the run."""

    def __init__(self, nbytes: int = 256 << 20, per_probe: int = 3):
        self.nbytes, self.per_probe = nbytes, per_probe
        self.a = np.ones(nbytes // 4, np.float32)
        self.b = np.empty_like(self.a)
        np.copyto(self.b, self.a)  # faults both in
        self.samples: list[float] = []  # GB/s, every sample of the run

    def probe(self) -> list[float]:
        """``per_probe`` samples now (GB/s); they are also kept in :attr:`samples`."""
        got = [
            self.nbytes / _timed(lambda: np.copyto(self.b, self.a)) / GB
            for _ in range(self.per_probe)
        ]
        self.samples.extend(got)
        return got

    def close(self) -> None:
        del self.a, self.b


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class BareSink:
    """The ingestion reference: the same client processes send the same update bytes to a bare
    loopback socket, read the way the round endpoint reads (``wire.tune``'s buffer sizes,
    ``wire.recv_chunks`` of ``roundingest.SCAN_CHUNK`` at a time, into pre-faulted memory), one
    thread per connection, timed like the endpoint's receive window (first bytes in -> last update
    complete). The endpoint has ``fan_in`` slots; this sink takes every sender at once."""

    def __init__(self, n: int, nbytes: int, buffers: int = 8):
        self.n, self.nbytes = n, nbytes
        self.bufs = [np.zeros(nbytes, np.uint8) for _ in range(min(n, buffers))]  # pre-faulted

    def run(self, start_senders) -> float:
        """GB/s of one transfer: ``start_senders(port)`` makes every client send once."""
        from hearth.functions.fedavg import wire
        from hearth.functions.fedavg.roundingest import SCAN_CHUNK

        srv = socket.create_server(("127.0.0.1", 0), backlog=self.n + 4)
        port = srv.getsockname()[1]
        spans: list[tuple[float, float, int]] = []
        lock = threading.Lock()

        def recv(c: socket.socket, buf: np.ndarray) -> None:
            wire.tune(c)
            first = []

            def mark(_done: int) -> None:
                if not first:
                    first.append(time.monotonic())

            # the endpoint's read loop (roundingest), less the check of each chunk
            got = wire.recv_chunks(c, memoryview(buf)[: self.nbytes], SCAN_CHUNK, mark)
            last = time.monotonic()
            c.sendall(b"k")
            c.close()
            with lock:
                spans.append((first[0] if first else last, last, got))

        threads = []
        start_senders(port)
        for i in range(self.n):
            c, _ = srv.accept()
            t = threading.Thread(target=recv, args=(c, self.bufs[i % len(self.bufs)]), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=120)
        srv.close()
        got = sum(g for _f, _l, g in spans)
        window = max(last for _f, last, _g in spans) - min(f for f, _l, _g in spans)
        return got / window / GB if window > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Hearth: server process and client processes


def _status_kb(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def server_proc(
    conn, n: int, params: int, app_dir: str, fan_in: int, token: str, handover: bool = False
) -> None:
    from hearth.dataplane.shm import TRIM_OFF, SlotPool
    from hearth.functions.fedavg.foldkernels import warm_kernels
    from hearth.functions.fedavg.pack import Header, LayerSpec, Layout, packed_size
    from hearth.functions.fedavg.roundserver import RoundServer, keep_heap

    keep_heap()
    m = app_module(Path(app_dir))
    warm_kernels()
    rss_base = _status_kb("self", "VmRSS") * 1024
    shapes = m.layer_sizes(params)
    f32 = np.dtype(np.float32)
    layout = Layout(tuple(LayerSpec(str(i), f32, (s,)) for i, s in enumerate(shapes)))
    max_bytes = packed_size(Header("update", 2**40, layout, 2**40, "c" * 64))
    slot = -(-max_bytes // (1 << 21)) * (1 << 21)
    pool = SlotPool.create(
        f"hearth-bench-{uuid.uuid4().hex[:8]}", [(slot, fan_in + 3)], trim_threshold=TRIM_OFF
    )
    init = [(str(i), np.zeros(s, np.float32)) for i, s in enumerate(shapes)]
    srv = RoundServer(
        n,
        pool=pool,
        token=token,
        max_update_bytes=max_bytes,
        fan_in=fan_in,
        initial=init,
        handover=handover,
    )
    del init
    srv.start()
    conn.send(("ready", srv.address, rss_base, os.getpid()))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "wait":
                st = srv.wait_round(msg[1], timeout=600)
                conn.send(("round", st.to_dict(), srv.slots_held()))
            elif msg[0] == "stop":
                break
    finally:
        hwm = _status_kb("self", "VmHWM") * 1024
        srv.close()
        used = pool.stats()["used"]
        pool.destroy()
        conn.send(("stopped", hwm, used, threading.active_count()))


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
    from hearth.functions.fedavg.client import RoundClient

    m = app_module(Path(app_dir))
    ups = {i: [(str(j), a) for j, a in enumerate(m.update_arrays(i, params))] for i in ids}
    cmds: dict[int, list] = {i: [] for i in ids}
    cv = threading.Condition()
    done: dict[int, tuple] = {}
    errors: list[str] = []

    try:
        conns = {
            i: RoundClient(tuple(addr), token, f"c{i}", shm=shm, in_place=in_place) for i in ids
        }
    except Exception as e:  # noqa: BLE001 - reported to the coordinator
        conn.send(("error", repr(e)))
        return

    def native(i: int, c: RoundClient, rnd: int, model):
        return c.round(ups[i], m.num_examples(i, rnd))

    def via_bridge(i: int, c: RoundClient, rnd: int, model):
        from flwr.app import Context, RecordDict
        from hearth.functions.fedavg.flower_bridge import reply_update, train_message

        ctx = Context(0, i + 1, {"partition-id": i}, RecordDict(), {"params": params})
        layers, n = reply_update(m.app(train_message(model, rnd, i + 1, None), ctx))
        return c.round(layers, n)

    def bare_send(i: int, port: int, rnd: int) -> None:
        from hearth.functions.fedavg import wire

        bufs, _total = wire.update_iov(ups[i], m.num_examples(i, rnd), round=rnd, client=f"c{i}")
        s = socket.create_connection(("127.0.0.1", port))
        wire.tune(s)
        wire.send_iov(s, bufs)  # as RoundClient.send_update does, less the 16-byte frame
        s.recv(1)
        s.close()

    def worker(i: int) -> None:
        """One client: waits for "go", runs its round, reports when it holds the model."""
        c = conns[i]
        model = c.model
        step = via_bridge if bridge else native
        while True:
            with cv:
                while not cmds[i]:
                    cv.wait()
                cmd = cmds[i].pop(0)
            if cmd is None:
                c.close()
                return
            if cmd[0] == "bare":  # the ingestion reference: the same bytes to a bare socket
                bare_send(i, cmd[1], cmd[2])
                with cv:
                    done[i] = (time.monotonic(), None, None)
                    cv.notify_all()
                continue
            _, rnd, digest = cmd
            try:
                model = step(i, c, rnd, model)
                t = time.monotonic()
                d = zlib.crc32(model.payload) if digest else None
                with cv:
                    done[i] = (t, d, model.payload if (digest and i == 0) else None)
                    cv.notify_all()
            except Exception as e:  # noqa: BLE001 - reported to the coordinator
                with cv:
                    errors.append(f"c{i}: {e!r}")
                    done[i] = (time.monotonic(), None, None)
                    cv.notify_all()

    ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in ids]
    for t in ths:
        t.start()
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            with cv:
                for i in ids:
                    cmds[i].append(None)
                cv.notify_all()
            for t in ths:
                t.join(timeout=30)
            conn.send(("stopped",))
            return
        with cv:
            done.clear()
            for i in ids:
                cmds[i].append(msg)
            cv.notify_all()
            while len(done) < len(ids):
                cv.wait()
            res = dict(done)
        if msg[0] == "bare":
            conn.send(("bared",))
            continue
        payload = next((p for _t, _d, p in res.values() if p is not None), None)
        conn.send(
            (
                "done",
                max(t for t, _d, _p in res.values()),
                {i: d for i, (_t, d, _p) in res.items()},
                bytes(payload) if payload is not None else None,
                list(errors),
            )
        )
        errors.clear()


def _recv(conn, timeout: float, what: str):
    if not conn.poll(timeout):
        raise TimeoutError(f"waited {timeout}s for {what}")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"while waiting for {what}: {msg[1]}")
    return msg


def _update_bytes(m, n: int, params: int) -> int:
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


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        out.update(kids)
        todo.extend(kids)
    return out


def exact_model(m, n: int, params: int, rnd: int) -> list[np.ndarray]:
    """Float64 FedAvg of the ClientApp's updates (one client's arrays in memory at a time)."""
    sums = [np.zeros(size, np.float64) for size in m.layer_sizes(params)]
    total = sum(m.num_examples(i, rnd) for i in range(n))
    for i in range(n):
        for s, a in zip(sums, m.update_arrays(i, params), strict=True):
            s += a.astype(np.float64) * m.num_examples(i, rnd)
        m._CACHE.clear()
    return [s / total for s in sums]


def model_arrays(payload: bytes) -> list[np.ndarray]:
    from hearth.functions.fedavg.aggregation import parse_model

    return [a for _n, a in parse_model(memoryview(payload)).layers]


def max_rel_err(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Largest |got - want| of a layer relative to the layer's largest |want| (normwise: an
    element-wise ratio is meaningless where a float32 sum cancels to ~0)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        d = float(np.abs(g.astype(np.float64) - w).max()) / max(float(np.abs(w).max()), 1e-30)
        worst = max(worst, d)
    return worst


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
    ctx = mp.get_context("spawn")
    sp, sc = ctx.Pipe()
    token = "bench-round-token-" + uuid.uuid4().hex
    os.environ["PYTHONMALLOC"] = "malloc"  # the server's objects on glibc's kept heap
    server = ctx.Process(
        target=server_proc, args=(sc, n, params, str(app_dir), FAN_IN, token, handover)
    )
    server.start()
    os.environ.pop("PYTHONMALLOC", None)
    _, addr, rss_base, spid = _recv(sp, 300, "the server to start")
    k = min(procs, n)
    groups = [list(range(n))[g::k] for g in range(k)]
    clients = []
    for ids in groups:
        a, b = ctx.Pipe()
        p = ctx.Process(
            target=client_proc,
            args=(b, addr, ids, params, str(app_dir), bridge, token, shm, in_place),
        )
        p.start()
        clients.append((p, a))
    for _p, a in clients:
        _recv(a, 300, "the clients to connect")
    m = app_module(app_dir)
    res: dict = {"clients": n, "params": params, "bridge": bridge, "shm": shm, "rounds": []}
    res["in_place"] = in_place
    pids_after_r1: set[int] = set()
    errors: list[str] = []
    sink = None if shm else BareSink(n, _update_bytes(m, n, params))

    def references(rnd: int) -> dict:
        out: dict = {"bw_gbps": probe.probe() if probe is not None else []}
        if sink is not None:

            def go(port: int) -> None:
                for _p, a in clients:
                    a.send(("bare", port, rnd))

            out["bare_gbps"] = sink.run(go)
            for _p, a in clients:
                _recv(a, 120, "the bare-socket senders")
        return out

    try:
        before = references(0)
        res["references_before_round1"] = before
        for rnd in range(1, rounds + 1):
            digest = rnd in (1, rounds)
            t_go = time.monotonic()
            for _p, a in clients:
                a.send(("go", rnd, digest))
            replies = [_recv(a, 600, f"round {rnd}") for _p, a in clients]
            t_end = max(r[1] for r in replies)
            sp.send(("wait", rnd))
            _, st, held = sp.recv()
            digests = {}
            payload = None
            for r in replies:
                digests.update(r[2])
                payload = payload or r[3]
                errors.extend(r[4])
            row = {"round": rnd, "s": t_end - t_go, "server": st, "slots_held_after": held}
            after = references(rnd)
            # this round's references: the samples taken right before and right after it
            row["bw_gbps"] = statistics.median(before["bw_gbps"] + after["bw_gbps"] or [0.0])
            row["bw_samples"] = before["bw_gbps"] + after["bw_gbps"]
            if sink is not None:
                row["bare_gbps"] = (before["bare_gbps"] + after["bare_gbps"]) / 2
            before = after
            if digest and payload is not None:
                want = exact_model(m, n, params, rnd)
                got = model_arrays(payload)
                row["max_rel_err_vs_exact"] = max_rel_err(got, want)
                row["all_clients_same_model"] = (
                    len(set(digests.values())) == 1 and len(digests) == n
                )
                if rnd == 1:
                    res["round1_model"] = got
            res["rounds"].append(row)
            if rnd == 1:
                pids_after_r1 = {spid, *(p.pid for p, _ in clients)} | descendants(os.getpid())
        pids_end = {spid, *(p.pid for p, _ in clients)} | descendants(os.getpid())
        res["new_processes_after_round1"] = len(pids_end - pids_after_r1)
    finally:
        for _p, a in clients:
            try:
                a.send(("stop",))
                _recv(a, 60, "a client process to stop")
            except (OSError, EOFError, TimeoutError, RuntimeError):
                pass
        try:
            sp.send(("stop",))
            _, hwm, used, _threads = _recv(sp, 60, "the server to stop")
            res["server_peak_rss"] = hwm
            res["server_rss_base"] = rss_base
            res["pool_slots_used_after_close"] = used
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        for p in [server, *(p for p, _ in clients)]:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    res["errors"] = errors
    return res


# --------------------------------------------------------------------------------------------
# Flower's deployment engine


class FlowerRun:
    """SuperLink + N SuperNodes + ``flwr run``; every process is stopped in ``close``."""

    def __init__(self, root: Path, app_dir: Path, n: int, params: int, rounds: int):
        self.root, self.app_dir, self.n, self.params, self.rounds = root, app_dir, n, params, rounds
        self.procs: list[subprocess.Popen] = []
        self.home = root / f"flwr-home-{n}"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink.hearthbench]\naddress = "127.0.0.1:8000"\ninsecure = true\n'
        )
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        }
        self.out = root / f"flower-out-{n}"
        self.peak_rss = 0
        self.superlink_peak = 0

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        f = open(self.root / log, "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            args,
            env=self.env,
            cwd=self.home,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def run(self, timeout: float = 600) -> dict:
        bindir = Path(sys.executable).parent
        link = self._start(
            [
                str(bindir / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
            ],
            "superlink.log",
        )
        _wait_port(8000, 60)
        for i in range(self.n):
            self._start(
                [
                    str(bindir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    "127.0.0.1:8000",
                    "--port",
                    str(9200 + i),
                    "--node-config",
                    f"partition-id={i}",
                ],
                f"supernode-{i}.log",
            )
        cfg = (
            f"num-server-rounds={self.rounds} num-clients={self.n} params={self.params} "
            f'out="{self.out}"'
        )
        t0 = time.monotonic()
        run = subprocess.run(
            [str(bindir / "flwr"), "run", str(self.app_dir), "hearthbench", "--run-config", cfg],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if run.returncode != 0:
            raise RuntimeError(f"flwr run failed: {run.stdout[-800:]} {run.stderr[-800:]}")
        done = Path(str(self.out) + ".json")
        sampler = threading.Thread(target=self._sample, args=(done,), daemon=True)
        sampler.start()
        while not done.exists():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"Flower's run did not finish within {timeout}s")
            if link.poll() is not None:
                raise RuntimeError("flower-superlink exited")
            time.sleep(0.2)
        time.sleep(0.3)
        ends = {int(k): v for k, v in json.loads(done.read_text())["ends"].items()}
        rounds = [ends[r] - ends[r - 1] for r in range(1, self.rounds + 1)]
        with np.load(str(self.out) + ".npz") as z:
            model = [z[f"arr_{i}"] for i in range(len(z.files))]
        return {
            "clients": self.n,
            "round_s": rounds,
            "model": model,
            "peak_rss_all": self.peak_rss,
            "superlink_peak_rss": self.superlink_peak,
        }

    def _sample(self, done: Path) -> None:
        while not done.exists():
            total = 0
            for p in list(self.procs):
                for pid in {p.pid} | descendants(p.pid):
                    try:
                        total += _status_kb(pid, "VmRSS") * 1024
                    except OSError:
                        pass
            self.peak_rss = max(self.peak_rss, total)
            try:
                self.superlink_peak = max(
                    self.superlink_peak, _status_kb(self.procs[0].pid, "VmHWM") * 1024
                )
            except OSError:
                pass
            time.sleep(0.25)

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.1)
        for p in self.procs:
            p.wait(timeout=5)


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# --------------------------------------------------------------------------------------------


def summarize(h: dict) -> dict:
    """A set's figures. Each round is compared with its own references (the bandwidth and
    bare-socket samples taken right before and after it); the medians are over rounds 2+."""
    n, params = h["clients"], h["params"]
    model_bytes = params * 4
    rows = h["rounds"]
    later_rows = rows[1:] or rows
    later = [r["s"] for r in later_rows]
    for r in rows:
        # the limit: the round's N updates and N model downloads copied once at the bandwidth
        moved = r["server"]["bytes_received"] + n * (model_bytes + 4096)
        r["limit_s"] = moved / (r["bw_gbps"] * GB) if r["bw_gbps"] else float("inf")
        r["vs_limit"] = r["s"] / r["limit_s"]
        w = r["server"]["t_all_received"] - r["server"]["t_first_update"]
        r["ingest_gbps"] = r["server"]["bytes_received"] / w / GB if w > 0 else 0.0
        if r.get("bare_gbps"):
            r["ingest_vs_bare"] = r["ingest_gbps"] / r["bare_gbps"]
    vs_limit = [r["vs_limit"] for r in later_rows]
    ingest = [r["ingest_gbps"] for r in later_rows]
    vs_bare = [r["ingest_vs_bare"] for r in later_rows if "ingest_vs_bare" in r]
    bw = [x for r in rows for x in r["bw_samples"]]
    hot = [
        r["server"]["fold_faults"][0]
        + r["server"]["fold_faults"][1]
        + r["server"]["recv_faults"][0]
        + r["server"]["recv_faults"][1]
        for r in rows[1:]
    ]
    copied = sum(r["server"]["bytes_copied"] for r in rows)
    received = sum(r["server"]["bytes_received"] for r in rows)
    rss_models = (h.get("server_peak_rss", 0) - h.get("server_rss_base", 0)) / model_bytes
    errs = [r.get("max_rel_err_vs_exact") for r in rows if "max_rel_err_vs_exact" in r]
    return {
        "clients": n,
        "params": params,
        "bridge": h["bridge"],
        "transport": ("shm-in-place" if h["in_place"] else "shm") if h["shm"] else "tcp",
        "round1_s": rows[0]["s"],
        "later_best_s": min(later),
        "later_median_s": statistics.median(later),
        "bandwidth_gbps_median": statistics.median(bw) if bw else 0.0,
        "bandwidth_gbps_range": [min(bw), max(bw)] if bw else [],
        "bandwidth_limit_s": statistics.median(r["limit_s"] for r in later_rows),
        "later_median_vs_limit": statistics.median(vs_limit),
        "later_best_vs_limit": min(vs_limit),
        "ingest_gbps_median": statistics.median(ingest),
        "ingest_gbps_best": max(ingest),
        "bare_socket_gbps_median": (
            statistics.median(r["bare_gbps"] for r in later_rows) if vs_bare else None
        ),
        "ingest_vs_bare_socket": statistics.median(vs_bare) if vs_bare else None,
        "ingest_vs_bare_socket_best": max(vs_bare) if vs_bare else None,
        "bytes_copied_per_byte_received": copied / received if received else None,
        "server_peak_rss_mb": h.get("server_peak_rss", 0) / 1e6,
        "server_rss_base_mb": h.get("server_rss_base", 0) / 1e6,
        "server_rss_models": rss_models,
        "phases_ms": [
            {
                "round": r["round"],
                "go_to_last_model": round(r["s"] * 1e3, 1),
                "receive_window": round(
                    (r["server"]["t_all_received"] - r["server"]["t_first_update"]) * 1e3, 1
                ),
                "last_received_to_published": round(
                    (r["server"]["t_published"] - r["server"]["t_all_received"]) * 1e3, 1
                ),
                "published_to_all_acked": round(
                    (r["server"]["t_all_acked"] - r["server"]["t_published"]) * 1e3, 1
                ),
                "waited_for_slots": round(r["server"]["receive_wait_s"] * 1e3, 1),
                "limit": round(r["limit_s"] * 1e3, 1),
                "bw_gbps": round(r["bw_gbps"], 2),
                **({"bare_gbps": round(r["bare_gbps"], 2)} if "bare_gbps" in r else {}),
            }
            for r in rows
        ],
        "hot_path_faults_rounds2plus": hot,
        "fold_faults_rounds2plus": [r["server"]["fold_faults"] for r in rows[1:]],
        "recv_faults_rounds2plus": [r["server"]["recv_faults"] for r in rows[1:]],
        "process_faults_rounds2plus": [r["server"]["process_faults"] for r in rows[1:]],
        "new_processes_after_round1": h.get("new_processes_after_round1"),
        "slots_held_after_rounds": [r["slots_held_after"] for r in rows],
        "pool_slots_used_after_close": h.get("pool_slots_used_after_close"),
        "max_rel_err_vs_exact": max(errs) if errs else None,
        "all_clients_same_model": all(r.get("all_clients_same_model", True) for r in rows),
        "errors": h["errors"][:5],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="~1 min: Flower and Hearth at N=2, Hearth's own targets at N=8 (see the docs)",
    )
    ap.add_argument("--clients", default=None, help="Hearth client counts, e.g. 8,16,32")
    ap.add_argument("--flower-clients", default=None, help="Flower client counts, e.g. 8,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--no-big", action="store_true", help="skip the 58 M parameter set")
    ap.add_argument("--big-clients", default=None, help="client counts of the 58 M set, e.g. 8")
    ap.add_argument(
        "--procs", type=int, default=4, help="client processes (clients per process: N/procs)"
    )
    ap.add_argument(
        "--handover",
        action="store_true",
        help="passes lend their slots to the next writers as they read them "
        "(RoundServer(handover=True); off by default): the A/B",
    )
    args = ap.parse_args(argv)

    def counts(given: str | None, quick: str, full: str) -> list[int]:
        return [int(x) for x in (given or (quick if args.quick else full)).split(",")]

    hearth_n = counts(args.clients, "8", "8,16,32")
    flower_n = [] if args.no_flower else counts(args.flower_clients, "2", "8,16")
    big_n = (
        []
        if args.no_big or (args.quick and not args.big_clients)
        else counts(args.big_clients, "8", "8,16")
    )
    rounds = args.rounds
    t_start = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# fedavg round vs Flower, {date}, load average {os.getloadavg()[0]:.1f}", flush=True)

    def say(text: str) -> None:
        el = time.monotonic() - t_start
        print(f"[{el:5.0f} s, load {os.getloadavg()[0]:4.1f}] {text}", flush=True)

    probe = BandwidthProbe()
    root = Path(tempfile.mkdtemp(prefix="hearth-round-bench-"))
    app_dir = write_app(root)
    out: dict = {"date": date, "load_start": os.getloadavg()[0], "quick": args.quick, "sets": []}
    out["handover"] = args.handover
    flower: dict[int, dict] = {}
    try:
        # Hearth first: Flower's teardown (thousands of MB freed, dozens of processes stopped)
        # would otherwise land on the first Hearth set. Round-1 models are kept for the sets
        # compared with Flower's model afterwards.
        # (clients, params, bridge, shm, in_place): same-host clients reading the model in place
        # (the bandwidth target; also every N Flower runs at), the default client (its own copy
        # of the model) once for reference, TCP (the ingestion target), the 58 M model, and the
        # Flower bridge; --quick keeps what its targets need
        inplace_n = sorted(set(hearth_n) | set(flower_n))
        sets = [(n, R18, False, True, True) for n in inplace_n]
        if not args.quick:
            sets += [(hearth_n[0], R18, False, True, False)]
        sets += [(n, R18, False, False, False) for n in hearth_n]
        sets += [(n, R152, False, True, True) for n in big_n]
        if not args.quick:
            sets += [(n, R18, True, True, False) for n in flower_n]
        models: list[list[np.ndarray] | None] = []
        for n, params, bridge, shm, in_place in sets:
            h = hearth_set(
                n,
                params,
                rounds,
                app_dir,
                bridge,
                args.procs,
                shm,
                in_place,
                probe,
                args.handover,
            )
            s = summarize(h)
            keep = params == R18 and n in flower_n and "round1_model" in h
            models.append(h["round1_model"] if keep else None)
            out["sets"].append(s)
            label = (
                f"{'bridge' if bridge else 'native'} {s['transport']} N={n} x {params / 1e6:.2f} M"
            )
            ingest = (
                f"; ingest {s['ingest_gbps_median']:.2f} GB/s = {s['ingest_vs_bare_socket']:.0%} "
                f"of a bare socket's {s['bare_socket_gbps_median']:.2f} (same senders, same run)"
                if s["ingest_vs_bare_socket"] is not None
                else ""
            )
            say(
                f"Hearth {label}: round 1 {s['round1_s'] * 1e3:.0f} ms, rounds 2+ median "
                f"{s['later_median_s'] * 1e3:.0f} ms = {s['later_median_vs_limit']:.2f}x the "
                f"limit (best {s['later_best_vs_limit']:.2f}x; limit "
                f"{s['bandwidth_limit_s'] * 1e3:.0f} ms at {s['bandwidth_gbps_median']:.1f} GB/s, "
                f"samples {s['bandwidth_gbps_range'][0]:.1f}-{s['bandwidth_gbps_range'][1]:.1f})"
                + ingest
                + f"; copies/byte {s['bytes_copied_per_byte_received']:.2f}; server RSS "
                f"{s['server_rss_models']:.2f} models; hot-path faults "
                f"{s['hot_path_faults_rounds2plus']}; new processes "
                f"{s['new_processes_after_round1']}; max rel err {s['max_rel_err_vs_exact']:.1e}"
            )
        for n in flower_n:
            fr = FlowerRun(root, app_dir, n, R18, 1)
            try:
                flower[n] = fr.run()
            finally:
                fr.close()
            say(
                f"Flower N={n}: round {flower[n]['round_s'][0]:.2f} s, all processes peak RSS "
                f"{flower[n]['peak_rss_all'] / 1e9:.2f} GB, SuperLink peak "
                f"{flower[n]['superlink_peak_rss'] / 1e6:.0f} MB"
            )
        for s, (n, params, _bridge, _shm, _ip), model in zip(
            out["sets"], sets, models, strict=True
        ):
            if params != R18 or n not in flower:
                continue
            f = flower[n]
            s["flower_round_s"] = f["round_s"][0]
            s["vs_flower_round1"] = f["round_s"][0] / s["round1_s"]
            s["vs_flower_later"] = f["round_s"][0] / s["later_median_s"]
            s["flower_peak_rss_all_gb"] = f["peak_rss_all"] / 1e9
            s["flower_superlink_peak_rss_mb"] = f["superlink_peak_rss"] / 1e6
            if model is not None:
                s["max_rel_err_vs_flower"] = max_rel_err(
                    model, [a.astype(np.float64) for a in f["model"]]
                )
            say(
                f"vs Flower N={n}, {'bridge' if _bridge else 'native'} {s['transport']}: "
                f"round 1 {s['vs_flower_round1']:.1f}x, later rounds {s['vs_flower_later']:.1f}x, "
                f"max rel err vs Flower's model {s.get('max_rel_err_vs_flower', float('nan')):.1e}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        probe.close()
    out["memcpy_gbps_median"] = statistics.median(probe.samples)
    out["memcpy_gbps_range"] = [min(probe.samples), max(probe.samples)]
    out["memcpy_samples"] = len(probe.samples)
    out["load_end"] = os.getloadavg()[0]
    out["elapsed_s"] = time.monotonic() - t_start
    out.update(targets(out["sets"]))
    say(
        f"memory bandwidth over the run: median {out['memcpy_gbps_median']:.1f} GB/s, "
        f"{out['memcpy_gbps_range'][0]:.1f}-{out['memcpy_gbps_range'][1]:.1f} "
        f"({len(probe.samples)} samples between rounds)"
    )
    print(json.dumps(out, default=float))
    return 0 if out["targets_met"] else 1


def targets(sets: list[dict]) -> dict:
    native = [s for s in sets if not s["bridge"]]
    shm = [s for s in native if s["transport"] == "shm-in-place"]
    tcp = [s for s in native if s["transport"] == "tcp"]
    vs_f = [s for s in sets if "vs_flower_later" in s]
    t = {
        "target_20x_vs_flower": bool(vs_f)
        and all(s["vs_flower_later"] >= 20 and s["vs_flower_round1"] >= 20 for s in vs_f),
        "target_2x_bandwidth_limit": bool(shm)
        and all(s["later_median_vs_limit"] <= 2 for s in shm),
        "target_exact": all(
            s["max_rel_err_vs_exact"] is not None
            and s["max_rel_err_vs_exact"] <= 1e-5
            and s["all_clients_same_model"]
            and not s["errors"]
            for s in sets
        )
        and all(s.get("max_rel_err_vs_flower", 0) <= 1e-5 for s in vs_f),
        "target_ingest_half_socket": bool(tcp)
        and all((s["ingest_vs_bare_socket"] or 0) >= 0.5 for s in tcp),
        "target_rss_fan_in_plus_2": all(s["server_rss_models"] <= FAN_IN + 2 for s in sets),
        "target_zero_new_processes": all(s["new_processes_after_round1"] == 0 for s in sets),
        # the receiving and fold threads, and the whole server process (fold workers included)
        "target_zero_hot_path_faults": all(
            not any(s["hot_path_faults_rounds2plus"])
            and not any(a or b for a, b in s["process_faults_rounds2plus"])
            for s in sets
        ),
        "target_slots_returned": all(
            not any(s["slots_held_after_rounds"]) and s["pool_slots_used_after_close"] == 0
            for s in sets
        ),
    }
    t["targets_met"] = all(t.values())
    return t


if __name__ == "__main__":
    sys.exit(main())
