"""Ingest a corpus: the packaged Wikipedia summaries or a folder of documents -> corpus table.

`load_corpus` is a pure function (no Prefect, no MLflow): it returns the corpus table (columns and
ids in docs/contracts.md, sorted by doc_id) and a JSON-serialisable report of what was kept and
what was skipped. Unusable *files* (binary, invalid UTF-8, absurdly long lines, symlinks leaving
the folder, unsupported types) and unusable *lines* of a JSONL file are skipped and reported
with their path and line; only a source that yields no document at all raises `DataError`.

Files are read in a streaming way: a line is read in bounded pieces, so a 50 MB single-line file
is rejected after reading about 4 bytes per allowed character rather than decoded whole; a
single-document file bigger than `ingest.max_file_bytes` is skipped before it is opened, and a
plain-text file keeps no more than `ingest.max_chars` characters while it is counted. HTML pages
keep their main content (trafilatura), without navigation, sidebars, footers or "¶" marks. Files
whose names are not valid UTF-8 are skipped (reported with the bytes escaped).
Hidden files and folders (names starting with ".") are ignored, as are symlinked folders that
stay inside the source folder (their files are reached through the real path anyway).
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ragops.config import IngestConfig
from ragops.errors import DataError
from ragops.io import atomic_path
from ragops.resources import default_corpus_file

DEFAULT_SOURCE_NAME = "wiki-summaries"
COLUMNS = ["doc_id", "title", "text", "source", "description", "topic"]
SUPPORTED = {".txt": "txt", ".md": "md", ".html": "html", ".htm": "html", ".jsonl": "jsonl"}
NO_DOCUMENTS = "no .txt, .md, .html or .jsonl documents found"
BINARY_SNIFF_BYTES = 8192
MAX_TITLE_CHARS = 200  # a longer first line is a paragraph, not a title: the file stem is used instead
_READ_PIECE = 1 << 20


# --------------------------------------------------------------------------------------------------
# text normalisation
# --------------------------------------------------------------------------------------------------
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# C0/C1 control characters other than tab and the line breaks above; also BOM / zero-width no-break.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")


def normalize_text(text: str) -> str:
    """NFC, control characters removed, whitespace runs collapsed to one space; line breaks are kept
    as a single "\\n" (blank lines and indentation disappear), leading/trailing whitespace stripped."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    lines = (" ".join(line.split()) for line in _LINE_BREAKS.split(text))
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------------------------------
# reading files safely
# --------------------------------------------------------------------------------------------------
class _Skip(Exception):
    """A file (or one JSONL line) that cannot be used; reported, never fatal on its own."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


def _utf8_chars(data: bytes) -> int:
    """Characters in UTF-8 bytes without decoding them (continuation bytes do not start one)."""
    return len(data.translate(None, _UTF8_CONTINUATION))


def _iter_lines(path: Path, max_line_chars: int):
    """Yield (line number, decoded line without its newline) from a UTF-8 text file.

    Raises _Skip for a binary file (NUL in the first 8 KiB), invalid UTF-8 (with the byte offset)
    or a line longer than `max_line_chars` (its full length is counted without keeping it).
    """
    limit_bytes = 4 * max_line_chars + 4  # a UTF-8 character is at most 4 bytes
    with open(path, "rb") as handle:
        if b"\x00" in handle.read(BINARY_SNIFF_BYTES):
            raise _Skip("binary file")
        handle.seek(0)
        offset = 0
        line_no = 0
        while True:
            raw = handle.readline(limit_bytes)
            if not raw:
                return
            line_no += 1
            start = offset
            offset += len(raw)
            if not raw.endswith(b"\n") and len(raw) == limit_bytes:
                chars = _utf8_chars(raw)
                while True:  # count the rest of the enormous line in bounded pieces
                    piece = handle.readline(_READ_PIECE)
                    if not piece:
                        break
                    chars += _utf8_chars(piece)
                    if piece.endswith(b"\n"):
                        chars -= 1
                        break
                raise _Skip(f"line {line_no} is {chars:,} characters long (limit {max_line_chars:,})", line_no)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _Skip(f"invalid UTF-8 at byte {start + error.start}", line_no) from None
            if text.endswith("\n"):
                text = text[:-1]
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            if len(text) > max_line_chars:
                raise _Skip(f"line {line_no} is {len(text):,} characters long (limit {max_line_chars:,})", line_no)
            yield line_no, text


def _read_text(path: Path, max_line_chars: int) -> str:
    return "\n".join(line for _, line in _iter_lines(path, max_line_chars))


def _check_file_size(path: Path, cfg: IngestConfig) -> None:
    """Skip a single-document file that is too big before reading any of it."""
    size = path.stat().st_size
    if size > cfg.max_file_bytes:
        raise _Skip(f"file is {size:,} bytes (limit ingest.max_file_bytes = {cfg.max_file_bytes:,})")


def _read_normalized_text(path: Path, cfg: IngestConfig) -> str:
    """The normalised text of a plain-text file, read line by line: once it exceeds
    `cfg.max_chars` nothing more is kept, only counted, so memory stays bounded by the limit.
    (`normalize_text` works line by line, so normalising each line gives the same text.)"""
    kept: list[str] = []
    total = 0
    for _, line in _iter_lines(path, cfg.max_line_chars):
        clean = normalize_text(line)
        if not clean:
            continue
        total += len(clean) + (1 if total else 0)
        if total <= cfg.max_chars:
            kept.append(clean)
    if total > cfg.max_chars:
        raise _Skip(f"text is {total:,} characters long (limit {cfg.max_chars:,})")
    return "\n".join(kept)


# --------------------------------------------------------------------------------------------------
# light markup stripping
# --------------------------------------------------------------------------------------------------
_MD_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}(\s+|$)")
_MD_HEADING_TAIL = re.compile(r"\s+#+\s*$")
_MD_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_MD_QUOTE = re.compile(r"^\s{0,3}(>\s?)+")
_MD_BULLET = re.compile(r"^(\s*)[-*+]\s+")
_MD_RULE = re.compile(r"^\s{0,3}([-*_]\s*){3,}$")
_MD_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$")
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_MD_REFLINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_MD_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>")
_MD_CODE = re.compile(r"`+([^`]+?)`+")
_MD_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_MD_EM_STAR = re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])")
_MD_EM_UNDER = re.compile(r"(?<![\w_])_(?=\S)(.+?)(?<=\S)_(?![\w_])")
_MD_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")


# Raw HTML in Markdown prose (<br>, <div align="center">, <!-- comments -->); not autolinks (<https://...>).
_MD_RAW_HTML = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_MD_CODE_SPAN = re.compile(r"(`+[^`]+?`+)")


def _strip_raw_html(line: str) -> str:
    """Raw HTML tags go, except inside code spans (a `<div>` there is what the text is about)."""
    parts = _MD_CODE_SPAN.split(line)  # odd positions are the code spans
    return "".join(part if i % 2 else _MD_RAW_HTML.sub("", part) for i, part in enumerate(parts))


def _md_inline(line: str) -> str:
    line = _strip_raw_html(line)
    line = _MD_IMAGE.sub(r"\1", line)
    line = _MD_LINK.sub(r"\1", line)
    line = _MD_REFLINK.sub(r"\1", line)
    line = _MD_AUTOLINK.sub(r"\1", line)
    line = _MD_CODE.sub(r"\1", line)
    line = _MD_STRONG.sub(r"\2", line)
    line = _MD_EM_STAR.sub(r"\1", line)
    line = _MD_EM_UNDER.sub(r"\1", line)
    return _MD_STRIKE.sub(r"\1", line)


def strip_markdown(text: str) -> str:
    """Headings' #, emphasis, links -> link text, images -> alt text, quote and bullet markers and
    raw HTML tags go; the content of code fences and code spans is kept verbatim (only the fence
    lines and backticks go), so an HTML example stays text."""
    out: list[str] = []
    in_fence = False
    for line in text.split("\n"):
        if _MD_FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            out.append(line)
            continue
        if _MD_REFDEF.match(line) or _MD_RULE.match(line) or (out and out[-1].strip() and _MD_SETEXT.match(line)):
            continue
        if _MD_HEADING.match(line):
            line = _MD_HEADING_TAIL.sub("", _MD_HEADING.sub("", line, count=1))
        line = _MD_QUOTE.sub("", line)
        line = _MD_BULLET.sub(r"\1", line)
        out.append(_md_inline(line))
    return "\n".join(out)


# Page furniture that is never a document's content: site navigation, and banners, footers and
# sidebars outside the main content (inside <main>/<article> a header holds the title, an aside a note).
_FURNITURE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}
_FURNITURE_OUTSIDE_MAIN = {"header", "footer", "aside"}
_NOT_TEXT = {"script", "style", "noscript", "template", "svg", "iframe", "object", "head"}
# Permalink marks after headings (Sphinx's "¶", MkDocs' "#"/"§", GitHub's link icon).
_ANCHOR_MARKS = {"¶", "§", "#", "🔗"}
_BLOCK = {
    "address", "article", "aside", "blockquote", "br", "dd", "details", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
    "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table",
    "td", "th", "tr", "ul", "title", "body", "html",
}


def _parse_html(html: str):
    """An lxml tree of the page (fragments included), or None for a page without any element."""
    import lxml.html
    from lxml.etree import ParserError
    from trafilatura import load_html

    tree = load_html(html)
    if tree is None:  # trafilatura refuses fragments such as "<p>text</p>"
        try:
            tree = lxml.html.document_fromstring(html.encode("utf-8"), parser=lxml.html.HTMLParser(encoding="utf-8"))
        except (ParserError, ValueError):
            return None
    return tree


def _inside_main(element) -> bool:
    return any(parent.tag in ("main", "article") or parent.get("role") == "main" for parent in element.iterancestors())


def _drop_furniture(tree) -> None:
    doomed = []
    for element in tree.iter():
        if not isinstance(element.tag, str):  # comments, processing instructions
            continue
        classes = (element.get("class") or "").split()
        if element.tag == "nav" or element.get("role") in _FURNITURE_ROLES:
            doomed.append(element)
        elif element.tag in _FURNITURE_OUTSIDE_MAIN and not _inside_main(element):
            doomed.append(element)
        elif "headerlink" in classes or (
            element.tag in ("a", "span", "button") and len(element) == 0 and (element.text or "").strip() in _ANCHOR_MARKS
        ):
            doomed.append(element)
    for element in doomed:
        if element.getparent() is not None:
            element.drop_tree()  # keeps the element's tail text


def _plain_text(element) -> str:
    """Every visible text of `element`, block elements on their own lines (the fallback extractor)."""
    parts: list[str] = []

    def walk(node) -> None:
        if isinstance(node.tag, str) and node.tag not in _NOT_TEXT:
            block = node.tag in _BLOCK
            if block:
                parts.append("\n")
            parts.append(node.text or "")
            for child in node:
                walk(child)
            if block:
                parts.append("\n")
        parts.append(node.tail or "")

    walk(element)
    return "".join(parts)


def html_to_text(html: str) -> tuple[str, str]:
    """(title, main text) of an HTML page; the title from <title>, else the first <h1>.

    The main content is extracted by trafilatura (navigation, sidebars, footers and other
    boilerplate removed), after site navigation, banners/footers/sidebars outside <main> and
    permalink marks ("¶") are dropped. A page trafilatura finds no content in (a fragment, a page
    of only a heading and a line) falls back to all its visible text. Text the page shows, such as
    an HTML code example, stays text.
    """
    import trafilatura

    # trafilatura logs each fallback extractor it tries ("readability_lxml failed"): not the user's concern.
    logging.getLogger("trafilatura").setLevel(logging.ERROR)
    tree = _parse_html(html)
    if tree is None:
        return "", ""
    title_element = tree.find(".//title")
    title = title_element.text_content() if title_element is not None else ""
    if not title.strip():
        heading = tree.find(".//h1")
        title = heading.text_content() if heading is not None else ""
    _drop_furniture(tree)
    body = tree.find(".//body")
    fallback = _plain_text(body if body is not None else tree)
    text = trafilatura.extract(
        tree, output_format="txt", include_comments=False, include_tables=True, include_images=False,
        include_links=False, include_formatting=False, deduplicate=False, favor_recall=True,
    )
    return " ".join(title.split()), (text if text and text.strip() else fallback)


# --------------------------------------------------------------------------------------------------
# documents
# --------------------------------------------------------------------------------------------------
@dataclass
class _Doc:
    doc_id: str
    title: str
    text: str
    source: str
    description: str | None
    topic: str | None
    path: str  # for reports: the file, relative to the source folder
    line: int | None
    kind: str  # wiki-summaries | txt | md | html | jsonl


def _clean_optional(value: Any) -> str | None:
    if value is None:
        return None
    value = normalize_text(str(value))
    return value or None


def _title_from_text(text: str, fallback: str) -> str:
    for line in text.split("\n"):
        line = " ".join(line.split())
        if line:
            return line if len(line) <= MAX_TITLE_CHARS else fallback
    return fallback


def _load_default(cfg: IngestConfig) -> tuple[list[_Doc], list[dict[str, Any]]]:
    import hashlib

    path = default_corpus_file()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the default corpus ({error})") from None
    if isinstance(entries, dict):
        entries = list(entries.values())
    docs = []
    for entry in entries:
        title = normalize_text(str(entry.get("title") or ""))
        docs.append(
            _Doc(
                doc_id="wiki:" + hashlib.sha1(title.encode("utf-8")).hexdigest()[:16],
                title=title,
                text=normalize_text(str(entry.get("extract") or "")),
                source=DEFAULT_SOURCE_NAME,
                description=_clean_optional(entry.get("description")),
                topic=_clean_optional(entry.get("topic")),
                path=path.name,
                line=None,
                kind=DEFAULT_SOURCE_NAME,
            )
        )
    return docs, []


def _walk(root: Path) -> tuple[list[tuple[Path, str]], list[dict[str, Any]]]:
    """(file path, relative posix path) of every non-hidden file, sorted; plus symlink problems."""
    real_root = os.path.realpath(root)
    files: list[tuple[Path, str]] = []
    skipped: list[dict[str, Any]] = []

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == real_root or real.startswith(real_root + os.sep)

    def unreadable(error: OSError) -> None:
        rel = Path(error.filename).relative_to(root).as_posix() if error.filename else "."
        skipped.append(_skip_entry(rel, None, f"cannot read folder ({error.strerror or error})"))

    def undecodable(directory: str, name: str) -> bool:
        """A name that is not valid UTF-8 (os.walk hands it over with surrogate escapes) cannot
        become a document id or a report line: skip it, shown with its bytes escaped."""
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            rel = os.fsencode(Path(directory, name).relative_to(root)).decode("utf-8", "backslashreplace")
            skipped.append(_skip_entry(rel, None, "file name is not valid UTF-8 (rename it)"))
            return True
        return False

    for directory, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not undecodable(directory, d))
        for name in list(dirnames):
            full = os.path.join(directory, name)
            if os.path.islink(full):
                dirnames.remove(name)
                if not os.path.exists(full):
                    skipped.append(_skip_entry(Path(full).relative_to(root).as_posix(), None, "broken symlink"))
                elif not inside(full):
                    rel = Path(full).relative_to(root).as_posix()
                    skipped.append(_skip_entry(rel, None, "symlink points outside the source folder"))
        for name in sorted(filenames):
            if name.startswith(".") or undecodable(directory, name):
                continue
            full = Path(directory, name)
            files.append((full, full.relative_to(root).as_posix()))
    files.sort(key=lambda item: item[1])
    return files, skipped


def _skip_entry(path: str, line: int | None, reason: str) -> dict[str, Any]:
    return {"path": path, "line": line, "reason": reason}


def _read_file(full: Path, rel: str, kind: str, cfg: IngestConfig) -> tuple[list[_Doc], list[dict[str, Any]]]:
    """Documents of one supported file and the JSONL lines skipped inside it; raises _Skip for the file."""
    if kind == "jsonl":  # many documents, read line by line: no whole-file limit
        return _read_jsonl(full, rel, cfg)
    _check_file_size(full, cfg)
    stem = full.stem
    if kind == "txt":
        text = _read_normalized_text(full, cfg)
        title = _title_from_text(text, stem)
    elif kind == "html":
        title, body = html_to_text(_read_text(full, cfg.max_line_chars))
        text = normalize_text(body)
        title = normalize_text(title).replace("\n", " ") or stem
    else:
        text = normalize_text(strip_markdown(_read_text(full, cfg.max_line_chars)))
        title = _title_from_text(text, stem)
    return [_Doc(f"file:{rel}", title, text, rel, None, None, rel, None, kind)], []


def _read_jsonl(full: Path, rel: str, cfg: IngestConfig) -> tuple[list[_Doc], list[dict[str, Any]]]:
    docs: list[_Doc] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line_no, line in _iter_lines(full, cfg.max_line_chars):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append(_skip_entry(rel, line_no, f"line {line_no}: invalid JSON ({error.msg}, column {error.colno})"))
            continue
        if not isinstance(record, dict):
            skipped.append(_skip_entry(rel, line_no, f"line {line_no}: expected a JSON object, got {type(record).__name__}"))
            continue
        text = record.get("text")
        if not isinstance(text, str):
            problem = "missing \"text\"" if text is None else f"\"text\" must be a string, got {type(text).__name__}"
            skipped.append(_skip_entry(rel, line_no, f"line {line_no}: {problem}"))
            continue
        key = str(record["id"]) if record.get("id") not in (None, "") else str(line_no)
        if key in seen:
            skipped.append(_skip_entry(rel, line_no, f"line {line_no}: duplicate id '{key}' (first on line {seen[key]})"))
            continue
        seen[key] = line_no
        title = normalize_text(str(record.get("title") or "")).replace("\n", " ") or f"{full.stem} #{key}"
        docs.append(
            _Doc(
                doc_id=f"file:{rel}#{key}",
                title=title,
                text=normalize_text(text),
                source=rel,
                description=_clean_optional(record.get("description")),
                topic=_clean_optional(record.get("topic")),
                path=rel,
                line=line_no,
                kind="jsonl",
            )
        )
    return docs, skipped


def _load_folder(source: str, cfg: IngestConfig) -> tuple[list[_Doc], list[dict[str, Any]]]:
    root = Path(source)
    if not root.exists() and not root.is_symlink():
        raise DataError(f"{source}: source folder does not exist")
    if not root.is_dir():
        raise DataError(f"{source}: not a folder (give a folder of .txt, .md, .html or .jsonl files, or 'default')")
    files, skipped = _walk(root)
    real_root = os.path.realpath(root)
    docs: list[_Doc] = []
    candidates = sum(1 for entry in skipped if Path(entry["path"]).suffix.lower() in SUPPORTED)  # e.g. a non-UTF-8 name
    for full, rel in files:
        kind = SUPPORTED.get(full.suffix.lower())
        if full.is_symlink():
            real = os.path.realpath(full)
            if not (real == real_root or real.startswith(real_root + os.sep)):
                if kind:
                    candidates += 1
                skipped.append(_skip_entry(rel, None, "symlink points outside the source folder"))
                continue
            if not full.exists():
                skipped.append(_skip_entry(rel, None, "broken symlink"))
                continue
        if kind is None:
            skipped.append(_skip_entry(rel, None, "unsupported file type"))
            continue
        candidates += 1
        if not full.is_file():  # a FIFO or device would block or never end
            skipped.append(_skip_entry(rel, None, "not a regular file"))
            continue
        try:
            file_docs, line_skips = _read_file(full, rel, kind, cfg)
        except _Skip as problem:
            skipped.append(_skip_entry(rel, problem.line, problem.reason))
            continue
        except OSError as error:
            skipped.append(_skip_entry(rel, None, f"cannot read ({error.strerror or error})"))
            continue
        docs.extend(file_docs)
        skipped.extend(line_skips)
    if candidates == 0:
        raise DataError(f"{source}: {NO_DOCUMENTS}")
    skipped.sort(key=lambda entry: (entry["path"], entry["line"] or 0))
    return docs, skipped


# --------------------------------------------------------------------------------------------------
# the public API
# --------------------------------------------------------------------------------------------------
def load_corpus(source: str, cfg: IngestConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load, normalise, filter and de-duplicate a corpus.

    `source` is "default" (the packaged Wikipedia summaries) or a folder path. Returns the corpus
    table (docs/contracts.md; sorted by doc_id) and a report:
    `{"source", "documents", "duplicates_dropped", "duplicates": [{"doc_id", "duplicate_of"}],
      "skipped": [{"path", "line", "reason"}], "by_source": {kind: documents kept}}`
    where kind is `wiki-summaries`, `txt`, `md`, `html` or `jsonl`.
    """
    source = str(source)
    if source == "default":
        docs, skipped = _load_default(cfg)
    else:
        docs, skipped = _load_folder(source, cfg)

    kept: list[_Doc] = []
    for doc in docs:
        n = len(doc.text)
        if doc.kind == DEFAULT_SOURCE_NAME:
            label = f"'{doc.title}': "
        else:
            label = "" if doc.line is None else f"line {doc.line}: "
        if n < cfg.min_chars:
            reason = "empty document" if n == 0 else f"text is {n:,} characters (minimum {cfg.min_chars:,})"
            skipped.append(_skip_entry(doc.path, doc.line, label + reason))
        elif n > cfg.max_chars:
            skipped.append(_skip_entry(doc.path, doc.line, f"{label}text is {n:,} characters long (limit {cfg.max_chars:,})"))
        elif not doc.title:
            skipped.append(_skip_entry(doc.path, doc.line, f"{label}no title"))
        else:
            kept.append(doc)

    kept.sort(key=lambda d: d.doc_id)
    first_by_text: dict[str, str] = {}
    unique: list[_Doc] = []
    duplicates: list[dict[str, str]] = []
    for doc in kept:
        original = first_by_text.setdefault(doc.text, doc.doc_id)
        if original != doc.doc_id:
            duplicates.append({"doc_id": doc.doc_id, "duplicate_of": original})
        else:
            unique.append(doc)
    # Two documents with the same id (e.g. two titles normalising alike) cannot both be kept.
    by_id: dict[str, _Doc] = {}
    for doc in unique:
        if doc.doc_id in by_id:
            skipped.append(_skip_entry(doc.path, doc.line, f"duplicate doc_id {doc.doc_id}"))
        else:
            by_id[doc.doc_id] = doc
    unique = list(by_id.values())
    if cfg.limit is not None:
        unique = unique[: cfg.limit]

    if not unique:
        if skipped:
            first = skipped[0]  # reasons about one line of a file name that line themselves
            raise DataError(
                f"{source}: no usable documents; {len(skipped):,} skipped, the first: {first['path']}: {first['reason']}"
            )
        raise DataError(f"{source}: {NO_DOCUMENTS}")

    frame = pd.DataFrame(
        {
            "doc_id": [d.doc_id for d in unique],
            "title": [d.title for d in unique],
            "text": [d.text for d in unique],
            "source": [d.source for d in unique],
            "description": pd.Series([d.description for d in unique], dtype="str"),
            "topic": pd.Series([d.topic for d in unique], dtype="str"),
        },
        columns=COLUMNS,
    )
    report = {
        "source": source,
        "documents": len(frame),
        "duplicates_dropped": len(duplicates),
        "duplicates": duplicates[:1000],
        "skipped": skipped,
        "by_source": dict(sorted(Counter(d.kind for d in unique).items())),
    }
    return frame, report


def corpus_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("title", pa.string()),
            ("text", pa.string()),
            ("source", pa.string()),
            ("description", pa.string()),
            ("topic", pa.string()),
        ]
    )


def write_parquet(frame: pd.DataFrame, path: Path, schema=None) -> None:
    """Write a table deterministically (same rows -> same bytes): no index, no timestamps, fixed schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame.reset_index(drop=True), schema=schema, preserve_index=False)
    table = table.replace_schema_metadata(None)  # pandas metadata: versions only, but keep the file plain
    pq.write_table(table, path, compression="zstd", write_statistics=True)


def write_corpus(frame: pd.DataFrame, report: dict[str, Any], data_dir: Path) -> None:
    """Write corpus.parquet and ingest_report.json; both temporaries are complete before either
    replaces its predecessor, so a failure while writing leaves the previous corpus intact."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    frame = frame[COLUMNS].sort_values("doc_id", kind="stable")
    with atomic_path(data_dir / "corpus.parquet") as corpus_tmp, atomic_path(data_dir / "ingest_report.json") as report_tmp:
        write_parquet(frame, corpus_tmp, corpus_schema())
        report_tmp.write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
