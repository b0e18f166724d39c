"""Evaluation results written the way the evaluate stage writes them, for comparison tests:
`metrics/<name>.json`, `artifacts/eval/<name>/predictions.parquet` and `info.json` (tags)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ragops.evaluation.harness import predictions_frame
from ragops.evaluation.metrics import perplexity_metrics, with_ci
from ragops.io import write_json
from ragops.paths import Workspace

N_QUESTIONS = 40
N_DOCS = 12


def predictions(f1: np.ndarray, gold_nll: np.ndarray, nll_per_token: np.ndarray, tokens: np.ndarray) -> pd.DataFrame:
    qa = pd.DataFrame({
        "task": "describe", "qid": [f"describe:{i:03d}" for i in range(len(f1))], "doc_id": "wiki:x", "question": "q",
        "gold": "g", "prediction": "p", "em": (f1 == 1.0).astype(float), "f1": f1, "gold_nll": gold_nll, "retrieval_recall": 0.0,
    })
    lm = pd.DataFrame({
        "task": "lm", "qid": None, "doc_id": [f"wiki:held{i:03d}" for i in range(len(tokens))],
        "nll_sum": nll_per_token * tokens, "n_tokens": tokens, "n_words": (tokens * 0.75).astype(int),
    })
    return predictions_frame([qa, lm])


def write_results(ws: Workspace, name: str, tags: dict[str, str], table: pd.DataFrame, cost: dict[str, float]) -> dict[str, Any]:
    qa = table[table["task"] == "describe"]
    lm = table[table["task"] == "lm"]
    metrics = {
        **with_ci("describe", {k: qa[k].to_numpy(float) for k in ("em", "f1", "gold_nll")}, 200, 0.95, 0),
        **perplexity_metrics(lm["nll_sum"].to_numpy(), lm["n_tokens"].to_numpy(), lm["n_words"].to_numpy(), 200, 0.95, 0),
        **cost,
    }
    ws.eval_dir(name).mkdir(parents=True, exist_ok=True)
    table.to_parquet(ws.eval_dir(name) / "predictions.parquet", index=False)
    write_json(ws.eval_dir(name) / "info.json", {"architecture": name, **tags})
    ws.metrics_dir.mkdir(parents=True, exist_ok=True)
    write_json(ws.metrics_file(name), metrics)
    return metrics


def two_architectures(ws: Workspace, *, gain: float = 0.25) -> dict[str, pd.DataFrame]:
    """closed_book and incontext_ralm on the same 40 questions and 12 articles; RALM better by
    `gain` F1 per question (plus noise) and slightly lower NLL per token, at 3x the inference cost."""
    rng = np.random.default_rng(7)
    f1 = rng.uniform(0, 0.5, N_QUESTIONS).round(3)
    nll = rng.uniform(2, 5, N_QUESTIONS)
    per_token = rng.uniform(2.4, 3.0, N_DOCS)
    tokens = rng.integers(60, 300, N_DOCS)
    closed = predictions(f1, nll, per_token, tokens)
    ralm = predictions(np.clip(f1 + gain + rng.normal(0, 0.05, N_QUESTIONS), 0, 1).round(3), nll - 0.8, per_token - 0.05, tokens)
    zero_train = {"train/wall_s": 0.0, "train/cpu_s": 0.0, "train/cost_usd": 0.0, "train/flops": 0.0, "train/params_trainable": 0.0}
    write_results(ws, "closed_book", {"family": "baseline", "finetune": "none"}, closed, {
        **zero_train, "inference/wall_s": 10.0, "inference/qa/wall_s_per_1k_questions": 150.0,
        "inference/qa/cost_usd_per_1k_questions": 0.01, "inference/lm/cost_usd_per_1k_tokens": 0.001})
    write_results(ws, "incontext_ralm", {"family": "black-box", "finetune": "none"}, ralm, {
        **zero_train, "inference/wall_s": 30.0, "inference/qa/wall_s_per_1k_questions": 450.0,
        "inference/qa/cost_usd_per_1k_questions": 0.03, "inference/lm/cost_usd_per_1k_tokens": 0.004})
    return {"closed_book": closed, "incontext_ralm": ralm}


def write_fake_architecture(ws: Workspace, name: str) -> dict[str, Any]:
    """`tests.server_fixtures.FAKE_ARCHITECTURES[name]` as evaluation outputs: its metrics (as logged),
    and per-item predictions whose means match its describe F1 (0.20 closed book, 0.45 RALM)."""
    from tests.server_fixtures import FAKE_ARCHITECTURES

    spec = FAKE_ARCHITECTURES[name]
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.02, N_QUESTIONS)
    f1 = np.clip(spec["metrics"]["describe/f1"] + noise - noise.mean(), 0, 1)
    tokens = np.full(N_DOCS, 100)
    per_token = np.full(N_DOCS, np.log(spec["metrics"]["lm/token_ppl"]))
    table = predictions(f1, np.full(N_QUESTIONS, 3.0), per_token, tokens)
    return write_results(ws, name, spec["tags"], table, spec["metrics"])
