"""REPLUG (Shi et al. 2023): the frozen LM reads each retrieved document separately; the answers are
mixed by the retriever's weights, in probability space.

P(y | x) = Σ_{d ∈ top-k} λ(d, x) · P_LM(y | d ∘ x),  λ = softmax(s(d, x) / τ) over the top-k scores.

- QA: one prompt per document (the shared `qa_prompt` with that single passage); the gold answer's
  NLL is −log P(y | x) / |y| with the mixture computed as logsumexp_d(log λ_d + log P_LM(y | d∘x))
  — never an average of logits (FlashRAG's REPLUG processor mixes raw logits; rag-methods §10.1).
  Generation is ensemble decoding: each step's next-token distribution is Σ_d λ_d P_LM(· | d∘x, y<t)
  and its argmax is appended to every document's row (fixed λ, as the paper's inference).
- `lm`: strided as In-Context RALM (same stride, query length, cache, "query strictly before the
  span" rule), but each span's probability is the λ-mixture over the k retrieved documents, each
  prepended on its own: P(x[b:e] | x<b) = Σ_d λ_d P_LM(x[b:e] | d ∘ x<b).

With k = 1 (λ = 1) both tasks reduce exactly to In-Context RALM with one passage. τ defaults to
0.05 because dense scores are cosines in [0, 1]: softmax(cos) would be nearly uniform (REPLUG's
Contriever dot products spread wider); BM25's raw scores want τ ≈ 1. `weighting: uniform` gives
the REPLUG LSR script's uniform average. REPLUG LSR evaluates with this same code and a tuned
retriever, so λ at evaluation is the distribution its retriever was trained to produce.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from ragops.architectures.base import QA_BATCH, _progress
from ragops.architectures.incontext_ralm import InContextRALM, InContextRALMOptions
from ragops.retrieval.types import Passage

if TYPE_CHECKING:
    import pandas as pd

    from ragops.cost import CostMeter


class REPLUGOptions(InContextRALMOptions):
    retriever: Literal["bm25", "dense", "hybrid"] = "dense"
    k: int = Field(default=4, ge=1)  # documents mixed (QA and each lm span)
    temperature: float = Field(default=0.05, gt=0)  # τ in λ = softmax(score / τ)
    weighting: Literal["softmax", "uniform"] = "softmax"
    ranking: Literal["first"] = "first"  # the mixture replaces In-Context RALM's choice of one passage


def mixture_log_weights(scores: np.ndarray, temperature: float, weighting: str = "softmax") -> np.ndarray:
    """log λ over the real (finite) scores of one query: log softmax(score/τ), or uniform −log k."""
    scores = np.asarray(scores, dtype=np.float64)
    if weighting == "uniform":
        return np.full(len(scores), -math.log(len(scores)))
    z = scores / temperature
    top = z.max()
    return z - (top + math.log(np.exp(z - top).sum()))


class REPLUG(InContextRALM):
    name = "replug"
    family = "black-box"
    finetune = "none"
    Options = REPLUGOptions
    options: REPLUGOptions

    def _n_candidates(self) -> int:
        return self.options.k

    def log_weights(self, passages: list[Passage]) -> np.ndarray:
        return mixture_log_weights(np.array([p.score for p in passages]), self.options.temperature, self.options.weighting)

    # --- QA ----------------------------------------------------------------------------------------
    def answer(self, questions: pd.DataFrame, meter: CostMeter) -> pd.DataFrame:
        import pandas as pd

        from ragops.architectures.prompts import STOP, answer_continuation, clean_prediction, passages_block, qa_prompt

        lm = self.lm
        chat = lm.chat_formatter
        max_new = self.ctx.config.eval.max_new_tokens
        rows: list[dict[str, Any]] = []
        bar = _progress(self.progress, len(questions), self.qa_progress_label(questions))
        for start in range(0, len(questions), QA_BATCH):
            batch = questions.iloc[start : start + QA_BATCH]
            retrieved = self.passages_for_questions(batch, meter)
            groups, weights, conts, extra = [], [], [], []
            for (_, q), passages in zip(batch.iterrows(), retrieved, strict=True):
                question = str(q["question"])
                cont = lm.encode(answer_continuation(str(q["answer"]), chat=chat is not None))
                if not passages:  # nothing retrieved: the LM alone (closed book) is the only "document"
                    prompts, shown, n_prompt, n_retrieved = [lm.encode(qa_prompt(question, (), chat))], [], 0, 0
                    log_w = np.zeros(1)
                    n_prompt = len(prompts[0])
                else:
                    prompts, shown, n_prompt, n_retrieved = [], [], 0, 0
                    for passage in passages:
                        fitted, texts = self.fit_passages(question, [passage], reserve=max(max_new, len(cont)))
                        prompt = lm.encode(qa_prompt(question, texts, chat))
                        k_tokens = lm.count_tokens(passages_block(texts)) if texts else 0
                        prompts.append(prompt)
                        shown.extend(fitted)
                        n_prompt += len(prompt) - k_tokens
                        n_retrieved += k_tokens
                    log_w = self.log_weights(passages)
                groups.append(prompts)
                weights.append(log_w)
                conts.append(cont)
                extra.append((passages, shown, n_prompt, n_retrieved, log_w))
            with lm.charged_to(meter):
                mixed, _, texts_out = lm.score_and_generate_mixture(groups, weights, conts, max_new_tokens=max_new, stop=STOP)
            for (_, q), logp, text, cont, (passages, shown, n_prompt, n_retrieved, log_w) in zip(
                batch.iterrows(), mixed, texts_out, conts, extra, strict=True
            ):
                meter.add(tokens_prompt=n_prompt, tokens_retrieved=n_retrieved, questions=1, examples=1)
                rows.append({
                    "qid": q["qid"],
                    "prediction": clean_prediction(text),
                    "gold_nll": float(-logp / len(cont)) if cont else math.nan,
                    "gold_tokens": len(cont),
                    "retrieved_doc_ids": [p.doc_id for p in passages],
                    "retrieved_scores": [p.score for p in passages],
                    "shown_doc_ids": list(dict.fromkeys(p.doc_id for p in shown)),
                    "tokens_prompt": n_prompt,
                    "tokens_retrieved": n_retrieved,
                    "tokens_generated": lm.count_tokens(text),
                    "mixture_weights": np.exp(log_w).round(4).tolist(),
                })
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return pd.DataFrame(rows)

    # --- language modelling ----------------------------------------------------------------------
    def _score_document(self, doc_id, ids, n_words, retriever, cache, meter, stats) -> dict[str, Any]:
        from ragops.architectures.incontext_ralm import strided_spans

        opt, lm = self.options, self.lm
        spans = strided_spans(len(ids), opt.stride)
        hits = self._retrieve_spans(doc_id, ids, spans, retriever, cache, meter)
        # The start-token convention of every architecture (lm.start_token): each window begins
        # with it; without one, the document's first token is context only.
        first = 0 if lm.document_start else 1
        # One window per (span, document) — or, with `merge_windows`, one per document retrieved for
        # several spans: while [start; d; x<e] fits untruncated, x[b:e]'s log-prob given [d; x<b] is
        # read from the longer window's forward (exact; consecutive spans of a short article mostly
        # retrieve the same documents, so this reads each document once instead of once per span).
        windows: list[dict[str, Any]] = []
        open_by_passage: dict[str | None, dict[str, Any]] = {}
        for i, ((begin, end), passages) in enumerate(zip(spans, hits, strict=True)):
            scored_from = max(begin, first)
            if scored_from >= end:
                continue
            for d, passage in enumerate(passages or [None]):
                passage_ids = self._ids_of(passage.chunk_id, passage.text) if passage else []
                start = max(0, end - (lm.max_length - len(passage_ids) - len(lm.document_start)))
                key = passage.chunk_id if passage else None
                window = open_by_passage.get(key) if opt.merge_windows and start == 0 else None
                if window is None:
                    window = {"passage_ids": passage_ids, "start": start, "begin": scored_from, "end": end, "reads": []}
                    windows.append(window)
                    if start == 0:
                        open_by_passage[key] = window
                window["end"] = max(window["end"], end)
                window["reads"].append((i, d, scored_from, end))
        contexts = [lm.document_start + w["passage_ids"] + ids[w["start"] : w["begin"]] for w in windows]
        targets = [ids[w["begin"] : w["end"]] for w in windows]
        with lm.charged_to(meter):
            scored = lm.score_ids(contexts, targets)
        span_totals: dict[int, np.ndarray] = {}
        for window, lp in zip(windows, scored, strict=True):
            for i, d, b, e in window["reads"]:
                totals = span_totals.setdefault(i, np.zeros(len(hits[i] or [None])))
                totals[d] = float(lp[b - window["begin"] : e - window["begin"]].sum())
        nll = 0.0
        used: list[list[Passage]] = []
        for i, (begin, _) in enumerate(spans):
            if i not in span_totals:  # nothing scored in this span
                continue
            passages = hits[i] or []
            mixed = (self.log_weights(passages) if passages else np.zeros(1)) + span_totals[i]
            top = float(np.max(mixed))
            nll -= top + math.log(float(np.exp(mixed - top).sum()))  # −log Σ_d λ_d P(span | d ∘ prefix)
            if begin > 0:
                used.append(passages)
        n_scored = sum(end - max(begin, first) for begin, end in spans if end > max(begin, first))
        n_passage_tokens = sum(len(w["passage_ids"]) for w in windows)
        n_prefix_tokens = sum(len(lm.document_start) + w["begin"] - w["start"] for w in windows)
        meter.add(tokens_retrieved=n_passage_tokens, tokens_prompt=n_prefix_tokens, examples=1)
        stats["windows"] += len(windows)
        stats["spans"] += len(spans)
        return {
            "doc_id": doc_id,
            "nll_sum": nll,
            "n_tokens": n_scored,
            "n_words": n_words,
            "retrieved_doc_ids": [ps[0].doc_id if ps else "" for ps in used],  # the top document per span, as In-Context RALM
            "retrieved_scores": [ps[0].score if ps else float("nan") for ps in used],
            "tokens_prompt": n_prefix_tokens,
            "tokens_retrieved": n_passage_tokens,
            "tokens_scored": n_scored,
            "retrieval_calls": len(used),
            "lm_windows": len(windows),
        }
