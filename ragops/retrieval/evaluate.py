"""Retrieval evaluation: doc-level recall/MRR/nDCG and latency per split and retriever.

Metric keys follow docs/contracts.md: `<split>/<retriever>/<metric>` (recall_at_<k>, mrr_at_10,
ndcg_at_10, latency_ms, n_questions) and per task `<split>/<retriever>/<task>/<metric>`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from rich.table import Table
from tqdm.auto import tqdm

from ragops.errors import RagopsError
from ragops.retrieval.metrics import dedupe, summarize_ranks

log = logging.getLogger(__name__)

CUTOFF = 10  # MRR and nDCG cut-off
QUESTION_COLUMNS = ("qid", "task", "split", "question", "gold_doc_id")


def select_questions(
    questions_df: pd.DataFrame, splits: Sequence[str], max_questions: int | None = None
) -> pd.DataFrame:
    """Questions of `splits` that have a gold document (a cloze question or a user question naming
    none has nothing to find), at most `max_questions` per (split, task), in file order."""
    missing = [c for c in QUESTION_COLUMNS if c not in questions_df.columns]
    if missing:
        raise RagopsError(f"questions table: missing column(s) {', '.join(missing)}")
    selected = questions_df[questions_df["split"].isin(list(splits)) & questions_df["gold_doc_id"].notna()]
    if max_questions is not None:
        selected = selected.groupby(["split", "task"], sort=False, group_keys=False).head(max_questions)
    return selected.reset_index(drop=True)


def evaluate_retrievers(
    questions_df: pd.DataFrame,
    retrievers: Mapping[str, object],
    splits: Sequence[str] = ("dev", "test"),
    ks: Sequence[int] = (1, 5, 10),
    max_questions: int | None = None,
    progress: bool = True,
    *,
    batch_size: int = 64,
    depth_factor: int = 3,
) -> tuple[dict[str, float], pd.DataFrame]:
    """(metrics, per-question frame) for every retriever on every split.

    Each question retrieves `depth_factor * max(ks + [10])` chunks so that enough distinct
    documents are ranked after de-duplication; latency_ms is the mean wall time per query of
    those batched searches (query encoding included), after one untimed warm-up query.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise RagopsError("retrieval_eval.ks: need at least one k >= 1")
    max_k = max(ks[-1], CUTOFF)
    depth = max_k * depth_factor
    selected = select_questions(questions_df, splits, max_questions)
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    total_batches = sum(
        -(-int((selected["split"] == split).sum()) // batch_size) for split in splits
    ) * len(retrievers)
    bar = tqdm(total=total_batches, desc="Retrieval eval", unit="batch", disable=not progress, leave=False)
    try:
        for name, retriever in retrievers.items():
            if len(selected):
                retriever.search([str(selected["question"].iloc[0])], depth)  # warm-up, untimed
            for split in splits:
                subset = selected[selected["split"] == split]
                if subset.empty:
                    log.warning("retrieval eval: no questions in split '%s'", split)
                    continue
                questions = subset["question"].astype(str).tolist()
                golds = subset["gold_doc_id"].astype(str).tolist()
                ranks = np.full(len(subset), -1, dtype=np.int64)
                retrieved: list[list[str]] = []
                seconds = 0.0
                for start in range(0, len(questions), batch_size):
                    batch = questions[start : start + batch_size]
                    began = time.perf_counter()
                    result = retriever.search(batch, depth)
                    seconds += time.perf_counter() - began
                    for offset, docs in enumerate(result.doc_ids):
                        distinct = dedupe(docs)[:max_k]
                        retrieved.append(distinct)
                        gold = golds[start + offset]
                        ranks[start + offset] = distinct.index(gold) + 1 if gold in distinct else -1
                    bar.update(1)
                prefix = f"{split}/{name}"
                for key, value in summarize_ranks(ranks, ks, CUTOFF).items():
                    metrics[f"{prefix}/{key}"] = value
                metrics[f"{prefix}/latency_ms"] = 1000.0 * seconds / len(questions)
                metrics[f"{prefix}/n_questions"] = float(len(questions))
                tasks = subset["task"].astype(str).to_numpy()
                for task in sorted(set(tasks)):
                    for key, value in summarize_ranks(ranks[tasks == task], ks, CUTOFF).items():
                        metrics[f"{prefix}/{task}/{key}"] = value
                for i, (_, question) in enumerate(subset.iterrows()):
                    rows.append(
                        {
                            "qid": question["qid"],
                            "split": split,
                            "task": question["task"],
                            "retriever": name,
                            "gold_doc_id": golds[i],
                            "retrieved_doc_ids": retrieved[i],
                            "gold_rank": int(ranks[i]),
                        }
                    )
    finally:
        bar.close()
    columns = ["qid", "split", "task", "retriever", "gold_doc_id", "retrieved_doc_ids", "gold_rank"]
    return metrics, pd.DataFrame(rows, columns=columns)


_KEY = re.compile(r"^(?P<split>[^/]+)/(?P<retriever>[^/]+)/(?P<metric>recall_at_\d+|mrr_at_10|ndcg_at_10|latency_ms)$")


def retrieval_table(metrics: Mapping[str, float], title: str = "Retrieval") -> Table:
    """Rows = retriever x split; columns R@k..., MRR@10, nDCG@10, ms/query."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    recall_ks: set[int] = set()
    for key, value in metrics.items():
        match = _KEY.match(key)
        if not match:
            continue
        cells.setdefault((match["retriever"], match["split"]), {})[match["metric"]] = value
        if match["metric"].startswith("recall_at_"):
            recall_ks.add(int(match["metric"].removeprefix("recall_at_")))
    table = Table(title=title)
    table.add_column("retriever")
    table.add_column("split")
    columns = [(f"recall_at_{k}", f"R@{k}") for k in sorted(recall_ks)]
    columns += [("mrr_at_10", "MRR@10"), ("ndcg_at_10", "nDCG@10"), ("latency_ms", "ms/query")]
    for _, header in columns:
        table.add_column(header, justify="right")
    split_order = {"train": 0, "dev": 1, "test": 2}
    for retriever, split in sorted(cells, key=lambda rs: (rs[0], split_order.get(rs[1], 9), rs[1])):
        values = cells[(retriever, split)]
        row = [retriever, split]
        for metric, _ in columns:
            value = values.get(metric)
            row.append("-" if value is None else (f"{value:.1f}" if metric == "latency_ms" else f"{value:.3f}"))
        table.add_row(*row)
    return table
