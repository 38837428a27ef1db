"""How every `hearth` command reports a failure: one `error: …` line, exit code 1."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def guard(
    errors: Callable[[], tuple[type[BaseException], ...]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command so the expected errors become one line. `errors` is called at failure
    time, so a command module need not import heavy modules just to name their exceptions."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except Exception as e:
                if isinstance(e, errors()):
                    fail(str(e))
                raise

        return wrapper

    return deco
