"""Ingest: the default corpus, a folder of every supported type, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pandas as pd
import pytest
from data_fixtures import GOOD_JSONL_RECORDS, make_source_folder, write_jsonl

from ragops.config import IngestConfig
from ragops.data import ingest
from ragops.data.ingest import COLUMNS, load_corpus, normalize_text, write_corpus
from ragops.errors import DataError


def _skips(report, path):
    return [s for s in report["skipped"] if s["path"] == path]


# --- the default corpus ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_sample():
    return load_corpus("default", IngestConfig(limit=300))


def test_default_corpus_schema_ids_and_order(default_sample):
    df, report = default_sample
    assert list(df.columns) == COLUMNS
    assert len(df) == 300 and report["documents"] == 300
    assert df["doc_id"].is_unique and df["doc_id"].is_monotonic_increasing
    assert df["doc_id"].str.fullmatch(r"wiki:[0-9a-f]{16}").all()
    first = df.iloc[0]
    assert first["doc_id"] == "wiki:" + hashlib.sha1(first["title"].encode()).hexdigest()[:16]
    assert (df["source"] == "wiki-summaries").all()
    assert df["text"].str.len().min() >= 1 and not df["text"].str.contains(r"\s\s|^\s|\s$", regex=True).any()
    assert report["by_source"] == {"wiki-summaries": 300}
    # empty descriptions become nulls, not empty strings
    assert not (df["description"].fillna("x") == "").any()


def test_default_corpus_is_stable(default_sample):
    again, _ = load_corpus("default", IngestConfig(limit=300))
    pd.testing.assert_frame_equal(default_sample[0], again)
    smaller, _ = load_corpus("default", IngestConfig(limit=50))
    assert smaller["doc_id"].tolist() == default_sample[0]["doc_id"].tolist()[:50]


# --- a folder of every supported type -------------------------------------------------------
def test_folder_of_every_type(tmp_path):
    root = make_source_folder(tmp_path / "src")
    df, report = load_corpus(str(root), IngestConfig())
    assert report["skipped"] == [] and report["duplicates_dropped"] == 0
    assert report["by_source"] == {"html": 1, "jsonl": 2, "md": 1, "txt": 1}
    assert df["doc_id"].tolist() == sorted(df["doc_id"])
    rows = df.set_index("doc_id")

    txt = rows.loc["file:plain.txt"]
    assert txt["title"] == "Plain Title"
    assert txt["text"] == "Plain Title\nThe first paragraph of the plain text file.\nIt has two lines."
    assert txt["source"] == "plain.txt"

    md = rows.loc["file:notes/page.md"]
    assert md["title"] == "Markdown Heading"
    assert md["text"].startswith("Markdown Heading\nSome bold and italic text with a link text and code.")
    assert "print('kept as text')" in md["text"]
    for markup in ("#", "**", "](", "https://", "```", "- first"):
        assert markup not in md["text"]

    html = rows.loc["file:page.html"]
    assert html["title"] == "Page & Title"
    assert html["text"] == "Heading One\nFirst paragraph with <escaped> text é.\nSecond\nline"

    first = rows.loc["file:records.jsonl#a1"]
    assert (first["title"], first["text"], first["description"], first["topic"]) == (
        "JSON One", "The first JSON document.", "A test record", "Tests")
    second = rows.loc["file:records.jsonl#2"]  # no id: the line number; no title: stem #line
    assert second["title"] == "records #2" and pd.isna(second["description"])


def test_html_title_falls_back_to_h1_then_stem(tmp_path):
    (tmp_path / "a.htm").write_text("<h1>Only &quot;H1&quot;</h1><p>Body text.</p>", encoding="utf-8")
    (tmp_path / "b.html").write_text("<p>No title at all.</p>", encoding="utf-8")
    df, _ = load_corpus(str(tmp_path), IngestConfig(min_chars=1))
    assert df.set_index("doc_id")["title"].to_dict() == {"file:a.htm": 'Only "H1"', "file:b.html": "b"}


def test_normalisation():
    raw = "Cafe\u0301  bar\t\tbaz\x07\r\n\r\n\n  next\u00a0 line  \u2028last"
    assert normalize_text(raw) == "Café bar baz\nnext line\nlast"


# --- bad input ----------------------------------------------------------------------------------
def test_missing_and_non_folder_sources(tmp_path):
    with pytest.raises(DataError, match=r"nope: source folder does not exist$"):
        load_corpus(str(tmp_path / "nope"), IngestConfig())
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"file\.txt: not a folder"):
        load_corpus(str(a_file), IngestConfig())


def test_empty_folder(tmp_path):
    with pytest.raises(DataError) as error:
        load_corpus(str(tmp_path), IngestConfig())
    assert str(error.value) == f"{tmp_path}: no .txt, .md, .html or .jsonl documents found"


def test_only_unsupported_files(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="no .txt, .md, .html or .jsonl documents found"):
        load_corpus(str(tmp_path), IngestConfig())


def test_unsupported_extension_is_skipped(tmp_path):
    root = make_source_folder(tmp_path / "src")
    (root / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    df, report = load_corpus(str(root), IngestConfig())
    assert _skips(report, "table.csv") == [{"path": "table.csv", "line": None, "reason": "unsupported file type"}]
    assert len(df) == 5


def test_binary_file(tmp_path):
    root = make_source_folder(tmp_path / "src")
    (root / "blob.txt").write_bytes(b"looks like text\x00\x01\x02" + os.urandom(64))
    df, report = load_corpus(str(root), IngestConfig())
    assert _skips(report, "blob.txt") == [{"path": "blob.txt", "line": None, "reason": "binary file"}]
    assert "file:blob.txt" not in set(df["doc_id"]) and len(df) == 5


def test_invalid_utf8_reports_byte_offset_and_line(tmp_path):
    root = make_source_folder(tmp_path / "src")
    good = "first line is fine\nsecond: "
    (root / "latin1.md").write_bytes(good.encode() + "café".encode("latin-1") + b"\nthird\n")
    offset = len(good.encode()) + 3  # 'caf' then the lone \xe9
    df, report = load_corpus(str(root), IngestConfig())
    assert _skips(report, "latin1.md") == [{"path": "latin1.md", "line": 2, "reason": f"invalid UTF-8 at byte {offset}"}]
    assert len(df) == 5


def test_malformed_jsonl_line(tmp_path):
    records = [{"id": i, "text": f"Document number {i} of the file."} for i in range(1, 10)]
    path = write_jsonl(tmp_path / "docs.jsonl", records)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[6] = '{"id": 7, "text": "unterminated'  # line 7
    lines[2] = '["not", "an", "object"]'  # line 3
    lines[4] = '{"id": 5, "title": "no text"}'  # line 5
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    df, report = load_corpus(str(tmp_path), IngestConfig())
    by_line = {s["line"]: s for s in report["skipped"]}
    assert set(by_line) == {3, 5, 7} and all(s["path"] == "docs.jsonl" for s in report["skipped"])
    assert re.fullmatch(r"line 7: invalid JSON \(Unterminated string.*\)", by_line[7]["reason"])
    assert by_line[3]["reason"] == "line 3: expected a JSON object, got list"
    assert by_line[5]["reason"] == 'line 5: missing "text"'
    assert sorted(df["doc_id"]) == sorted(f"file:docs.jsonl#{i}" for i in (1, 2, 4, 6, 8, 9))


def test_duplicate_jsonl_ids(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": "One text."}, {"id": "x", "text": "Another text."}])
    df, report = load_corpus(str(tmp_path), IngestConfig(min_chars=1))
    assert df["doc_id"].tolist() == ["file:d.jsonl#x"]
    assert report["skipped"] == [{"path": "d.jsonl", "line": 2, "reason": "line 2: duplicate id 'x' (first on line 1)"}]


def test_enormous_single_line(tmp_path):
    root = make_source_folder(tmp_path / "src")
    with open(root / "huge.txt", "w", encoding="utf-8") as handle:
        handle.write("short first line\n")
        handle.write("é" * 1000 + "x" * 4_999_000 + "\n")  # 5,000,000 characters, 5,001,000 bytes
        handle.write("tail\n")
    df, report = load_corpus(str(root), IngestConfig())
    assert _skips(report, "huge.txt") == [
        {"path": "huge.txt", "line": 2, "reason": "line 2 is 5,000,000 characters long (limit 1,000,000)"}
    ]
    assert len(df) == 5
    # the same at a smaller limit, on a line just over it (decoded, then measured)
    (root / "huge.txt").write_text("a" * 1001, encoding="utf-8")
    _, report = load_corpus(str(root), IngestConfig(max_line_chars=1000))
    assert _skips(report, "huge.txt")[0]["reason"] == "line 1 is 1,001 characters long (limit 1,000)"


def test_duplicate_documents_are_dropped_and_counted(tmp_path):
    root = make_source_folder(tmp_path / "src")
    (root / "zz_copy.txt").write_text((root / "plain.txt").read_text(encoding="utf-8") + "\n\n  ", encoding="utf-8")
    (root / "a_copy.txt").write_text((root / "plain.txt").read_text(encoding="utf-8"), encoding="utf-8")
    df, report = load_corpus(str(root), IngestConfig())
    assert report["duplicates_dropped"] == 2 and report["documents"] == len(df) == 5
    # the first by doc_id is kept, whatever the file order
    assert "file:a_copy.txt" in set(df["doc_id"]) and "file:plain.txt" not in set(df["doc_id"])
    assert report["duplicates"] == [
        {"doc_id": "file:plain.txt", "duplicate_of": "file:a_copy.txt"},
        {"doc_id": "file:zz_copy.txt", "duplicate_of": "file:a_copy.txt"},
    ]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinks(tmp_path):
    root = make_source_folder(tmp_path / "src")
    outside = tmp_path / "secret.txt"
    outside.write_text("Secret text outside the folder.", encoding="utf-8")
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "x.txt").write_text("Outside folder file.", encoding="utf-8")
    os.symlink(outside, root / "link_out.txt")
    os.symlink(tmp_path / "outside_dir", root / "dir_out")
    os.symlink(root / "plain.txt", root / "notes" / "link_in.txt")  # inside: allowed (then a duplicate)
    df, report = load_corpus(str(root), IngestConfig())
    reason = "symlink points outside the source folder"
    assert _skips(report, "link_out.txt") == [{"path": "link_out.txt", "line": None, "reason": reason}]
    assert _skips(report, "dir_out") == [{"path": "dir_out", "line": None, "reason": reason}]
    assert not df["text"].str.contains("Secret|Outside folder", regex=True).any()
    assert report["duplicates"] == [{"doc_id": "file:plain.txt", "duplicate_of": "file:notes/link_in.txt"}]


def test_every_file_bad(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "b.md").write_bytes(b"\xff\xfe bad")
    (tmp_path / "c.jsonl").write_text("not json\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_corpus(str(tmp_path), IngestConfig())
    assert str(error.value) == f"{tmp_path}: no usable documents; 3 skipped, the first: a.txt: binary file"


def test_length_limits_and_limit(tmp_path):
    root = make_source_folder(tmp_path / "src")
    (root / "tiny.txt").write_text("Hi", encoding="utf-8")
    (root / "long.txt").write_text("word " * 40, encoding="utf-8")  # 199 characters once normalised
    df, report = load_corpus(str(root), IngestConfig(min_chars=10, max_chars=150))
    assert _skips(report, "tiny.txt") == [{"path": "tiny.txt", "line": None, "reason": "text is 2 characters (minimum 10)"}]
    assert _skips(report, "long.txt") == [
        {"path": "long.txt", "line": None, "reason": "text is 199 characters long (limit 150)"}
    ]
    limited, report = load_corpus(str(root), IngestConfig(min_chars=10, max_chars=150, limit=2))
    assert limited["doc_id"].tolist() == df["doc_id"].tolist()[:2] and report["documents"] == 2


# --- writing -------------------------------------------------------------------------------------
def test_write_corpus_is_deterministic(tmp_path):
    root = make_source_folder(tmp_path / "src")
    df, report = load_corpus(str(root), IngestConfig())
    write_corpus(df, report, tmp_path / "one")
    first = (tmp_path / "one" / "corpus.parquet").read_bytes()
    write_corpus(df.sample(frac=1, random_state=1), report, tmp_path / "two")  # row order does not matter
    write_corpus(df, report, tmp_path / "one")
    assert (tmp_path / "two" / "corpus.parquet").read_bytes() == first == (tmp_path / "one" / "corpus.parquet").read_bytes()
    assert (tmp_path / "one" / "ingest_report.json").read_bytes() == (tmp_path / "two" / "ingest_report.json").read_bytes()
    back = pd.read_parquet(tmp_path / "one" / "corpus.parquet")
    assert list(back.columns) == COLUMNS
    pd.testing.assert_frame_equal(back, df.reset_index(drop=True), check_dtype=False)
    assert json.loads((tmp_path / "one" / "ingest_report.json").read_text())["documents"] == 5


def test_failed_write_leaves_previous_corpus(tmp_path, monkeypatch):
    root = make_source_folder(tmp_path / "src")
    df, report = load_corpus(str(root), IngestConfig())
    data = tmp_path / "data"
    write_corpus(df, report, data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}

    import pyarrow.parquet as pq

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    smaller = df.iloc[:2]
    with pytest.raises(OSError, match="disk full"):
        write_corpus(smaller, {**report, "documents": 2}, data)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # no temporaries left either


def test_bad_input_report_is_json_serialisable(tmp_path):
    root = make_source_folder(tmp_path / "src")
    write_jsonl(root / "more.jsonl", GOOD_JSONL_RECORDS[:1] + ["oops"])
    _, report = load_corpus(str(root), IngestConfig())
    assert json.loads(json.dumps(report)) == report
    assert ingest.SUPPORTED[".htm"] == "html"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_skipped_not_read(tmp_path):
    root = make_source_folder(tmp_path / "src")
    os.mkfifo(root / "pipe.txt")  # opening it would block forever
    df, report = load_corpus(str(root), IngestConfig())
    assert _skips(report, "pipe.txt") == [{"path": "pipe.txt", "line": None, "reason": "not a regular file"}]
    assert len(df) == 5


def test_short_jsonl_document_names_its_line(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "Long enough text here."}, {"text": "tiny"}])
    _, report = load_corpus(str(tmp_path), IngestConfig(min_chars=10))
    assert report["skipped"] == [{"path": "d.jsonl", "line": 2, "reason": "line 2: text is 4 characters (minimum 10)"}]
    write_jsonl(tmp_path / "d.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError, match=r"no usable documents; 1 skipped, the first: d\.jsonl: line 1: text is 4 characters"):
        load_corpus(str(tmp_path), IngestConfig(min_chars=10))
