"""`hearth vec`: build, query and inspect vector indexes. Errors are one `error: ...` line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from hearth.cli_errors import guard

app = typer.Typer(
    help="Quantized vector search with attribute filters (SQUASH-style).", no_args_is_help=True
)


def _errors() -> tuple[type[BaseException], ...]:
    from .storage import IndexFormatError

    return (IndexFormatError, ValueError, FileNotFoundError, OSError)


_guard = guard(_errors)


def _read_table(path: Path) -> dict[str, np.ndarray]:
    """Attribute columns from parquet or CSV (numeric columns stay numeric; others categorical)."""
    if not path.exists():
        raise FileNotFoundError(f"--attrs: no such file {path}")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        import pyarrow.csv as pcsv

        opts = pcsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        table = pcsv.read_csv(path, parse_options=opts)
    else:
        raise ValueError(f"--attrs: expected a .parquet or .csv file, got '{path.suffix}'")
    out = {}
    for name in table.column_names:
        col = table.column(name).to_numpy(zero_copy_only=False)
        out[name] = col if col.dtype.kind in "biuf" else np.asarray([str(v) for v in col])
    return out


def _int_ids(col: np.ndarray, where: str) -> np.ndarray:
    """The index keeps int64 ids: a column of other values is named with its first bad one
    (numpy's own message, "invalid literal for int() ... 'v0'", named neither the option nor
    the column, and 1.5 became 1 silently)."""
    if col.dtype.kind in "biu":
        return col.astype(np.int64)
    if col.dtype.kind == "f" and np.isfinite(col).all() and (col == np.round(col)).all():
        return col.astype(np.int64)
    bad = next(v for v in col if not (isinstance(v, float) and float(v).is_integer()))
    raise ValueError(f"{where} must hold integer ids; it holds {str(bad)!r}")


@app.command("build")
@_guard
def build_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="Index file to write."),
    glove: bool = typer.Option(
        False, "--glove", help="Index GloVe 6B 50-d (installed package) with rank/len/u attributes."
    ),
    n: int = typer.Option(0, "--n", help="With --glove: first N words only (0 = all 400k)."),
    npy: Path | None = typer.Option(None, "--npy", help="Vectors as a .npy (n, d) float array."),
    attrs: Path | None = typer.Option(
        None, "--attrs", help="Attribute columns (.parquet or .csv), one row per vector."
    ),
    ids_column: str | None = typer.Option(
        None, "--ids-column", help="Attribute column holding external ids (integers)."
    ),
    metric: str = typer.Option("l2", "--metric", help="l2, cosine or ip."),
    partitions: int = typer.Option(
        0, "--partitions", help="Partitions (0 = about 12.5k rows each)."
    ),
    bits: float = typer.Option(3.5, "--bits", help="Bit budget per dimension (OSQ)."),
    quantizer: str = typer.Option(
        "auto", "--quantizer", help="auto (rabitq from 128 dims, osq below), osq or rabitq."
    ),
    recall_target: float = typer.Option(
        0.95, "--recall-target", help="Calibrate search effort for this recall@10 (0 = skip)."
    ),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Build an index file."""
    from . import build, data, storage

    labels = None
    ids = None
    if glove == (npy is not None):
        raise ValueError("give exactly one of --glove or --npy")
    if glove:
        vecs, words = data.load_glove(n or None)
        rng = np.random.default_rng(seed)
        cols: dict[str, Any] = {
            "rank": np.arange(1, len(vecs) + 1),
            "len": np.array([len(w) for w in words]),
            "u": rng.integers(0, 1000, len(vecs)),
        }
        labels = words
    else:
        if not npy.exists():
            raise FileNotFoundError(f"--npy: no such file {npy}")
        vecs = np.load(npy, mmap_mode="r")
        cols = _read_table(attrs) if attrs else {}
        if ids_column:
            if ids_column not in cols:
                raise ValueError(f"--ids-column: no column '{ids_column}' in {attrs}")
            ids = _int_ids(cols.pop(ids_column), f"--ids-column: column '{ids_column}' in {attrs}")
    idx = build.build_index(
        vecs,
        cols,
        ids=ids,
        labels=labels,
        metric=metric,
        n_partitions=partitions or None,
        bits_per_dim=bits,
        seed=seed,
        progress=progress,
        quantizer=quantizer,
        recall_target=recall_target or None,
    )
    size = storage.save(idx, output)
    typer.echo(
        f"built {output}: {idx.n_rows} vectors x {idx.dims} dims ({idx.quantizer}), {idx.n_partitions} partitions / {idx.n_lists} lists, "
        f"{idx.bytes_per_vector():.1f} B/vector in memory, file {size / 1e6:.1f} MB, {idx.build_info['seconds']} s"
    )


def _load_queries(vector: str | None, queries: Path | None, word: str | None, idx) -> np.ndarray:
    given = [x is not None for x in (vector, queries, word)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --vector, --queries or --word")
    if vector is not None:
        try:
            v = json.loads(vector)
        except ValueError as e:
            raise ValueError(f"--vector: not a JSON list ({e})") from e
        return v
    if word is not None:
        if idx.labels is None or word not in idx.labels:
            raise ValueError(f"--word: '{word}' is not a label of this index")
        return np.asarray(idx.raw[idx.labels.index(word)])[None, :]
    if not queries.exists():
        raise FileNotFoundError(f"--queries: no such file {queries}")
    if queries.suffix == ".npy":
        return np.load(queries)
    try:
        return json.loads(queries.read_text())
    except ValueError as e:
        raise ValueError(f"--queries: expected .npy or a JSON list of vectors ({e})") from e


@app.command("query")
@_guard
def query_cmd(
    index: Path = typer.Argument(..., help="Index file."),
    vector: str | None = typer.Option(None, "--vector", help="One query vector as a JSON list."),
    queries: Path | None = typer.Option(
        None, "--queries", help="Queries: .npy (q, d) or JSON list of lists."
    ),
    word: str | None = typer.Option(
        None, "--word", help="Use the indexed vector labelled WORD as the query."
    ),
    k: int = typer.Option(10, "-k", help="Neighbours per query."),
    filter_: str | None = typer.Option(
        None, "--filter", help='Predicate JSON, e.g. {"attr": "rank", "lt": 32000}.'
    ),
    metric: str | None = typer.Option(
        None, "--metric", help="l2 / ip (l2 and ip indexes) or cosine."
    ),
    exact: bool = typer.Option(False, "--exact", help="Brute force (recall 1.0)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Search an index."""
    from . import query, storage
    from .predicates import QueryError

    idx = storage.load(index)
    flt = None
    if filter_ is not None:
        try:
            flt = json.loads(filter_)
        except ValueError as e:
            raise ValueError(f"--filter: not valid JSON ({e})") from e
    qs = _load_queries(vector, queries, word, idx)
    try:
        res = query.search(idx, qs, k, flt=flt, metric=metric, exact=exact)
    except QueryError as e:
        raise ValueError(str(e)) from e
    results = res.to_json()
    if idx.labels is not None:
        pos = idx.position_of()
        for row in results:
            row["labels"] = [idx.labels[pos[i]] for i in row["ids"]]
    if as_json:
        typer.echo(json.dumps({"results": results, "stats": res.stats}))
        return
    for qi, row in enumerate(results):
        typer.echo(f"query {qi}: {len(row['ids'])} results")
        for j, (i, d) in enumerate(zip(row["ids"], row["distances"], strict=True)):
            label = f"  {row['labels'][j]}" if "labels" in row else ""
            typer.echo(f"  {j + 1:>3}. id={i:<10} dist={d:.5f}{label}")


@app.command("info")
@_guard
def info_cmd(
    index: Path = typer.Argument(..., help="Index file."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show an index's header, sizes and memory per vector."""
    from . import handlers, storage

    out = handlers.info(storage.load(index))
    if as_json:
        typer.echo(json.dumps(out))
        return
    for key, v in out.items():
        if key == "partition_sizes":
            v = f"min {min(v)} / max {max(v)} over {len(v)}"
        typer.echo(f"{key:>16}: {v}")
