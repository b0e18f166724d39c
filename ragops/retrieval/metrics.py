"""Doc-level ranking metrics for one gold document per question.

A retrieved chunk counts for its document; doc ids are de-duplicated in rank order before scoring,
so rank r means "the r-th distinct document retrieved". Ranks are 1-based; -1 = not retrieved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def dedupe(doc_ids: Iterable[str]) -> list[str]:
    """Doc ids in rank order, each kept at its first (best) position."""
    seen: set[str] = set()
    out = []
    for doc in doc_ids:
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def gold_rank(ranked_doc_ids: Sequence[str], gold_doc_id: str) -> int:
    """1-based rank of the gold document among the distinct retrieved documents, or -1."""
    for rank, doc in enumerate(dedupe(ranked_doc_ids), start=1):
        if doc == gold_doc_id:
            return rank
    return -1


def recall_from_rank(rank: int, k: int) -> float:
    return 1.0 if 0 < rank <= k else 0.0


def mrr_from_rank(rank: int, k: int) -> float:
    return 1.0 / rank if 0 < rank <= k else 0.0


def ndcg_from_rank(rank: int, k: int) -> float:
    """One relevant document: DCG = 1/log2(rank+1), ideal DCG = 1."""
    return 1.0 / math.log2(rank + 1) if 0 < rank <= k else 0.0


def recall_at_k(ranked_doc_ids: Sequence[str], gold_doc_id: str, k: int) -> float:
    return recall_from_rank(gold_rank(ranked_doc_ids, gold_doc_id), k)


def mrr_at_k(ranked_doc_ids: Sequence[str], gold_doc_id: str, k: int) -> float:
    return mrr_from_rank(gold_rank(ranked_doc_ids, gold_doc_id), k)


def ndcg_at_k(ranked_doc_ids: Sequence[str], gold_doc_id: str, k: int) -> float:
    return ndcg_from_rank(gold_rank(ranked_doc_ids, gold_doc_id), k)


def summarize_ranks(ranks: Sequence[int] | np.ndarray, ks: Sequence[int], cutoff: int = 10) -> dict[str, float]:
    """Means over questions: recall_at_<k> for each k, mrr_at_<cutoff>, ndcg_at_<cutoff>."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        return {}
    hit = ranks > 0
    out = {f"recall_at_{k}": float(np.mean(hit & (ranks <= k))) for k in sorted(set(ks))}
    within = hit & (ranks <= cutoff)
    safe = np.where(within, ranks, 1)
    out[f"mrr_at_{cutoff}"] = float(np.mean(np.where(within, 1.0 / safe, 0.0)))
    out[f"ndcg_at_{cutoff}"] = float(np.mean(np.where(within, 1.0 / np.log2(safe + 1), 0.0)))
    return out
