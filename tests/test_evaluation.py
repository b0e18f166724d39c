"""Evaluation metrics, bootstrap intervals, perplexity bookkeeping and the leakage gate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ragops.params import resolve
from ragops.cost import CostMeter
from ragops.errors import DataError, RagopsError
from ragops.data.benchmark import assert_no_leakage
from ragops.evaluation.data import heldout_split, load_heldout, load_questions
from ragops.evaluation.harness import metric_keys
from ragops.evaluation.metrics import (
    bootstrap_ci,
    bootstrap_ratio_ci,
    exact_match,
    normalize_answer,
    perplexities,
    perplexity_metrics,
    token_f1,
    with_ci,
)
from ragops.architectures.prompts import answer_continuation, qa_prompt
from ragops.paths import Workspace


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear and THE plum. ", "apple pear and plum"),
        ("Kubrick's 2001: A Space Odyssey", "kubricks 2001 space odyssey"),
        ("theatre", "theatre"),  # 'the' only as a whole word
        ("\u201cQuoted\u201d \u2013 text", "quoted text"),
        ("", ""),
    ],
)
def test_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1():
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert token_f1("Eiffel Tower", "The Eiffel Tower") == 1.0
    # prediction 3 tokens, gold 2, overlap 1: P=1/3, R=1/2, F1=0.4
    assert token_f1("tower in Paris", "Eiffel tower") == pytest.approx(0.4)
    assert token_f1("nothing shared", "Eiffel Tower") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    # repeated tokens count with multiplicity: pred "a b b" vs gold "b b c" -> overlap 2, P=R=2/3
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = rng.binomial(1, 0.4, size=20).astype(float)
    large = rng.binomial(1, 0.4, size=2000).astype(float)
    lo_s, hi_s = bootstrap_ci(small, 1000, 0.95, seed=1)
    lo_l, hi_l = bootstrap_ci(large, 1000, 0.95, seed=1)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4  # ~1/sqrt(100) as wide; 4x is a safe margin
    assert bootstrap_ci(small, 500, 0.95, seed=3) == bootstrap_ci(small, 500, 0.95, seed=3)  # seeded
    lo_90, hi_90 = bootstrap_ci(large, 1000, 0.90, seed=1)
    assert lo_l <= lo_90 and hi_90 <= hi_l  # a lower confidence gives a narrower interval
    assert bootstrap_ci([0.7], 100, 0.95, seed=0) == (0.7, 0.7)
    metrics = with_ci("describe", {"em": small}, 200, 0.95, 0)
    assert set(metrics) == {"describe/em", "describe/em_ci_low", "describe/em_ci_high"}


def test_word_and_token_perplexity_on_a_hand_example():
    # two documents: NLL 6 over 3 tokens / 2 words, NLL 2 over 1 token / 1 word
    nll, tokens, words = [6.0, 2.0], [3, 1], [2, 1]
    token_ppl, word_ppl = perplexities(sum(nll), sum(tokens), sum(words))
    assert token_ppl == pytest.approx(math.exp(8 / 4))
    assert word_ppl == pytest.approx(math.exp(8 / 3))
    metrics = perplexity_metrics(nll, tokens, words, 500, 0.95, seed=0)
    assert metrics["lm/token_ppl"] == pytest.approx(math.exp(2.0))
    assert metrics["lm/word_ppl"] == pytest.approx(math.exp(8 / 3))
    assert set(metrics) == set(metric_keys(["lm"]))
    # bootstrap over documents of the NLL/token ratio: the extremes are the single-document ratios
    assert math.exp(2.0) - 1e-9 <= metrics["lm/token_ppl_ci_high"] <= math.exp(2.0) + 1e-9
    assert metrics["lm/word_ppl_ci_low"] >= math.exp(2.0) - 1e-9 and metrics["lm/word_ppl_ci_high"] <= math.exp(3.0) + 1e-9
    lo, hi = bootstrap_ratio_ci([6.0, 2.0, 5.0, 1.0], [3, 1, 2, 2], 1000, 0.95, 0, transform=np.exp)
    assert lo <= math.exp(14 / 8) <= hi


def test_metric_keys_are_the_contract():
    keys = metric_keys(["describe", "lm"])
    assert "describe/em" in keys and "describe/f1_ci_high" in keys and "describe/gold_nll_ci_low" in keys
    assert "describe/retrieval_recall" in keys and "lm/token_ppl" in keys and "lm/word_ppl_ci_low" in keys
    assert all("@" not in key for key in keys)


def test_prompt_is_shared_and_the_best_passage_is_next_to_the_question():
    plain = qa_prompt("Who?", ["P1", "P2"])
    assert plain == "P2\n\nP1\n\nQuestion: Who?\nAnswer:"
    assert answer_continuation("Kubrick") == " Kubrick"
    chat = qa_prompt("Who?", ["P1"], chat=lambda user: f"<u>{user}</u><a>")
    assert chat.startswith("<u>P1\n\n") and chat.endswith("Question: Who?</u><a>")
    assert answer_continuation(" Kubrick ", chat=True) == "Kubrick"


def test_leakage_assertion_fires():
    assert_no_leakage(["wiki:a", "wiki:b"], ["wiki:c", "wiki:d"])
    with pytest.raises(RagopsError, match="leakage: 1 held-out"):
        assert_no_leakage(["wiki:a", "wiki:b"], ["wiki:b", "wiki:c"])


def _workspace(root, leak: bool) -> Workspace:
    ws = Workspace(root)
    ws.benchmark_dir.mkdir(parents=True)
    ws.chunks_dir.mkdir(parents=True)
    ids = [f"wiki:{i:04d}" for i in range(12)]
    heldout = pd.DataFrame({"doc_id": ids[:6], "title": [f"T{i}" for i in range(6)], "text": ["some words here"] * 6})
    heldout.to_parquet(ws.heldout, index=False)
    indexed = ids[6:] + ([ids[0], ids[3]] if leak else [])
    pd.DataFrame({"chunk_id": [f"{d}#0000" for d in indexed], "doc_id": indexed, "position": 0, "title": "t", "text": "x",
                  "n_tokens": 1}).to_parquet(ws.chunks, index=False)
    pd.DataFrame({"qid": ["describe:a", "describe:b", "identify:a"], "task": ["describe", "describe", "identify"],
                  "split": ["test", "dev", "test"], "question": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"],
                  "gold_doc_id": ids[6:9]}).to_parquet(ws.questions, index=False)
    return ws


def test_run_architecture_refuses_a_leaking_index(tmp_path, tiny_lm_dir):
    from ragops.evaluation import run_architecture
    from ragops.lm import CausalLM

    ws = _workspace(tmp_path, leak=True)
    config = resolve({"eval": {"tasks": ["lm"], "split": "test", "max_lm_docs": 10}, "lm": {"model": str(tiny_lm_dir)}})
    with pytest.raises(RagopsError, match="leakage"):
        run_architecture("closed_book", ws, config, infer_meter=CostMeter("inference"),
                         progress=False)
    clean = _workspace(tmp_path / "clean", leak=False)
    lm = CausalLM.load(tiny_lm_dir, device="cpu")
    result = run_architecture("closed_book", clean, config,
                              infer_meter=CostMeter("inference"), progress=False, lm=lm)
    assert set(result.metrics) == set(metric_keys(["lm"]))
    assert all(heldout_split(d) == "test" for d in result.predictions["doc_id"])


def test_inputs_follow_the_eval_config(tmp_path):
    ws = _workspace(tmp_path, leak=False)
    questions = load_questions(ws, ["describe", "identify", "lm"], "test", max_questions=1)
    assert list(questions["qid"]) == ["describe:a", "identify:a"]
    with pytest.raises(DataError, match="no 'identify' questions in split 'dev'"):
        load_questions(ws, ["describe", "identify"], "dev", None)
    dev, test = load_heldout(ws, "dev", None), load_heldout(ws, "test", None)
    assert set(dev["doc_id"]).isdisjoint(test["doc_id"]) and len(dev) + len(test) == 6
    assert len(load_heldout(ws, "test", 1)) == 1
    with pytest.raises(RagopsError, match="dev and test halves"):
        load_heldout(ws, "train", None)


# --- paired comparisons ---------------------------------------------------------------------------


def _reference_paired_mean(a, b, n_samples, confidence, seed):
    """The paired bootstrap written out: draw n item indices with replacement per sample (the same
    draws for A and B), average A_i - B_i over them, take the percentile interval."""
    rng = np.random.default_rng(seed)
    n = len(a)
    draws = rng.integers(0, n, size=(n_samples, n))
    stats = []
    for row in draws:
        total = 0.0
        for i in row:
            total += a[i] - b[i]
        stats.append(total / n)
    alpha = (1 - confidence) / 2
    return sum(x - y for x, y in zip(a, b, strict=True)) / n, *np.quantile(stats, [alpha, 1 - alpha])


def _reference_paired_ppl(nll_a, tok_a, nll_b, tok_b, n_samples, confidence, seed):
    rng = np.random.default_rng(seed)
    n = len(nll_a)
    draws = rng.integers(0, n, size=(n_samples, n))
    stats = []
    for row in draws:
        sa = sum(nll_a[i] for i in row) / sum(tok_a[i] for i in row)
        sb = sum(nll_b[i] for i in row) / sum(tok_b[i] for i in row)
        stats.append(math.exp(sa) - math.exp(sb))
    alpha = (1 - confidence) / 2
    point = math.exp(sum(nll_a) / sum(tok_a)) - math.exp(sum(nll_b) / sum(tok_b))
    return point, *np.quantile(stats, [alpha, 1 - alpha])


def test_paired_mean_difference_matches_a_reference_loop():
    from ragops.evaluation.paired import paired_mean_difference

    rng = np.random.default_rng(5)
    a = rng.uniform(0, 1, 37).tolist()
    b = (np.asarray(a) - 0.05 + rng.normal(0, 0.05, 37)).tolist()
    got = paired_mean_difference(a, b, 400, 0.9, seed=11)
    np.testing.assert_allclose(got, _reference_paired_mean(a, b, 400, 0.9, 11), rtol=1e-12)


def test_paired_ratio_difference_matches_a_reference_loop():
    from ragops.evaluation.paired import paired_ratio_difference

    rng = np.random.default_rng(6)
    tokens = rng.integers(20, 200, 15).astype(float)
    nll_b = tokens * rng.uniform(2.0, 3.0, 15)
    nll_a = nll_b - tokens * rng.uniform(-0.05, 0.2, 15)
    got = paired_ratio_difference(nll_a, tokens, nll_b, tokens, 300, 0.95, seed=2)
    want = _reference_paired_ppl(nll_a.tolist(), tokens.tolist(), nll_b.tolist(), tokens.tolist(), 300, 0.95, 2)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_paired_differences_on_a_hand_computed_case():
    from ragops.evaluation.paired import compare_predictions, paired_mean_difference, paired_ratio_difference

    # identical differences: every resample has the same mean, so the interval is that point
    assert paired_mean_difference([0.5, 0.7, 0.9], [0.3, 0.5, 0.7], 200, 0.95, 0) == pytest.approx((0.2, 0.2, 0.2))
    # two items with differences 1 and 0: resampled means are 0, 0.5 or 1 (prob. 1/4, 1/2, 1/4),
    # so with 2,000 resamples the 2.5% and 97.5% percentiles are 0 and 1
    assert paired_mean_difference([1.0, 0.0], [0.0, 0.0], 2000, 0.95, 0) == pytest.approx((0.5, 0.0, 1.0))
    # perplexity: A = exp((2 + 4) / 3) = e^2, B = exp((3 + 4) / 3) = e^(7/3)
    diff, _, _ = paired_ratio_difference([2.0, 4.0], [1, 2], [3.0, 4.0], [1, 2], 50, 0.95, 0)
    assert diff == pytest.approx(math.exp(2.0) - math.exp(7 / 3))

    qa = lambda task, qids, f1, nll: pd.DataFrame(  # noqa: E731
        {"task": task, "qid": qids, "doc_id": "d", "em": 0.0, "f1": f1, "gold_nll": nll, "nll_sum": np.nan, "n_tokens": 0, "n_words": 0})
    lm = lambda docs, nll, tokens, words: pd.DataFrame(  # noqa: E731
        {"task": "lm", "qid": None, "doc_id": docs, "em": np.nan, "f1": np.nan, "gold_nll": np.nan, "nll_sum": nll,
         "n_tokens": tokens, "n_words": words})
    # A and B answered the same three questions (in another order; B has one more), scored the same two articles
    a = pd.concat([qa("describe", ["q1", "q2", "q3"], [1.0, 0.5, 0.0], [1.0, 2.0, 3.0]), lm(["x", "y"], [2.0, 4.0], [1, 2], [1, 1])])
    b = pd.concat([qa("describe", ["q3", "q1", "q2", "q9"], [0.0, 0.5, 0.5, 1.0], [3.5, 1.5, 2.0, 0.1]), lm(["y", "x"], [4.0, 3.0], [2, 1], [1, 1])])
    found = {d.metric: d for d in compare_predictions("A", a, "B", b, n_samples=100, seed=0)}
    assert sorted(found) == ["describe/em", "describe/f1", "describe/gold_nll", "lm/token_ppl", "lm/word_ppl"]
    f1 = found["describe/f1"]
    assert (f1.n, f1.unpaired) == (3, 1)
    assert f1.diff == pytest.approx((0.5 + 0 + 0) / 3) and f1.a_value == pytest.approx(0.5) and f1.b_value == pytest.approx(1 / 3)
    assert (f1.a_better, f1.b_better, f1.ties) == (1, 0, 2)
    nll = found["describe/gold_nll"]  # lower is better: A is better on q1 (1.0 < 1.5) and q3 (3.0 < 3.5)
    assert nll.diff == pytest.approx(-1 / 3) and (nll.a_better, nll.b_better, nll.ties) == (2, 0, 1)
    ppl = found["lm/token_ppl"]
    assert ppl.diff == pytest.approx(math.exp(2.0) - math.exp(7 / 3)) and (ppl.a_better, ppl.b_better, ppl.ties) == (1, 0, 1)
    assert found["lm/word_ppl"].diff == pytest.approx(math.exp(6 / 2) - math.exp(7 / 2))


def test_pairing_sees_a_consistent_gain_that_separate_intervals_miss():
    """B = A plus a small consistent gain and large item-level spread: the two separate intervals
    overlap, the paired interval of B - A excludes 0."""
    from ragops.evaluation.paired import paired_mean_difference

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 200)
    b = a + 0.03 + rng.normal(0, 0.01, 200)
    lo_a, hi_a = bootstrap_ci(a, 1000, 0.95, seed=0)
    lo_b, hi_b = bootstrap_ci(b, 1000, 0.95, seed=0)
    assert lo_b < hi_a  # overlapping separate intervals
    diff, low, high = paired_mean_difference(b, a, 1000, 0.95, seed=0)
    assert low > 0 and low <= diff <= high


def test_qa_metrics_on_questions_whose_answer_is_no_train_answer():
    """`<task>/*_unseen` leave out the questions whose normalised answer a method could have memorised
    from the train split; hand-computed on three questions."""
    from ragops.architectures.base import Architecture
    from ragops.config import EvalConfig
    from ragops.evaluation.harness import evaluate_qa

    class Recite(Architecture):  # answers from a table: the harness is what is under test
        predictions = {"q1": "Family of birds.", "q2": "painter", "q3": "a city"}

        def answer(self, questions, meter):
            return pd.DataFrame([{
                "qid": q, "prediction": self.predictions[q], "gold_nll": nll, "retrieved_doc_ids": [], "retrieved_scores": [],
                "shown_doc_ids": [], "tokens_prompt": 1, "tokens_retrieved": 0, "tokens_generated": 1, "gold_tokens": 1,
            } for q, nll in zip(questions["qid"], [0.5, 2.0, 4.0], strict=True)])

    arch = Recite.__new__(Recite)
    arch.name = "recite"
    questions = pd.DataFrame({
        "qid": ["q1", "q2", "q3"], "task": "describe", "split": "test", "question": ["?"] * 3,
        "answer": ["family of birds", "Swiss painter", "river in Peru"], "gold_doc_id": ["d1", "d2", "d3"],
    })
    metrics, table = evaluate_qa(arch, "describe", questions, CostMeter("inference"), EvalConfig(bootstrap_samples=50), 0,
                                 train_answers=frozenset({"family of birds"}))
    assert list(table["answer_in_train"]) == [True, False, False]
    # F1: q1 1.0; q2 "painter" vs "swiss painter": P=1, R=1/2 -> 2/3; q3 0.
    assert metrics["describe/f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics["describe/f1_unseen"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["describe/em"] == pytest.approx(1 / 3) and metrics["describe/em_unseen"] == 0.0
    assert metrics["describe/gold_nll_unseen"] == pytest.approx(3.0)
    assert set(metrics) == {k for k in metric_keys(["describe"])}
