"""The benchmark split: deterministic, leak-free, per-article splits, unambiguous identify questions."""

from __future__ import annotations

import pandas as pd
import pytest
from data_fixtures import tiny_corpus

from ragops.config import BenchmarkConfig, IngestConfig
from ragops.data.benchmark import (
    QUESTION_COLUMNS,
    assert_no_leakage,
    benchmark_summary,
    indexed_corpus,
    split_benchmark,
)
from ragops.data.ingest import COLUMNS, load_corpus
from ragops.errors import RagopsError

CFG = BenchmarkConfig(heldout_fraction=0.1, train_fraction=0.6, dev_fraction=0.2)


@pytest.fixture(scope="module")
def corpus():
    df, _ = load_corpus("default", IngestConfig(limit=400))
    return df


@pytest.fixture(scope="module")
def split(corpus):
    return split_benchmark(corpus, CFG, seed=13)


def test_deterministic_for_a_seed_and_different_for_another(corpus, split):
    heldout, questions = split
    again_h, again_q = split_benchmark(corpus.sample(frac=1, random_state=3), CFG, seed=13)  # input order irrelevant
    pd.testing.assert_frame_equal(heldout, again_h)
    pd.testing.assert_frame_equal(questions, again_q)
    other_h, other_q = split_benchmark(corpus, CFG, seed=14)
    assert set(other_h["doc_id"]) != set(heldout["doc_id"])
    assert other_q["split"].tolist() != questions["split"].tolist() or len(other_q) != len(questions)


def test_schema_and_heldout_disjoint_from_questions(corpus, split):
    heldout, questions = split
    assert list(heldout.columns) == COLUMNS and list(questions.columns) == QUESTION_COLUMNS
    assert len(heldout) == 40 and heldout["doc_id"].is_monotonic_increasing
    assert not set(heldout["doc_id"]) & set(questions["gold_doc_id"])
    assert questions["qid"].is_unique and questions["qid"].is_monotonic_increasing
    assert (questions["qid"] == questions["task"] + ":" + questions["gold_doc_id"]).all()
    indexed = indexed_corpus(corpus, heldout)
    assert len(indexed) == 360 and set(questions["gold_doc_id"]) <= set(indexed["doc_id"])
    assert_no_leakage(heldout["doc_id"], indexed["doc_id"])  # no exception


def test_questions_and_answers(corpus, split):
    _, questions = split
    articles = corpus.set_index("doc_id")
    with_description = articles["description"].notna()
    describe = questions[questions["task"] == "describe"]
    indexed_described = set(articles.index[with_description]) - set(split[0]["doc_id"])
    assert set(describe["gold_doc_id"]) == indexed_described  # every indexed article with a description
    for row in describe.itertuples():
        assert row.question == f"What is {articles.at[row.gold_doc_id, 'title']}?"
        assert row.answer == articles.at[row.gold_doc_id, "description"]
    identify = questions[questions["task"] == "identify"]
    assert 0 < len(identify) < len(describe)
    counts = corpus["description"].dropna().str.casefold().value_counts()
    for row in identify.itertuples():
        description = articles.at[row.gold_doc_id, "description"]
        assert counts[description.casefold()] == 1  # only unambiguous descriptions
        assert row.question == f'Which subject is described as "{description}"?'
        assert row.answer == articles.at[row.gold_doc_id, "title"]
    # and every described article whose description is unique does get one
    unique = {d for d in indexed_described if counts[articles.at[d, "description"].casefold()] == 1}
    assert set(identify["gold_doc_id"]) == unique


def test_split_fractions_and_same_article_same_split(split):
    _, questions = split
    per_article = questions.groupby("gold_doc_id")["split"].nunique()
    assert (per_article == 1).all()
    articles = questions.drop_duplicates("gold_doc_id")["split"].value_counts(normalize=True)
    assert abs(articles["train"] - 0.6) < 0.01 and abs(articles["dev"] - 0.2) < 0.01 and abs(articles["test"] - 0.2) < 0.01
    for task in ("describe", "identify"):
        fractions = questions[questions["task"] == task]["split"].value_counts(normalize=True)
        assert abs(fractions["train"] - 0.6) < 0.08 and abs(fractions["dev"] - 0.2) < 0.08


def test_case_insensitive_uniqueness_includes_heldout_articles():
    corpus = tiny_corpus(30)
    corpus.loc[1, "description"] = "Shared Thing"
    corpus.loc[2, "description"] = "shared  thing"  # same, ignoring case and spacing
    heldout, questions = split_benchmark(corpus, BenchmarkConfig(heldout_fraction=0.2), seed=1)
    identified = set(questions.loc[questions["task"] == "identify", "gold_doc_id"])
    assert "doc:0001" not in identified and "doc:0002" not in identified
    described = set(questions.loc[questions["task"] == "describe", "gold_doc_id"])
    assert not {"doc:0000", "doc:0005"} & described  # no description, no question
    # a description duplicated only by a held-out article still makes identify ambiguous
    h = heldout["doc_id"].iloc[0]
    target = next(d for d in sorted(identified))
    corpus2 = corpus.copy()
    corpus2.loc[corpus2["doc_id"] == h, "description"] = corpus2.loc[corpus2["doc_id"] == target, "description"].iloc[0].upper()
    _, questions2 = split_benchmark(corpus2, BenchmarkConfig(heldout_fraction=0.2), seed=1)
    assert f"identify:{target}" not in set(questions2["qid"]) and f"describe:{target}" in set(questions2["qid"])


def test_summary_and_leakage(split, corpus):
    heldout, questions = split
    summary = benchmark_summary(corpus, heldout, questions)
    assert summary["heldout"] == 40 and summary["indexed"] == 360
    assert sum(summary["questions"]["describe"].values()) == (questions["task"] == "describe").sum()
    leaked = list(heldout["doc_id"][:5])
    with pytest.raises(RagopsError, match=r"^leakage: 5 held-out documents in the index"):
        assert_no_leakage(heldout["doc_id"], ["wiki:other", *leaked])
