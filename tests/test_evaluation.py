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
