"""REPLUG's probability-space mixture and ensemble decoding, checked against plain forwards of the
tiny LM computed here (not with ragops' scoring code)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ragops.architectures.replug import mixture_log_weights
from ragops.cost import CostMeter
from ragops.evaluation.runner import build_architecture
from ragops.lm import CausalLM
from ragops.params import resolve
from tests.test_architectures import bm25_over, build_workspace


@pytest.fixture(scope="module")
def lm(tiny_lm_dir) -> CausalLM:
    return CausalLM.load(tiny_lm_dir, device="cpu", max_length=512, batch_tokens=2048)


def reference_logprob(model, prompt: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt) from one plain forward + log_softmax."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return float(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(continuation)))


def test_mixture_score_equals_a_hand_computed_mixture(lm):
    prompts = [lm.encode(t) for t in ("The river flows", "Painters of the Renaissance", "A planet orbits")]
    continuation = lm.encode(" to the sea")
    log_w = mixture_log_weights(np.array([0.9, 0.7, 0.1]), temperature=0.2)
    mixed, per_doc, _ = lm.score_and_generate_mixture([prompts], [log_w], [continuation], max_new_tokens=0)
    by_hand = [reference_logprob(lm.model, p, continuation) for p in prompts]
    np.testing.assert_allclose([lp.sum() for lp in per_doc[0]], by_hand, atol=1e-4)
    weights = np.exp(np.array([0.9, 0.7, 0.1]) / 0.2) / np.exp(np.array([0.9, 0.7, 0.1]) / 0.2).sum()
    expected = math.log(sum(w * math.exp(lp) for w, lp in zip(weights, by_hand, strict=True)))
    assert mixed[0] == pytest.approx(expected, abs=1e-4)
    # not the average of logits (FlashRAG's REPLUG bug): mixing logits gives another number here
    ids = [torch.tensor([p + continuation]) for p in prompts]
    with torch.no_grad():
        logit_rows = [lm.model(i).logits[0, len(p) - 1 : len(p) - 1 + len(continuation)] for i, p in zip(ids, prompts, strict=True)]
    averaged = sum(w * rows for w, rows in zip(weights, logit_rows, strict=True))
    logit_mix = float(sum(torch.log_softmax(averaged, -1)[t, tok] for t, tok in enumerate(continuation)))
    assert abs(logit_mix - expected) > 1e-3
    # uniform weighting (the LSR script's): logsumexp − log k
    uniform, _, _ = lm.score_and_generate_mixture([prompts], [mixture_log_weights(np.zeros(3), 1.0, "uniform")], [continuation], max_new_tokens=0)
    assert uniform[0] == pytest.approx(float(np.logaddexp.reduce(by_hand) - math.log(3)), abs=1e-4)


def test_ensemble_decoding_takes_the_argmax_of_the_mixed_distribution(lm):
    prompts = [lm.encode(t) for t in ("Mount Everest is", "The Moon is")]
    log_w = np.log(np.array([0.3, 0.7]))
    _, _, texts = lm.score_and_generate_mixture([prompts], [log_w], None, max_new_tokens=3, stop=())
    generated: list[int] = []
    for _ in range(3):
        with torch.no_grad():
            probs = [torch.softmax(lm.model(torch.tensor([p + generated])).logits[0, -1].float(), -1) for p in prompts]
        mixed = 0.3 * probs[0] + 0.7 * probs[1]
        token = int(mixed.argmax())
        if token in lm.eos_ids:
            break
        generated.append(token)
    assert texts[0] == lm.decode(generated)


def test_replug_with_one_document_is_incontext_ralm(tmp_path, lm):
    ws = build_workspace(tmp_path)
    bm25 = bm25_over(ws)
    common = {"k": 1, "stride": 8, "query_length": 8, "retrieved_max_length": 128, "cache_retrieval": False, "merge_windows": False}
    config = resolve({
        "eval": {"tasks": ["describe", "identify", "lm"], "split": "test", "max_questions": 3, "max_lm_docs": 2, "max_new_tokens": 5},
        "architectures": {"incontext_ralm": common, "replug": {**common, "retriever": "bm25"}},
    })
    from ragops.evaluation.data import load_heldout, load_questions

    questions = load_questions(ws, ["describe", "identify"], "test", 3)
    docs = load_heldout(ws, "test", 2)
    ralm = build_architecture("incontext_ralm", ws, config, progress=False, lm=lm, retrievers={"bm25": bm25})
    replug = build_architecture("replug", ws, config, progress=False, lm=lm, retrievers={"bm25": bm25})
    a, b = ralm.answer(questions, CostMeter()), replug.answer(questions, CostMeter())
    np.testing.assert_allclose(a["gold_nll"], b["gold_nll"], rtol=1e-6)
    assert list(a["prediction"]) == list(b["prediction"])
    assert list(a["shown_doc_ids"].map(list)) == list(b["shown_doc_ids"].map(list))
    la, lb = ralm.score_documents(docs, CostMeter()), replug.score_documents(docs, CostMeter())
    np.testing.assert_allclose(la["nll_sum"], lb["nll_sum"], rtol=1e-6)
    assert list(la["retrieved_doc_ids"].map(list)) == list(lb["retrieved_doc_ids"].map(list))


def test_replug_mixes_k_documents_for_each_question(tmp_path, lm):
    ws = build_workspace(tmp_path)
    bm25 = bm25_over(ws)
    config = resolve({"eval": {"tasks": ["describe"], "split": "test", "max_questions": 2, "max_new_tokens": 4},
                      "architectures": {"replug": {"k": 3, "retriever": "bm25", "temperature": 1.0}}})
    from ragops.architectures.prompts import answer_continuation, qa_prompt
    from ragops.evaluation.data import load_questions

    questions = load_questions(ws, ["describe"], "test", 2)
    replug = build_architecture("replug", ws, config, progress=False, lm=lm, retrievers={"bm25": bm25})
    meter = CostMeter()
    out = replug.answer(questions, meter)
    q = questions.iloc[0]
    hits = bm25.search([q["question"]], 3).passages()[0]
    chat = lm.chat_formatter
    cont = lm.encode(answer_continuation(q["answer"], chat=chat is not None))
    per_doc = [reference_logprob(lm.model, lm.encode(qa_prompt(q["question"], [h.text], chat)), cont) for h in hits]
    log_w = np.array([h.score for h in hits]) - np.logaddexp.reduce([h.score for h in hits])
    expected_nll = -float(np.logaddexp.reduce(log_w + np.array(per_doc))) / len(cont)
    assert out.loc[0, "gold_nll"] == pytest.approx(expected_nll, abs=1e-4)
    assert list(out.loc[0, "retrieved_doc_ids"]) == [h.doc_id for h in hits]
    assert meter.counters["tokens_retrieved"] > 0 and meter.counters["retrieval_calls"] == 2
    assert isinstance(out, pd.DataFrame) and len(out) == 2


def reference_replug_nll(tokenizer, model, retriever, doc_id, text, *, k, temperature, stride, query_length, max_length,
                         retrieved_max_length, start_ids):
    """REPLUG's document NLL as a straightforward loop: for every span, retrieve k passages with the
    `query_length` tokens before it, run one plain forward per passage ([start; passage; blank line;
    as much prefix as fits; span]) and mix the span's probabilities with λ = softmax(score / τ)."""
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    from tests.test_architectures import plain_logprobs

    ids = encode(text)
    blank_line = encode("x\n\n")[len(encode("x")):]
    total = 0.0
    for begin in range(0, len(ids), stride):
        end = min(begin + stride, len(ids))
        passages, scores = [[]], [0.0]
        if begin > 0:
            query = tokenizer.decode(ids[max(0, begin - query_length):begin], skip_special_tokens=True)
            found = retriever.search([query], k, exclude_doc_ids=[{doc_id}]).passages()[0]
            if found:
                passages = [encode(p.text.strip())[: retrieved_max_length - len(blank_line)] + blank_line for p in found]
                scores = [p.score for p in found]
        span_logp = []
        for passage in passages:
            since = max(0, end - (max_length - len(start_ids) - len(passage)))
            window = [*start_ids, *passage, *ids[since:end]]
            logp = plain_logprobs(model, window)
            offset = len(start_ids) + len(passage) - since
            span_logp.append(sum(float(logp[offset + j - 1, ids[j]]) for j in range(begin, end)))
        z = np.array(scores) / temperature
        weights = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        total -= math.log(sum(w * math.exp(lp) for w, lp in zip(weights, span_logp, strict=True)))
    return total


def test_replug_document_nll_equals_a_reference_loop_and_merged_windows_are_cheaper(tmp_path, tiny_lm_dir):
    """Each retrieved document read once for all the spans that retrieved it (merge_windows) gives the
    per-span mixture of separate windows: checked against plain forwards, with a window short enough
    (160 tokens) that long documents also take the truncated, unmerged path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragops.architectures.prompts import document_text
    from ragops.evaluation.data import load_heldout

    ws = build_workspace(tmp_path)
    bm25 = bm25_over(ws)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    lm = CausalLM.load(tiny_lm_dir, device="cpu", max_length=160, batch_tokens=2048)
    common = {"k": 3, "retriever": "bm25", "temperature": 2.0, "stride": 8, "query_length": 8, "retrieved_max_length": 48,
              "cache_retrieval": False}
    docs = load_heldout(ws, "test", 2)
    results = {}
    for merge in (True, False):
        config = resolve({"architectures": {"replug": {**common, "merge_windows": merge}}})
        arch = build_architecture("replug", ws, config, progress=False, lm=lm, retrievers={"bm25": bm25})
        meter = CostMeter("inference")
        results[merge] = (arch.score_documents(docs, meter), meter.counters["flops"])
    merged, plain = results[True][0], results[False][0]
    start_ids = [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    lengths = []
    for row, (_, doc) in zip(merged.itertuples(), docs.iterrows(), strict=True):
        text = document_text(doc["title"], doc["text"])
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        want = reference_replug_nll(tokenizer, model, bm25, doc["doc_id"], text, k=3, temperature=2.0, stride=8, query_length=8,
                                    max_length=160, retrieved_max_length=48, start_ids=start_ids)
        assert row.nll_sum == pytest.approx(want, rel=1e-4)
    assert max(lengths) > 160 - 1 - 48  # a long document: its later spans are truncated windows
    np.testing.assert_allclose(merged["nll_sum"], plain["nll_sum"], rtol=1e-5)
    assert merged["lm_windows"].sum() < plain["lm_windows"].sum()
    assert results[True][1] < results[False][1]
