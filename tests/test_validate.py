"""The Great Expectations gates: a good sample passes, each kind of breakage is named with its count."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ragops.config import IngestConfig, ValidateConfig
from ragops.data.ingest import load_corpus
from ragops.data.validate import validate_chunks, validate_corpus
from ragops.errors import ValidationFailed


@pytest.fixture(scope="module")
def corpus():
    df, _ = load_corpus("default", IngestConfig(limit=200))
    return df


def test_good_corpus_passes(corpus):
    report = validate_corpus(corpus, ValidateConfig())
    assert report.success, report.summary
    assert report.failures == []
    assert report.summary == "corpus validation passed: 8 expectations on 200 rows"
    assert report.result["success"] is True and len(report.result["results"]) == 8
    json.dumps(report.result)
    report.raise_if_failed()  # no exception


def test_broken_corpus_fails_with_each_expectation_named(corpus):
    bad = corpus.head(60).copy()
    bad.loc[1, "doc_id"] = bad.loc[0, "doc_id"]  # duplicate id: 2 rows
    bad.loc[2, "text"] = None  # null text
    bad.loc[3, "text"] = " \n "  # blank (and too short)
    bad.loc[4, "text"] = "Some text that kept a <div class='x'> tag and a < p> tag."  # leftover HTML
    report = validate_corpus(bad, ValidateConfig(min_rows=100))  # 60 rows: too few
    assert not report.success
    assert report.failures == [
        ("expect_column_values_to_be_unique(doc_id)", 2),
        ("expect_column_values_to_not_be_null(text)", 1),
        ("expect_column_values_to_match_regex(text)", 1),
        ("expect_column_value_lengths_to_be_between(text)", 1),
        ("expect_column_values_to_not_match_regex(text)", 1),
        ("expect_table_row_count_to_be_between", 1),
    ]
    ids = list(bad["doc_id"])

    def named(row: int) -> str:
        return f"{ids[row]} '{bad.loc[row, 'title'][:60]}'"

    # Each failure names its offending documents (id and title for non-file documents), not just a count.
    assert report.offenders == {
        "expect_column_values_to_be_unique(doc_id)": [named(0), named(1)],
        "expect_column_values_to_not_be_null(text)": [named(2)],
        "expect_column_values_to_match_regex(text)": [named(3)],
        "expect_column_value_lengths_to_be_between(text)": [named(3)],
        "expect_column_values_to_not_match_regex(text)": [named(4)],
    }
    parts = report.summary.removeprefix("corpus validation failed: ").split("; ")
    assert len(parts) == 6
    assert parts[0].startswith(f"expect_column_values_to_be_unique(doc_id) on 2 rows: {named(0)}, {named(1)} [wanted: ids are unique]")
    assert parts[3].startswith(f"expect_column_value_lengths_to_be_between(text) on 1 row: {named(3)} [wanted: text 20 to 200,000 characters")
    assert "-> re-run ragops ingest" in parts[3] and "ingest.min_chars" in parts[3]
    assert parts[4].endswith("set validate.leftover_html: false if the markup is content")
    assert parts[5] == ("expect_table_row_count_to_be_between on 1 check (60 rows) [wanted: at least 100 documents (validate.min_rows)]"
                        " -> add documents, or lower validate.min_rows")
    assert "\n" not in report.summary
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_unique"):
        report.raise_if_failed()


def test_offenders_are_capped_and_limits_come_from_ingest(corpus):
    bad = corpus.head(10).copy().reset_index(drop=True)
    for row in range(6):
        bad.loc[row, "text"] = "x" * 30  # 30 characters: too short for ingest.min_chars = 40
    report = validate_corpus(bad, ValidateConfig(min_rows=1, examples=2), IngestConfig(min_chars=40))
    label = "expect_column_value_lengths_to_be_between(text)"
    assert report.failures == [(label, 6)]
    assert len(report.offenders[label]) == 2 and report.offenders[label][0].startswith(bad.loc[0, "doc_id"])
    assert f"on 6 rows: {report.offenders[label][0]}, {report.offenders[label][1]}, ... [wanted: text 40 to 200,000" in report.summary


def test_leftover_html_check_is_configurable_and_skips_html_files():
    text = "A dictionary entry whose file kept its <body> markup around the definition."
    frame = pd.DataFrame(
        {
            "doc_id": ["file:dict/a.txt", "file:docs/page.html", "file:dict/b.txt", "file:docs/guide.MD"],
            "title": ["a", "page", "b", "guide"],
            "text": [text, "Write <div class='note'> to open a note (a code example).", "Plain text without any markup at all.",
                     "A Markdown code block: <p>Hello</p> stays as the example."],
            "source": ["dict/a.txt", "docs/page.html", "dict/b.txt", "docs/guide.MD"],
            "description": [None] * 4,
            "topic": [None] * 4,
        }
    )
    report = validate_corpus(frame, ValidateConfig(min_rows=1))
    # The .txt file is named with its path; the HTML and Markdown code examples are content, not leftover markup.
    assert report.failures == [("expect_column_values_to_not_match_regex(text)", 1)]
    assert report.offenders == {"expect_column_values_to_not_match_regex(text)": ["file:dict/a.txt"]}
    assert "on 1 row: file:dict/a.txt [wanted: no HTML tags" in report.summary and "validate.leftover_html: false" in report.summary
    relaxed = validate_corpus(frame, ValidateConfig(min_rows=1, leftover_html=False))
    assert relaxed.success and relaxed.summary == "corpus validation passed: 7 expectations on 4 rows"


def test_chunk_gate():
    good = pd.DataFrame(
        {
            "chunk_id": ["d:1#0000", "d:1#0001", "d:2#0000"],
            "doc_id": ["d:1", "d:1", "d:2"],
            "position": [0, 1, 0],
            "title": ["One", "One", "Two"],
            "text": ["First chunk.", "Second chunk.", "Other doc."],
            "n_tokens": [3, 3, 3],
        }
    )
    report = validate_chunks(good, ValidateConfig())
    assert report.success and report.summary == "chunks validation passed: 8 expectations on 3 rows"

    bad = pd.concat([good, good.iloc[[1]]], ignore_index=True)  # repeated chunk: same id, same (doc, position)
    bad.loc[2, "text"] = "\t"
    report = validate_chunks(bad, ValidateConfig(chunk_min_chars=2))
    assert not report.success
    assert report.failures == [
        ("expect_column_values_to_be_unique(chunk_id)", 2),
        ("expect_column_values_to_match_regex(text)", 1),
        ("expect_column_value_lengths_to_be_between(text)", 1),
        ("expect_compound_columns_to_be_unique(doc_id, position)", 2),
    ]
    assert report.summary.startswith("chunks validation failed: expect_column_values_to_be_unique(chunk_id) on 2 rows: d:1#0001 'One', d:1#0001 'One' [wanted: chunk ids are unique]")
