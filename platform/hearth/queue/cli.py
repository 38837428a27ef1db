"""`hearth publish`, `hearth queues`, `hearth dlq ls|replay|purge` (typer sub-apps).

Registered in hearth/cli.py. Redis URL: --redis, else $HEARTH_REDIS_URL, else the Redis `hearth up` runs. Errors are one line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import redis
import typer

from hearth.config import read_redis_url
from hearth.queue import dlq as dlq_ops
from hearth.queue.producer import publish_sync
from hearth.queue.stats import all_stats
from hearth.queue.wire import PublishError

REDIS_HELP = "Redis URL (default: $HEARTH_REDIS_URL, else the one `hearth up` runs)."


from hearth.cli_errors import fail as _fail  # noqa: E402


def _connect(url: str | None) -> redis.Redis:
    url = url or os.environ.get("HEARTH_REDIS_URL") or read_redis_url()
    if not url:
        _fail("no Redis configured: pass --redis URL or set HEARTH_REDIS_URL")
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
        r.ping()
    except ValueError as e:
        _fail(f"--redis: invalid URL {url!r}: {e}")
    except redis.RedisError as e:
        _fail(f"cannot reach Redis at {url}: {e}")
    return r


def _guess_type(path: str) -> str:
    return {
        ".json": "application/json",
        ".msgpack": "application/msgpack",
        ".mp": "application/msgpack",
        ".txt": "text/plain; charset=utf-8",
    }.get(Path(path).suffix.lower(), "application/octet-stream")


def _headers(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            _fail(f"--header {p!r}: expected NAME=VALUE")
        out[k.strip()] = v
    return out


def publish_cmd(
    stream: str = typer.Argument(..., help="Stream to append to."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Event as JSON; published msgpack-encoded (use --raw for text)."
    ),
    file: str | None = typer.Option(
        None, "--file", "-f", help="Read the payload bytes from a file ('-' = stdin)."
    ),
    content_type: str | None = typer.Option(
        None, "--content-type", "-t", help="Content type (default: by input)."
    ),
    raw: bool = typer.Option(
        False, "--raw", help="With --data: publish the text as-is (text/plain)."
    ),
    header: list[str] = typer.Option(
        [], "--header", "-H", help="Event header NAME=VALUE (repeatable)."
    ),
    count: int = typer.Option(
        1, "--count", "-n", min=1, max=1_000_000, help="Publish the same event N times."
    ),
    redis_url: str | None = typer.Option(None, "--redis", help=REDIS_HELP),
) -> None:
    """Publish an event to a Redis stream; prints the entry id(s)."""
    if (data is None) == (file is None):
        _fail("give exactly one of --data or --file")
    payload: object
    if data is not None:
        if raw:
            payload, ct = data.encode(), content_type or "text/plain; charset=utf-8"
        else:
            try:
                payload = json.loads(data)
            except json.JSONDecodeError as e:
                _fail(
                    f"--data: not valid JSON ({e.msg} at column {e.colno}); use --raw to publish plain text"
                )
            ct = "application/msgpack"
            if content_type and content_type.split(";")[0].strip() != "application/msgpack":
                payload, ct = data.encode(), content_type
    else:
        try:
            payload = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as e:
            _fail(f"--file: cannot read {file}: {e.strerror}")
        ct = content_type or (_guess_type(file) if file != "-" else "application/octet-stream")
    r = _connect(redis_url)
    meta = {"headers": _headers(header)} if header else None
    try:
        for _ in range(count):
            typer.echo(publish_sync(r, stream, payload, ct, meta))
    except PublishError as e:
        _fail(str(e))
    except redis.RedisError as e:
        _fail(f"publish to {stream!r} failed: {e}")


queues_app = typer.Typer(
    help="Queue triggers: backlog, pending, dead letters, delivery rate.",
    no_args_is_help=False,
    invoke_without_command=True,
)


@queues_app.callback(invoke_without_command=True)
def queues_cmd(
    redis_url: str | None = typer.Option(None, "--redis", help=REDIS_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per trigger."),
    no_scan: bool = typer.Option(
        False, "--no-scan", help="Only triggers registered by running runners."
    ),
) -> None:
    """Per trigger: stream length, pending, lag, dead letters, delivery rate."""
    r = _connect(redis_url)
    try:
        stats = all_stats(r, scan=not no_scan)
    except redis.RedisError as e:
        _fail(f"cannot read queue stats: {e}")
    if as_json:
        for s in stats:
            typer.echo(json.dumps(s.to_dict()))
        return
    if not stats:
        typer.echo("no queue triggers found")
        return
    cols = [
        "STREAM",
        "GROUP",
        "FUNCTION",
        "LENGTH",
        "PENDING",
        "LAG",
        "DEAD",
        "RATE/s",
        "PROCESSED",
    ]
    rows = [
        [
            s.stream,
            s.group,
            s.function or "-",
            str(s.length),
            str(s.pending),
            str(s.lag),
            str(s.dead_letters),
            f"{s.delivery_rate:.1f}",
            str(s.processed),
        ]
        for s in stats
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for line in [cols, *rows]:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


dlq_app = typer.Typer(help="Dead-letter streams: list, replay, purge.", no_args_is_help=True)


@dlq_app.command("ls")
def dlq_ls(
    name: str = typer.Argument(..., help="Stream, its DLQ ('<stream>:dlq') or a function name."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = typer.Option(False, "--json"),
    redis_url: str | None = typer.Option(None, "--redis", help=REDIS_HELP),
) -> None:
    """List dead letters with their error, delivery count and payload preview."""
    r = _connect(redis_url)
    q = dlq_ops.resolve_dlq(r, name)
    items = dlq_ops.list_dead(r, q, limit)
    if as_json:
        for d in items:
            typer.echo(json.dumps(d.to_dict()))
        return
    total = r.xlen(q)
    typer.echo(f"{q}: {total} dead letter(s)")
    for d in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.failed_at))
        typer.echo(
            f"{d.id}  {when}Z  {d.kind}  deliveries={d.deliveries}  source={d.source_stream}/{d.source_id}  fn={d.function}"
        )
        typer.echo(f"    error: {d.error[:300]}")
        typer.echo(f"    payload: {d.preview()}")


@dlq_app.command("replay")
def dlq_replay(
    name: str = typer.Argument(..., help="Stream, its DLQ or a function name."),
    ids: list[str] = typer.Option(
        [], "--id", help="Replay only these DLQ entry ids (repeatable); default all."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1),
    redis_url: str | None = typer.Option(None, "--redis", help=REDIS_HELP),
) -> None:
    """Re-publish dead letters to their source stream (original fields) and remove them."""
    r = _connect(redis_url)
    q = dlq_ops.resolve_dlq(r, name)
    try:
        done = dlq_ops.replay(r, q, ids or None, limit)
    except dlq_ops.DLQError as e:
        _fail(str(e))
    for old, new in done:
        typer.echo(f"{old} -> {new}")
    typer.echo(f"replayed {len(done)} dead letter(s) from {q}")


@dlq_app.command("purge")
def dlq_purge(
    name: str = typer.Argument(..., help="Stream, its DLQ or a function name."),
    ids: list[str] = typer.Option([], "--id", help="Delete only these entries; default all."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    redis_url: str | None = typer.Option(None, "--redis", help=REDIS_HELP),
) -> None:
    """Delete dead letters for good."""
    r = _connect(redis_url)
    q = dlq_ops.resolve_dlq(r, name)
    if not yes and not ids:
        n = r.xlen(q)
        if not typer.confirm(f"delete all {n} dead letter(s) in {q}?"):
            _fail("aborted")
    typer.echo(f"purged {dlq_ops.purge(r, q, ids or None)} dead letter(s) from {q}")


# One Typer holding `publish`, `queues` and `dlq`: hearth/cli.py mounts it without a name, so the
# commands sit at the top level (`hearth publish ...`, `hearth queues`, `hearth dlq ls ...`).
app = typer.Typer(no_args_is_help=True)
app.command("publish")(publish_cmd)
app.add_typer(queues_app, name="queues")
app.add_typer(dlq_app, name="dlq")
