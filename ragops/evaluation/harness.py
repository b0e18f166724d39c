"""One evaluation harness for every architecture: QA (describe, identify, define, cloze, qa) and language modelling.

The architecture produces raw outputs (`answer`, `score_documents`); everything measured from them
(normalised EM and F1, gold-answer NLL, recall of the documents shown, perplexities, bootstrap
intervals) is computed here, identically for all architectures.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ragops.evaluation.metrics import exact_match, normalize_answer, perplexity_metrics, token_f1, with_ci

if TYPE_CHECKING:
    from ragops.architectures.base import Architecture
    from ragops.config import EvalConfig
    from ragops.cost import CostMeter

PREDICTION_COLUMNS = [
    "task", "qid", "doc_id", "question", "gold", "prediction", "em", "f1", "gold_nll", "retrieval_recall",
    "retrieved_doc_ids", "retrieved_scores", "shown_doc_ids", "tokens_prompt", "tokens_retrieved",
    "tokens_generated", "tokens_scored", "nll_sum", "n_tokens", "n_words", "retrieval_calls", "answer_in_train",
]
QA_METRICS = ("em", "f1", "gold_nll", "retrieval_recall")
#: The same quality on the questions whose (normalised) answer is no train-split answer: a method
#: that trains on the train split could otherwise score by reciting a memorised answer string
#: ("family of birds" is the answer of 6.8% of test `describe` questions and of many train ones).
QA_UNSEEN_METRICS = ("em_unseen", "f1_unseen", "gold_nll_unseen")
LM_METRICS = ("token_ppl", "word_ppl")


def evaluate_qa(
    arch: Architecture, task: str, questions: pd.DataFrame, meter: CostMeter, eval_config: EvalConfig, seed: int,
    train_answers: frozenset[str] = frozenset(),
) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics `<task>/{em,f1,gold_nll,retrieval_recall}` (+ CIs) and one prediction row per question,
    and `<task>/{em,f1,gold_nll}_unseen` on the questions whose normalised answer is not in
    `train_answers` (the train split's answers, normalised)."""
    out = arch.answer(questions.reset_index(drop=True), meter)
    if len(out) != len(questions) or list(out["qid"]) != list(questions["qid"]):
        raise RuntimeError(f"{arch.name}.answer returned {len(out)} rows for {len(questions)} questions, or out of order")
    rows = []
    for (_, q), (_, a) in zip(questions.iterrows(), out.iterrows(), strict=True):
        shown = list(a["shown_doc_ids"])
        # Any accepted answer counts (a user question may list several); the first is the reference.
        answers = list(q["answers"]) if "answers" in q.index and q["answers"] is not None and len(q["answers"]) else [q["answer"]]
        gold_doc = q["gold_doc_id"] if isinstance(q["gold_doc_id"], str) else None
        rows.append(
            {
                "task": task,
                "qid": q["qid"],
                "doc_id": q["gold_doc_id"],
                "question": q["question"],
                "gold": q["answer"],
                "prediction": a["prediction"],
                "em": max(exact_match(a["prediction"], answer) for answer in answers),
                "f1": max(token_f1(a["prediction"], answer) for answer in answers),
                "gold_nll": float(a["gold_nll"]),
                # No gold document (a cloze sentence's source is held out; a user question may name
                # none): recall is undefined, not 0.
                "retrieval_recall": float(gold_doc in shown) if gold_doc is not None else float("nan"),
                "retrieved_doc_ids": list(a["retrieved_doc_ids"]),
                "retrieved_scores": [float(s) for s in a["retrieved_scores"]],
                "shown_doc_ids": shown,
                "tokens_prompt": int(a["tokens_prompt"]),
                "tokens_retrieved": int(a["tokens_retrieved"]),
                "tokens_generated": int(a["tokens_generated"]),
                "tokens_scored": int(a["gold_tokens"]),
                "retrieval_calls": int(bool(len(a["retrieved_doc_ids"]))),
                "answer_in_train": normalize_answer(q["answer"]) in train_answers,
            }
        )
    table = pd.DataFrame(rows)
    per_example = {name: table[name].dropna().to_numpy(dtype=float) for name in QA_METRICS}
    unseen = table[~table["answer_in_train"]]
    per_example.update({f"{name}_unseen": unseen[name].dropna().to_numpy(dtype=float) for name in ("em", "f1", "gold_nll")})
    if not per_example["retrieval_recall"].size:  # no question of this task has a gold document
        del per_example["retrieval_recall"]
    metrics = with_ci(task, per_example, eval_config.bootstrap_samples, eval_config.confidence, seed)
    # How often the architecture retrieved at all (1 for fixed-retrieval methods, 0 closed book,
    # SELF-RAG's adaptive rate): an inference property, not a quality.
    metrics[f"inference/{task}/retrieval_rate"] = float((table["retrieval_calls"] > 0).mean()) if len(table) else math.nan
    return metrics, table


def evaluate_lm(
    arch: Architecture, docs: pd.DataFrame, meter: CostMeter, eval_config: EvalConfig, seed: int
) -> tuple[dict[str, float], pd.DataFrame]:
    """`lm/token_ppl` and `lm/word_ppl` (+ CIs, bootstrap over documents) and one row per document."""
    out = arch.score_documents(docs.reset_index(drop=True), meter)
    if len(out) != len(docs) or list(out["doc_id"]) != list(docs["doc_id"]):
        raise RuntimeError(f"{arch.name}.score_documents returned {len(out)} rows for {len(docs)} documents, or out of order")
    table = pd.DataFrame(
        {
            "task": "lm",
            "qid": None,
            "doc_id": out["doc_id"],
            "nll_sum": out["nll_sum"].astype(float),
            "n_tokens": out["n_tokens"].astype(int),
            "n_words": out["n_words"].astype(int),
            "retrieved_doc_ids": out["retrieved_doc_ids"],
            "retrieved_scores": out["retrieved_scores"],
            "tokens_prompt": out["tokens_prompt"].astype(int),
            "tokens_retrieved": out["tokens_retrieved"].astype(int),
            "tokens_generated": 0,
            "tokens_scored": out["tokens_scored"].astype(int),
            "retrieval_calls": out["retrieval_calls"].astype(int),
        }
    )
    metrics = perplexity_metrics(
        table["nll_sum"].to_numpy(), table["n_tokens"].to_numpy(), table["n_words"].to_numpy(),
        eval_config.bootstrap_samples, eval_config.confidence, seed,
    )
    return metrics, table


def predictions_frame(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """All tasks' rows in one table with the contract's columns (missing values as None/NaN)."""
    frames = [p.reindex(columns=PREDICTION_COLUMNS) for p in parts if len(p)]
    if not frames:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    for column in ("retrieved_doc_ids", "retrieved_scores", "shown_doc_ids"):
        table[column] = [list(v) if isinstance(v, (list, tuple, np.ndarray)) else [] for v in table[column]]
    for column in ("qid", "doc_id", "question", "gold", "prediction"):
        table[column] = table[column].astype(object).where(table[column].notna(), None)
    table["answer_in_train"] = table["answer_in_train"].astype("boolean")  # NA for lm rows
    for column in ("em", "f1", "gold_nll", "retrieval_recall", "nll_sum"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    for column in ("tokens_prompt", "tokens_retrieved", "tokens_generated", "tokens_scored", "n_tokens", "n_words", "retrieval_calls"):
        table[column] = pd.to_numeric(table[column], errors="coerce").fillna(0).astype("int64")
    return table


def metric_keys(tasks: list[str]) -> list[str]:
    """Every metric key `run_architecture` reports for `tasks` (identical for all architectures)."""
    keys: list[str] = []
    for task in tasks:
        for name in LM_METRICS if task == "lm" else (*QA_METRICS, *QA_UNSEEN_METRICS):
            keys += [f"{task}/{name}", f"{task}/{name}_ci_low", f"{task}/{name}_ci_high"]
        if task != "lm":
            keys.append(f"inference/{task}/retrieval_rate")
    return keys


