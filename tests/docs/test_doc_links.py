"""Every relative link in README.md and docs/**/*.md resolves: the file exists and, for a
`#fragment`, a heading of that file has that GitHub anchor. The docs link to each other's
sections by anchor (e.g. `platform.md#current-figures`), and a renamed or moved heading breaks
such a link silently; this keeps them honest. Standard library only, a fraction of a second."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the text may hold one level of brackets or code
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).+?\1")
HTML_ID = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: the rendered text lowercased, punctuation and
    symbols dropped (letters, digits, `_`, `-` and spaces kept), each space a `-`."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a reader can link to in `path`: its headings' (GitHub numbers repeats
    `-1`, `-2`, ...) and explicit `<a name=...>` / `id=` ones."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ID.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(root: Path = ROOT) -> list[str]:
    cache: dict[Path, set[str]] = {}
    broken = []
    for doc in doc_files(root):
        for n, line in prose_lines(doc.read_text(encoding="utf-8")):
            for target in LINK.findall(CODE_SPAN.sub("", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto:, ...
                    continue
                path_part, _, fragment = target.partition("#")
                dest = (doc.parent / unquote(path_part)).resolve() if path_part else doc
                where = f"{doc.relative_to(root)}:{n}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif fragment and dest.suffix == ".md":
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if unquote(fragment) not in cache[dest]:
                        broken.append(f"{where} (no such anchor in {dest.name})")
    return broken


def test_slug_is_githubs():
    assert slug("Metrics (`GET /metrics`, Prometheus text; needs the admin or metrics token)") == (
        "metrics-get-metrics-prometheus-text-needs-the-admin-or-metrics-token"
    )
    assert slug("The lean HTTP path for the warm invoke (`hearth.gateway.fastpath`)") == (
        "the-lean-http-path-for-the-warm-invoke-hearthgatewayfastpath"
    )
    assert slug("7 Dec 2026 — Eleventh stop: one `sendmsg`, ≤ 2 ms") == (
        "7-dec-2026--eleventh-stop-one-sendmsg--2-ms"
    )
    assert slug("[The link](x.md) and `HEARTH_SPIN_US`") == "the-link-and-hearth_spin_us"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("[a](docs/a.md#there) [b](docs/a.md#gone)\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# There\n\n```\n[c](missing.md)\n# Gone\n```\n[d](missing.md) `[e](missing.md)`\n"
    )
    assert broken_links(tmp_path) == [
        "README.md:1: docs/a.md#gone (no such anchor in a.md)",
        "docs/a.md:7: missing.md (no such file)",
    ]


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    assert broken_links() == []
