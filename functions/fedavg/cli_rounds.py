"""``hearth fl serve`` (the round endpoint) and ``hearth fl flower-client`` (the Flower bridge)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from hearth.cli_errors import fail

if TYPE_CHECKING:
    from hearth.dataplane.shm import SlotPool
    from hearth.functions.fedavg.roundserver import RoundServer


def _token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            tok = token_file.read_text().strip()
        except OSError as e:
            fail(f"--token-file: cannot read {token_file}: {e.strerror}")
    else:
        tok = os.environ.get("HEARTH_FL_TOKEN", "")
    if len(tok) < 16:
        fail("the round token must have at least 16 characters (--token-file or HEARTH_FL_TOKEN)")
    return tok


def _address(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit():
        fail(f"--server: expected host:port, got {server!r}")
    return host, int(port)


def _load_npz(path: Path) -> list:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return [(k, z[k]) for k in z.files]
    except (OSError, ValueError) as e:
        fail(f"--initial: cannot read {path}: {e}")
        raise  # unreachable


def serve(
    clients: int = typer.Option(..., "--clients", min=1, help="clients per round"),
    initial: Path = typer.Option(..., "--initial", help=".npz with the initial global model"),
    host: str = typer.Option("127.0.0.1", "--host", help="listen address (loopback by default)"),
    port: int = typer.Option(7070, "--port", min=0, max=65535),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="round token (or HEARTH_FL_TOKEN)"
    ),
    pool: str | None = typer.Option(
        None, "--pool", help="attach to this node pool (e.g. hearth-local-8080); default: own pool"
    ),
    fan_in: int = typer.Option(4, "--fan-in", min=1, help="receive slots (updates in flight)"),
    no_shm: bool = typer.Option(False, "--no-shm", help="refuse the shared-memory client path"),
    round_timeout: float | None = typer.Option(
        None, "--round-timeout", help="seconds after a round's first update: close with what came"
    ),
) -> None:
    """Serve FedAvg rounds: updates in, the new global model out to every client.

    Prints one JSON line with the address when ready, then one per finished round; stops on
    SIGTERM/SIGINT and hands every slot back to the pool."""
    _use_malloc()
    from hearth.dataplane.slots import PoolError
    from hearth.functions.fedavg.pack import Header, Layout, PackError, packed_size
    from hearth.functions.fedavg.roundserver import RoundServer, keep_heap

    tok = _token(token_file)
    model = _load_npz(initial)
    try:
        layout = Layout.of(model)
    except PackError as e:
        fail(f"--initial: {e}")
    max_bytes = packed_size(Header("update", 2**40, layout, 2**40, "c" * 200))
    keep_heap()
    own = pool is None
    p = _round_pool(pool, max_bytes, fan_in)
    try:
        srv = RoundServer(
            clients,
            pool=p,
            token=tok,
            max_update_bytes=max_bytes,
            host=host,
            port=port,
            fan_in=fan_in,
            initial=model,
            allow_shm=not no_shm,
            round_timeout=round_timeout,
        )
    except (PoolError, OSError, ValueError) as e:
        if own:
            p.destroy()
        fail(str(e))
    del model
    _serve_rounds(srv, p, own)


def _use_malloc() -> None:
    """Re-exec `hearth fl serve` under PYTHONMALLOC=malloc: Python's own allocator hands empty
    arenas back to the OS and faults fresh ones in every round; on glibc's kept heap
    (warm.keep_heap) later rounds take no page fault. exec, not a child: the same process,
    before anything was set up."""
    if os.environ.get("PYTHONMALLOC") != "malloc" and sys.argv[1:3] == ["fl", "serve"]:
        env = {**os.environ, "PYTHONMALLOC": "malloc"}
        os.execve(sys.executable, [sys.executable, "-m", "hearth.cli", *sys.argv[1:]], env)


def _round_pool(pool: str | None, max_bytes: int, fan_in: int) -> SlotPool:
    """The slots updates arrive in: a pool of this process's own (None: fan_in + 2 slots of
    the largest update, rounded up to 2 MiB), or the named node pool attached."""
    import uuid

    from hearth.dataplane.shm import SlotPool
    from hearth.dataplane.slots import TRIM_OFF, PoolError

    try:
        if pool is None:
            size = -(-max_bytes // (1 << 21)) * (1 << 21)
            return SlotPool.create(
                f"hearth-fl-{uuid.uuid4().hex[:8]}", [(size, fan_in + 2)], trim_threshold=TRIM_OFF
            )
        return SlotPool.attach(pool)
    except (PoolError, OSError, ValueError) as e:
        fail(f"--pool: {e}")
        raise  # unreachable


def _serve_rounds(srv: RoundServer, p: SlotPool, own: bool) -> None:
    """One JSON line with the address, then one per finished round until SIGTERM/SIGINT; then
    the server closed and the pool destroyed (own) or detached, its slots in use printed."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    srv.start()
    print(
        json.dumps({"listening": list(srv.address), "pool": p.name, "pid": os.getpid()}), flush=True
    )
    rnd = 1
    try:
        while not stop.is_set():
            try:
                st = srv.wait_round(rnd, timeout=0.5)
            except TimeoutError:
                continue
            print(
                json.dumps({"round": rnd, "slots_held": srv.slots_held(), **st.to_dict()}),
                flush=True,
            )
            rnd += 1
    finally:
        srv.close()
        used = p.stats()["used"]
        if own:
            p.destroy()
        else:
            p.close()
        print(json.dumps({"stopped": True, "pool_slots_used": used}), flush=True)


def flower_client(
    app_ref: str = typer.Option(..., "--app", help="the ClientApp, module:attribute"),
    server: str = typer.Option("127.0.0.1:7070", "--server", help="round endpoint host:port"),
    partition_id: int = typer.Option(..., "--partition-id", min=0),
    rounds: int = typer.Option(1, "--rounds", min=1),
    app_dir: Path | None = typer.Option(None, "--app-dir", help="directory to import the app from"),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="round token (or HEARTH_FL_TOKEN)"
    ),
    run_config: str = typer.Option("", "--run-config", help="k=v,... passed as context.run_config"),
    shm: bool = typer.Option(False, "--shm", help="same node as the server: shared-memory path"),
    save: Path | None = typer.Option(None, "--save", help="write the last global model (.npz)"),
) -> None:
    """Run a Flower ClientApp, unchanged, as one client of a Hearth round endpoint."""
    import numpy as np
    from hearth.functions.fedavg.client import RoundRefused
    from hearth.functions.fedavg.flower_bridge import BridgeError, load_clientapp, run_clientapp

    tok = _token(token_file)
    cfg: dict = {}
    for part in filter(None, run_config.split(",")):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            fail(f"--run-config: expected k=v, got {part!r}")
        cfg[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    try:
        app = load_clientapp(app_ref, str(app_dir) if app_dir else None)
        model = run_clientapp(
            app,
            _address(server),
            tok,
            rounds=rounds,
            partition_id=partition_id,
            run_config=cfg,
            shm=shm,
        )
    except (BridgeError, RoundRefused, OSError) as e:
        fail(str(e))
    if save is not None:
        np.savez(save, **{name: arr for name, arr in model.layers})
    print(json.dumps({"partition_id": partition_id, "rounds": rounds, "round": model.round_id}))
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("flower-client")(flower_client)
