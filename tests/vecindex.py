"""The small vecsearch index file the serving tests search (in process, on `hearth up`, and the
chart's example handler): GloVe-like rows with attributes, ids and labels, four partitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hearth.functions.vecsearch import build, storage


def index_file(split: Any, directory: Path) -> Path:
    """Build the index of `split` (a `data.glove_split`) and save it as `directory`/g.hvx."""
    idx = build.build_index(
        split.base, split.attrs, ids=split.base_ids, labels=split.words, n_partitions=4
    )
    path = Path(directory) / "g.hvx"
    storage.save(idx, path)
    return path
