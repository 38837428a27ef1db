"""Hearth's own cold starts, kept in Redis by `hearth up` and exported in the columns of the
public Huawei cold-start trace (hearth.controller.coldstarts), so the trace analyser reads them
like the public traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from hearth.controller.coldstarts import ColdStartRecord, from_local_phases, pod_id, to_huawei_csv


def to_records(raw: list[dict[str, Any]], cluster: str = "local") -> list[ColdStartRecord]:
    """Agent cold-start entries → Huawei-schema records (day/time relative to the first one)."""
    if not raw:
        return []
    origin = min(r["phases"]["requested"] for r in raw)
    out = []
    for n, r in enumerate(raw):
        out.append(
            from_local_phases(
                r["phases"],
                function=r["function"],
                pod=pod_id(int(r.get("cpu_millicores", 500)), int(r.get("memory_mb", 256)), n),
                from_pool=bool(r.get("from_pool")),
                cluster=r.get("node") or cluster,
                request_id=r.get("instance", ""),
                origin=origin,
            )
        )
    return out


def export_cmd(
    out: Path = typer.Option(
        Path("hearth-coldstarts.csv"), "--out", "-o", help="CSV file to write."
    ),
    fmt: str = typer.Option(
        "huawei", "--format", help="Only 'huawei' (the public trace's columns, plus fromPool)."
    ),
) -> None:
    """Export this node's cold starts as a CSV in the Huawei cold-start trace columns."""
    from hearth.cli import fail
    from hearth.client import Client, ClientError

    if fmt != "huawei":
        fail(f"--format must be 'huawei', not {fmt!r}")
    try:
        raw = Client().request("GET", "/v1/coldstarts", admin=True).json()["coldstarts"]
    except ClientError as e:
        fail(str(e))
    n = to_huawei_csv(to_records(raw), out)
    typer.echo(f"wrote {n} cold start(s) to {out}")
