"""`hearth` command line. Each area contributes a typer sub-app; errors are one clear line."""

from __future__ import annotations

import sys
import time

import typer

app = typer.Typer(
    name="hearth",
    help="Hearth: serverless functions with shared-memory payloads and eBPF routing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


from hearth.cli_errors import fail  # noqa: E402  (re-exported: sub-commands import it here)


# --- core commands ----------------------------------------------------------------------------
def _client():
    from hearth.client import Client

    return Client()


def _run(fn):
    """Run a client call; ClientError/SpecError become one `error:` line."""
    from hearth.client import ClientError
    from hearth.spec import SpecError

    try:
        return fn()
    except (ClientError, SpecError) as e:
        fail(str(e))


@app.command()
def up(
    port: int = typer.Option(None, help="Gateway port (default 8080 or HEARTH_PORT)."),
    host: str = typer.Option(
        None, help="Listen address (default 127.0.0.1; anything else exposes the gateway)."
    ),
    dataplane: str = typer.Option(None, help="Data-plane mode: auto | ebpf | unix."),
    warm_pool: int = typer.Option(
        1, help="Generic pre-started instances kept ready for fast cold starts."
    ),
    role: str = typer.Option(
        "all",
        help="all (one node, embedded) | node-agent (one node of many, sharing Redis) | "
        "gateway (front proxy to the node agents in HEARTH_NODE_AGENTS).",
    ),
) -> None:
    """Start Hearth on this machine (gateway, node agent, proxy, Redis) in the foreground."""
    import asyncio
    import logging

    from hearth.config import Settings
    from hearth.process import StartupError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env(port=port, host=host, dataplane_mode=dataplane)
        if role == "gateway":
            import os as _os

            from hearth.up_front import serve_front

            asyncio.run(serve_front(settings, _os.environ.get("HEARTH_NODE_AGENTS", "")))
        elif role in ("all", "node-agent"):
            from hearth.up import serve_forever

            asyncio.run(serve_forever(settings, warm_pool_size=warm_pool))
        else:
            fail(f"--role must be all, node-agent or gateway, not {role!r}")
    except (StartupError, ValueError) as e:
        fail(str(e))


@app.command()
def deploy(spec_file: str = typer.Argument(..., help="Function spec (YAML or JSON).")) -> None:
    """Deploy (or redeploy) a function from its spec file."""
    from hearth.spec import load_spec

    spec = _run(lambda: load_spec(spec_file))
    r = _run(lambda: _client().deploy(spec.to_dict()))
    typer.echo(f"{'deployed' if r.get('created') else 'redeployed'} {spec.name}")


@app.command("ls")
def list_functions() -> None:
    """List deployed functions and their instances."""
    fns = _run(lambda: _client().functions())
    if not fns:
        typer.echo("no functions deployed")
        return
    typer.echo(f"{'NAME':<24}{'HANDLER':<40}{'INSTANCES':>10}{'QUEUED':>8}  POLICY")
    for f in fns:
        st = f.get("status") or {}
        typer.echo(
            f"{f['name']:<24}{f['handler']:<40}{len(st.get('instances', [])):>10}{st.get('queued', 0):>8}  {f['keep_alive']['policy']}/{f['keep_alive']['ttl_s']:g}s"
        )


def _invoke_with(client, name, body, content_type, is_async, token):  # noqa: ANN001, ANN202
    # the operator's CLI holds the admin token: it may invoke any function and learns whether
    # an unknown name exists (anonymous callers cannot tell)
    return client.invoke(name, body, content_type, is_async=is_async, token=token or client.token)


def _call_line(status: int, headers: dict[str, str], round_trip_s: float) -> str:
    """`invoke -v`'s line: what the gateway's headers say of the call (one line, stderr)."""
    h = {k.lower(): v for k, v in headers.items()}
    parts = [f"HTTP {status}"]
    if "x-hearth-cold" in h:
        parts.append("cold start" if h["x-hearth-cold"] == "1" else "warm")
    if "x-hearth-instance" in h:
        parts.append(f"instance {h['x-hearth-instance']}")
    if "x-hearth-duration" in h:
        parts.append(f"handler {float(h['x-hearth-duration']) * 1000:.1f} ms")
    parts.append(f"round trip {round_trip_s * 1000:.1f} ms")
    return "# " + " · ".join(parts)


@app.command()
def invoke(
    name: str,
    data: str = typer.Option(None, "--data", "-d", help="Body as a string."),
    file: str = typer.Option(None, "--file", "-f", help="Body from a file ('-' for stdin)."),
    content_type: str = typer.Option(
        None,
        "--content-type",
        "-t",
        help="Default: application/json if --data parses as JSON, else octet-stream.",
    ),
    is_async: bool = typer.Option(
        False, "--async", help="Return at once with an invocation id (202)."
    ),
    token: str = typer.Option(None, help="The function's invoke token, if it has one."),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Also say, on stderr, whether the call was a cold start, which instance served it, "
        "how long the handler ran and the round trip.",
    ),
) -> None:
    """Invoke a function and print its result."""
    import json as _json
    import sys as _sys
    from pathlib import Path as _Path

    if data is not None and file is not None:
        fail("give --data or --file, not both")
    if file == "-":
        body = _sys.stdin.buffer.read()
    elif file is not None:
        try:
            body = _Path(file).read_bytes()
        except OSError as e:
            fail(f"cannot read {file}: {e.strerror}")
    else:
        body = (data or "").encode()
    if content_type is None:
        try:
            _json.loads(body) if body else None
            content_type = "application/json" if body else "application/octet-stream"
        except ValueError:
            content_type = "application/octet-stream"
    t0 = time.perf_counter()
    rep = _run(lambda: _invoke_with(_client(), name, body, content_type, is_async, token))
    if verbose:
        typer.echo(_call_line(rep.status, rep.headers, time.perf_counter() - t0), err=True)
    if rep.status == 202:
        typer.echo(rep.json()["invocation_id"])
        return
    ct = rep.headers.get("Content-Type", "")
    if ct.startswith(("application/json", "text/")):
        typer.echo(rep.body.decode(errors="replace"))
    else:
        _sys.stdout.buffer.write(rep.body)
        _sys.stdout.flush()


@app.command()
def result(invocation_id: str) -> None:
    """Show the result of an async invocation."""
    import json as _json

    typer.echo(_json.dumps(_run(lambda: _client().invocation(invocation_id)), indent=2))


@app.command()
def rm(name: str) -> None:
    """Remove a function (its instances finish in-flight work first)."""
    _run(lambda: _client().delete(name))
    typer.echo(f"removed {name}")


@app.command()
def status() -> None:
    """Node status: data-plane mode, slot pool, instances (every node's, through a front)."""
    st = _run(lambda: _client().status())
    if "nodes" not in st:  # a node agent
        _echo_node_status(st)
        return
    for url, node in st["nodes"].items():  # a front gateway: each of its agents
        if "error" in node:
            typer.echo(f"agent {url}: no status ({node['error']}: {node.get('detail', '')})")
            continue
        typer.echo(f"agent {url}:")
        _echo_node_status(node)


def _echo_node_status(st: dict) -> None:
    """One node's block of `hearth status`."""
    typer.echo(f"node {st['node']}  data plane: {st['dataplane']}  warm pool: {st['warm_pool']}")
    for name, f in st["functions"].items():
        states = (
            ", ".join(f"{i['state']}(pid {i['pid']}, served {i['served']})" for i in f["instances"])
            or "scaled to zero"
        )
        typer.echo(f"  {name}: {states}; queued {f['queued']}")
    if "queues" in st:
        for q in st["queues"]:
            typer.echo(f"  stream {q}")


@app.command()
def openapi() -> None:
    """Print the gateway's OpenAPI document (kept in docs/openapi.json)."""
    import json as _json

    from hearth.gateway.openapi import OPENAPI

    typer.echo(_json.dumps(OPENAPI, indent=2, sort_keys=True))


@app.command()
def demo(
    fast: bool = typer.Option(False, help="Skip the longer parts (FL round, replay)."),
    out: str = typer.Option("out/demo", help="Where the demo writes its report."),
) -> None:
    """Start Hearth, deploy example functions, invoke them, show cold vs warm, shut down."""
    from hearth.demo import run_demo

    raise typer.Exit(run_demo(fast=fast, out=out))


# --- sub-apps: one line per area (keep each registration on its own line) ---------------------
# (areas add `app.add_typer(<module>.app, name=...)` lines here)
app.add_typer(__import__("hearth.queue.cli", fromlist=["app"]).app)  # publish, queues, dlq
app.add_typer(
    __import__("hearth.functions.replay.cli", fromlist=["x"]).trace_app, name="trace"
)  # replay
app.add_typer(
    __import__("hearth.functions.replay.cli", fromlist=["x"]).coldstarts_app, name="coldstarts"
)  # replay
__import__("hearth.functions.replay.cli", fromlist=["x"]).coldstarts_app.command("export")(
    __import__("hearth.coldstart_log", fromlist=["x"]).export_cmd
)  # platform
app.command("replay")(
    __import__("hearth.functions.replay.cli", fromlist=["x"]).replay_cmd
)  # replay
app.add_typer(__import__("hearth.functions.fedavg.cli", fromlist=["app"]).app, name="fl")  # fedavg
app.add_typer(
    __import__("hearth.dataplane.cli", fromlist=["app"]).app, name="dataplane"
)  # dataplane
app.add_typer(
    __import__("hearth.functions.vecsearch.cli", fromlist=["app"]).app, name="vec"
)  # vecsearch


def main() -> None:
    try:
        app()
    except Exception as e:
        import redis

        if not isinstance(e, redis.RedisError):
            raise
        # Every command that talks to Redis: a refused id, a lost connection → one line.
        typer.echo(f"error: Redis: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
