"""Retrieval library: embeddings (+ cache), FAISS and BM25 indexes, retrievers, retrieval metrics.

Pure library code (no Prefect or MLflow). Names are exported lazily so that importing, say,
`ragops.retrieval.metrics` does not pull in torch or FAISS.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # embed
    "Encoder": "embed",
    "EmbeddingCache": "embed",
    "chunk_embedding_text": "embed",
    "embed_texts": "embed",
    "shard_ranges": "embed",
    "text_key": "embed",
    # index
    "BM25Index": "index",
    "build_bm25": "index",
    "build_dense_index": "index",
    "build_index": "index",
    "load_index": "index",
    "write_index": "index",
    # retriever
    "SearchResult": "types",
    "Retriever": "types",
    "Passage": "types",
    "ChunkTable": "retriever",
    "DenseRetriever": "retriever",
    "BM25Retriever": "retriever",
    "HybridRetriever": "retriever",
    "load_retriever": "retriever",
    "load_encoder": "retriever",
    # metrics / evaluate
    "recall_at_k": "metrics",
    "mrr_at_k": "metrics",
    "ndcg_at_k": "metrics",
    "gold_rank": "metrics",
    "evaluate_retrievers": "evaluate",
    "retrieval_table": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ragops.retrieval' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"ragops.retrieval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
