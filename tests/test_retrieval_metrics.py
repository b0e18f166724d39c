"""Doc-level ranking metrics on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from ragops.retrieval.metrics import (
    dedupe,
    gold_rank,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    summarize_ranks,
)


def test_gold_at_rank_three():
    ranked = ["a", "b", "gold", "c", "d"]
    assert gold_rank(ranked, "gold") == 3
    assert recall_at_k(ranked, "gold", 1) == 0.0
    assert recall_at_k(ranked, "gold", 3) == 1.0
    assert recall_at_k(ranked, "gold", 5) == 1.0
    assert mrr_at_k(ranked, "gold", 10) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranked, "gold", 10) == pytest.approx(1 / math.log2(4)) == pytest.approx(0.5)
    assert mrr_at_k(ranked, "gold", 2) == 0.0 and ndcg_at_k(ranked, "gold", 2) == 0.0


def test_gold_first_and_missing():
    assert (recall_at_k(["g"], "g", 1), mrr_at_k(["g"], "g", 10), ndcg_at_k(["g"], "g", 10)) == (1.0, 1.0, 1.0)
    assert gold_rank(["a", "b"], "g") == -1
    assert (recall_at_k(["a"], "g", 10), mrr_at_k(["a"], "g", 10), ndcg_at_k(["a"], "g", 10)) == (0.0, 0.0, 0.0)
    assert recall_at_k([], "g", 5) == 0.0


def test_chunks_of_one_document_count_once():
    # Three chunks of "a" and two of "b" before the gold document: it is the 3rd distinct document.
    ranked = ["a", "a", "b", "a", "b", "gold", "gold"]
    assert dedupe(ranked) == ["a", "b", "gold"]
    assert gold_rank(ranked, "gold") == 3
    assert recall_at_k(ranked, "gold", 3) == 1.0 and recall_at_k(ranked, "gold", 2) == 0.0
    assert mrr_at_k(ranked, "gold", 10) == pytest.approx(1 / 3)


def test_summarize_ranks_matches_the_per_question_functions():
    ranks = [1, 3, -1, 11, 2]
    summary = summarize_ranks(ranks, [1, 5, 10])
    assert summary["recall_at_1"] == pytest.approx(1 / 5)
    assert summary["recall_at_5"] == pytest.approx(3 / 5)
    assert summary["recall_at_10"] == pytest.approx(3 / 5)
    assert summary["mrr_at_10"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 5)
    assert summary["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3)) / 5)
    assert summarize_ranks([], [1]) == {}
