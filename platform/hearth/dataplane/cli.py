"""`hearth dataplane ...`: run the node proxy, show its mode and counters, inspect slot pools."""

from __future__ import annotations

import json
import os

import typer

app = typer.Typer(
    name="dataplane",
    help="Data plane: proxy daemon (eBPF / AF_UNIX), descriptor counters, shared-memory pools.",
    no_args_is_help=True,
)

DEFAULT_SOCKET = os.environ.get("HEARTH_PROXY_SOCKET", "/run/hearth/proxy.sock")


from hearth.cli_errors import fail as _fail  # noqa: E402


@app.command("proxy")
def proxy(
    socket: str = typer.Option(DEFAULT_SOCKET, help="control socket path (created 0600)"),
    mode: str = typer.Option(
        os.environ.get("HEARTH_PROXY_MODE", "auto"), help="auto | ebpf | unix"
    ),
) -> None:
    """Run the per-node proxy daemon in the foreground."""
    from hearth.proxies.daemon import main

    os.makedirs(os.path.dirname(socket) or ".", mode=0o700, exist_ok=True)
    raise typer.Exit(main(["--socket", socket, "--mode", mode]))


def local_node_socket() -> str:
    """The control socket to query when none is given: $HEARTH_PROXY_SOCKET, else the one a
    local `hearth up` made (HEARTH_NODE_SOCKET_DIR or <state>/run, proxy-<HEARTH_PORT>.sock) if
    it is there, else the chart's /run/hearth/proxy.sock. A user of the README's node has no
    /run/hearth: the fixed default answered them 'No such file or directory'."""
    if os.environ.get("HEARTH_PROXY_SOCKET"):
        return os.environ["HEARTH_PROXY_SOCKET"]
    from hearth.config import Settings
    from hearth.redis_server import state_dir

    s = Settings.from_env()
    run = os.environ.get("HEARTH_NODE_SOCKET_DIR") or str(state_dir() / "run")
    mine = os.path.join(run, f"proxy-{s.port}.sock")
    return mine if os.path.exists(mine) else DEFAULT_SOCKET


@app.command("stats")
def stats(
    socket: str | None = typer.Option(
        None,
        help="the proxy daemon's control socket (default: $HEARTH_PROXY_SOCKET, else the local "
        "`hearth up`'s <state>/run/proxy-<port>.sock, else /run/hearth/proxy.sock)",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON"),
) -> None:
    """Which mode the proxy runs in, its endpoints and per-destination counters."""
    from hearth.dataplane.endpoint import proxy_stats

    socket = socket or local_node_socket()
    try:
        st = proxy_stats(socket)
    except FileNotFoundError:
        _fail(f"no proxy daemon at {socket}: is `hearth up` running? (--socket names another)")
    except (OSError, RuntimeError) as e:
        _fail(f"cannot query proxy at {socket}: {e}")
    if as_json:
        typer.echo(json.dumps(st))
        return
    typer.echo(f"mode: {st['mode']} ({st['reason']})")
    typer.echo(f"endpoints: {', '.join(map(str, st['endpoints'])) or '-'}")
    typer.echo(f"unrouted: {st['unrouted']}  daemon_relayed: {st['daemon_relayed']}")
    for dst, c in st["per_dst"].items():
        typer.echo(f"  dst {dst}: {c['msgs']} msgs, {c['bytes']} payload bytes")


@app.command("pool")
def pool(name: str = typer.Argument(..., help="pool name (file in /dev/shm)")) -> None:
    """Slot usage per size class of a node's shared-memory pool."""
    from hearth.dataplane.shm import SlotPool
    from hearth.dataplane.slots import PoolError

    try:
        p = SlotPool.attach(name)
    except (OSError, PoolError) as e:
        _fail(str(e))
    try:
        typer.echo(json.dumps(p.stats(), indent=2))
    finally:
        p.close()


@app.command("cleanup")
def cleanup(prefix: str = typer.Option("hearth-", help="segment name prefix")) -> None:
    """Remove /dev/shm pool segments whose creating process is dead."""
    from hearth.dataplane.segment import cleanup_stale_segments

    removed = cleanup_stale_segments(prefix)
    typer.echo(
        f"removed {len(removed)} stale segment(s){': ' + ', '.join(removed) if removed else ''}"
    )
