"""The shapes every retriever and every architecture share: a batched `SearchResult`, one
`Passage` per hit, and the `Retriever` protocol (numpy only: cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk: ids, the retriever's score, and its text (`{title}\\n{text}`)."""

    chunk_id: str
    doc_id: str
    score: float
    text: str


@dataclass
class SearchResult:
    """Batched results, one row per query, best first.

    The list fields hold only real hits (a row can be shorter than k when the corpus, or BM25's
    term overlap, runs out); `scores` is always [n_queries, k], padded with -inf, and `rows`
    [n_queries, k] row numbers into the chunk table, padded with -1.
    """

    chunk_ids: list[list[str]]
    doc_ids: list[list[str]]
    scores: np.ndarray
    texts: list[list[str]]
    rows: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.chunk_ids)

    @property
    def k(self) -> int:
        return int(self.scores.shape[1])

    def passages(self) -> list[list[Passage]]:
        """One list of `Passage` per query, best first (only real hits)."""
        return [
            [Passage(str(c), str(d), float(s), str(t)) for c, d, s, t in zip(chunks, docs, np.asarray(scores).tolist(), texts, strict=False)]
            for chunks, docs, scores, texts in zip(self.chunk_ids, self.doc_ids, self.scores, self.texts, strict=True)
        ]


@runtime_checkable
class Retriever(Protocol):
    name: str
    calls: int  # search() invocations
    queries: int  # queries searched

    def search(self, queries: list[str], k: int, exclude_doc_ids: list[set[str]] | None = None) -> SearchResult: ...

