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
    assert report.summary == (
        "corpus validation failed: expect_column_values_to_be_unique(doc_id) on 2 rows; "
        "expect_column_values_to_not_be_null(text) on 1 row; expect_column_values_to_match_regex(text) on 1 row; "
        "expect_column_value_lengths_to_be_between(text) on 1 row; "
        "expect_column_values_to_not_match_regex(text) on 1 row; expect_table_row_count_to_be_between on 1 check"
    )
    assert "\n" not in report.summary
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_unique"):
        report.raise_if_failed()


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
    assert report.summary.startswith("chunks validation failed: expect_column_values_to_be_unique(chunk_id) on 2 rows;")
