"""`hearth` command line. Each area contributes a typer sub-app; errors are one clear line."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="hearth",
    help="Hearth: serverless functions with shared-memory payloads and eBPF routing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class CLIError(Exception):
    """Printed as `error: <message>` with exit code 1, never a traceback."""


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# --- sub-apps: one line per area (keep each registration on its own line) ---------------------
# (areas add `app.add_typer(<module>.app, name=...)` lines here)


def main() -> None:
    try:
        app()
    except CLIError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
