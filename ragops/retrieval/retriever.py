"""The retrieval API every RAG architecture uses: batched `search(queries, k, exclude_doc_ids)`.

`DenseRetriever` (encoder + FAISS), `BM25Retriever` (bm25s) and `HybridRetriever` (reciprocal-rank
fusion) all return a `SearchResult` with one row per query. `load_retriever` builds one from the
workspace's chunk table and index, caching the heavy objects (chunk table, FAISS index, BM25,
encoder) per process while handing each caller its own retriever object, so each caller's
`calls` / `queries` / `seconds` counters meter only its own use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ragops.errors import RagopsError
from ragops.retrieval.types import Passage, Retriever, SearchResult
from ragops.retrieval.embed import Encoder, EmbeddingCache, chunk_embedding_text, embed_texts
from ragops.retrieval.index import BM25Index, build_dense_index, check_encoder, chunk_ids_hash, load_index

log = logging.getLogger(__name__)

CHUNK_COLUMNS = ("chunk_id", "doc_id", "title", "text")


class ChunkTable:
    """Column arrays of chunks.parquet, row i = index row i."""

    def __init__(self, chunks: pd.DataFrame) -> None:
        missing = [column for column in CHUNK_COLUMNS if column not in chunks.columns]
        if missing:
            raise RagopsError(f"chunk table: missing column(s) {', '.join(missing)}")
        self.chunk_ids: list[str] = chunks["chunk_id"].astype(str).tolist()
        self.doc_ids: list[str] = chunks["doc_id"].astype(str).tolist()
        self.texts: list[str] = [
            chunk_embedding_text(title, text)
            for title, text in zip(chunks["title"].fillna("").astype(str), chunks["text"].fillna("").astype(str))
        ]
        self._doc_rows: dict[str, np.ndarray] | None = None
        self._hash: str | None = None

    @classmethod
    def of(cls, chunks: pd.DataFrame | ChunkTable) -> ChunkTable:
        return chunks if isinstance(chunks, ChunkTable) else cls(chunks)

    def __len__(self) -> int:
        return len(self.chunk_ids)

    @property
    def ids_hash(self) -> str:
        if self._hash is None:
            self._hash = chunk_ids_hash(self.chunk_ids)
        return self._hash

    def doc_rows(self, doc_id: str) -> np.ndarray:
        if self._doc_rows is None:
            groups: dict[str, list[int]] = {}
            for row, doc in enumerate(self.doc_ids):
                groups.setdefault(doc, []).append(row)
            self._doc_rows = {doc: np.asarray(rows, dtype=np.int64) for doc, rows in groups.items()}
        return self._doc_rows.get(doc_id, np.zeros(0, dtype=np.int64))

    def exclude_rows(self, exclude_doc_ids: Sequence[set[str] | None] | None, n_queries: int) -> list[np.ndarray] | None:
        if exclude_doc_ids is None:
            return None
        if len(exclude_doc_ids) != n_queries:
            raise ValueError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for {n_queries} queries")
        out = []
        for docs in exclude_doc_ids:
            rows = [self.doc_rows(doc) for doc in (docs or ())]
            out.append(np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))
        return out

    def result(self, rows: np.ndarray, scores: np.ndarray) -> SearchResult:
        """SearchResult from [n, k] rows (-1 = none) and scores."""
        chunk_ids, doc_ids, texts = [], [], []
        for query_rows in rows:
            real = [int(r) for r in query_rows if r >= 0]
            chunk_ids.append([self.chunk_ids[r] for r in real])
            doc_ids.append([self.doc_ids[r] for r in real])
            texts.append([self.texts[r] for r in real])
        return SearchResult(chunk_ids, doc_ids, np.asarray(scores, dtype=np.float32), texts, rows)


class _Metered:
    name: str

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.queries = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _meter(self, n_queries: int, seconds: float) -> None:
        with self._lock:
            self.calls += 1
            self.queries += n_queries
            self.seconds += seconds


    def counters(self) -> dict[str, float]:
        return {"calls": self.calls, "queries": self.queries, "seconds": round(self.seconds, 4)}


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)


class DenseRetriever(_Metered):
    """Query encoder + FAISS index over the chunk vectors (inner product of normalised vectors)."""

    def __init__(self, encoder: Encoder, index: Any, chunks_df: pd.DataFrame | ChunkTable, name: str = "dense") -> None:
        super().__init__(name)
        self.encoder = encoder
        self.index = index
        self.table = ChunkTable.of(chunks_df)
        if index.ntotal != len(self.table):
            raise RagopsError(f"dense retriever: index has {index.ntotal} vectors but the chunk table has {len(self.table)} rows")
        if index.d != encoder.dim:
            raise RagopsError(f"dense retriever: index dim {index.d} != encoder '{encoder.spec}' dim {encoder.dim}")

    @classmethod
    def from_vectors(
        cls,
        encoder: Encoder,
        vectors: np.ndarray,
        chunks_df: pd.DataFrame | ChunkTable,
        factory: str = "Flat",
        ef_search: int | None = 64,
        nprobe: int | None = 16,
        name: str = "dense",
    ) -> DenseRetriever:
        """A retriever over a freshly built index (e.g. after fine-tuning the encoder)."""
        return cls(encoder, build_dense_index(vectors, factory, ef_search, nprobe), chunks_df, name=name)


    def search(self, queries: list[str], k: int, exclude_doc_ids: list[set[str]] | None = None) -> SearchResult:
        started = time.perf_counter()
        vectors = self.encoder.encode(list(queries), progress=False) if len(queries) else np.zeros((0, self.index.d), np.float32)
        result = self._search_vectors(vectors, k, exclude_doc_ids)
        self._meter(len(queries), time.perf_counter() - started)
        return result

    def search_vectors(self, query_vectors: np.ndarray, k: int, exclude_doc_ids: list[set[str]] | None = None) -> SearchResult:
        """Search with precomputed (normalised) query vectors."""
        started = time.perf_counter()
        result = self._search_vectors(np.ascontiguousarray(query_vectors, dtype=np.float32), k, exclude_doc_ids)
        self._meter(len(query_vectors), time.perf_counter() - started)
        return result

    def _search_vectors(self, vectors: np.ndarray, k: int, exclude_doc_ids: list[set[str]] | None) -> SearchResult:
        n_queries, k = len(vectors), int(k)
        rows, scores = _empty(n_queries, k)
        total = int(self.index.ntotal)
        if n_queries == 0 or k == 0 or total == 0:
            return self.table.result(rows, scores)
        excluded = self.table.exclude_rows(exclude_doc_ids, n_queries)
        # Excluded chunks can take at most this many of the top slots: fetch that many more.
        fetch = min(total, k + (max(len(r) for r in excluded) if excluded else 0))
        pending = np.arange(n_queries)
        while pending.size:
            found_scores, found_rows = self.index.search(vectors[pending], fetch)
            retry = []
            for j, qi in enumerate(pending):
                keep = found_rows[j] >= 0
                if excluded is not None and excluded[qi].size:
                    keep &= ~np.isin(found_rows[j], excluded[qi])
                hits, hit_scores = found_rows[j][keep][:k], found_scores[j][keep][:k]
                available = total - (excluded[qi].size if excluded is not None else 0)
                if hits.size < min(k, available) and fetch < total:
                    retry.append(qi)  # an approximate index returned too few: ask for more
                    continue
                rows[qi, : hits.size] = hits
                scores[qi, : hits.size] = hit_scores
            pending = np.asarray(retry, dtype=np.int64)
            fetch = min(total, fetch * 2)
        return self.table.result(rows, scores)


class BM25Retriever(_Metered):
    """bm25s over the same `title\\ntext` strings the dense encoder embeds."""

    def __init__(self, bm25: BM25Index, chunks_df: pd.DataFrame | ChunkTable, name: str = "bm25") -> None:
        super().__init__(name)
        self.bm25 = bm25
        self.table = ChunkTable.of(chunks_df)
        if bm25.n_docs != len(self.table):
            raise RagopsError(f"bm25 retriever: index has {bm25.n_docs} documents but the chunk table has {len(self.table)} rows")

    def search(self, queries: list[str], k: int, exclude_doc_ids: list[set[str]] | None = None) -> SearchResult:
        started = time.perf_counter()
        excluded = self.table.exclude_rows(exclude_doc_ids, len(queries))
        rows, scores = self.bm25.search(list(queries), int(k), excluded)
        result = self.table.result(rows, scores)
        self._meter(len(queries), time.perf_counter() - started)
        return result


class HybridRetriever(_Metered):
    """Reciprocal-rank fusion: score(chunk) = sum over retrievers of 1 / (rrf_k + rank), rank from 1.

    Each retriever is asked for its top max(4k, 50); ties keep the order of first appearance
    (the first retriever's ranking wins).
    """

    def __init__(self, retrievers: Sequence[Retriever], rrf_k: int = 60, name: str = "hybrid") -> None:
        super().__init__(name)
        if not retrievers:
            raise RagopsError("hybrid retriever: needs at least one retriever")
        self.retrievers = list(retrievers)
        self.rrf_k = int(rrf_k)
        tables = [getattr(r, "table", None) for r in self.retrievers]
        self.table = tables[0]
        if any(t is None for t in tables) or len({t.ids_hash for t in tables}) != 1:
            self.table = None  # fuse by chunk id only; rows are not meaningful

    def search(self, queries: list[str], k: int, exclude_doc_ids: list[set[str]] | None = None) -> SearchResult:
        started = time.perf_counter()
        k = int(k)
        depth = max(k * 4, 50)
        results = [r.search(list(queries), depth, exclude_doc_ids) for r in self.retrievers]
        n = len(queries)
        rows_out, scores_out = _empty(n, k)
        chunk_ids, doc_ids, texts = [], [], []
        for qi in range(n):
            fused: dict[str, float] = {}
            info: dict[str, tuple[str, str, int]] = {}
            for result in results:
                result_rows = result.rows[qi] if result.rows is not None else None
                for rank, chunk in enumerate(result.chunk_ids[qi], start=1):
                    fused[chunk] = fused.get(chunk, 0.0) + 1.0 / (self.rrf_k + rank)
                    if chunk not in info:
                        row = int(result_rows[rank - 1]) if result_rows is not None else -1
                        info[chunk] = (result.doc_ids[qi][rank - 1], result.texts[qi][rank - 1], row)
            best = sorted(fused, key=fused.__getitem__, reverse=True)[:k]  # stable: ties keep first appearance
            chunk_ids.append(best)
            doc_ids.append([info[c][0] for c in best])
            texts.append([info[c][1] for c in best])
            scores_out[qi, : len(best)] = [fused[c] for c in best]
            rows_out[qi, : len(best)] = [info[c][2] if self.table is not None else -1 for c in best]
        self._meter(n, time.perf_counter() - started)
        return SearchResult(chunk_ids, doc_ids, scores_out, texts, rows_out)


# --- loading from the workspace ------------------------------------------------------------------
_cache: dict[tuple, Any] = {}
_cache_lock = threading.RLock()


def clear_cache() -> None:
    """Forget the per-process cache of chunk tables, indexes and encoders."""
    with _cache_lock:
        _cache.clear()


def _stamp(path: Path) -> tuple:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return (None,)
    return (stat.st_mtime_ns, stat.st_size)


def _cached(key: tuple, stamp: tuple, make: Any) -> Any:
    """One entry per key; rebuilt when the file stamp changes (so old versions are dropped)."""
    with _cache_lock:
        entry = _cache.get(key)
        if entry is None or entry[0] != stamp:
            _cache[key] = entry = (stamp, make())
        return entry[1]


def load_chunk_table(path: str | Path) -> ChunkTable:
    path = Path(path).resolve()
    if not path.exists():
        raise RagopsError(f"{path}: chunk table missing (run the 'chunk' stage)")
    return _cached(("chunks", str(path)), _stamp(path), lambda: ChunkTable(pd.read_parquet(path)))


def load_encoder(embed_config: Any) -> Encoder:
    """The encoder of an `EmbedConfig`, loaded once per process."""
    key = ("encoder", embed_config.model, embed_config.device, embed_config.threads, embed_config.max_seq_length, embed_config.batch_size)
    return _cached(
        key,
        (),
        lambda: Encoder.load(
            embed_config.model,
            device=embed_config.device,
            threads=embed_config.threads,
            max_seq_length=embed_config.max_seq_length,
            batch_size=embed_config.batch_size,
        ),
    )


def _load_workspace_index(index_dir: Path) -> tuple[Any, BM25Index | None, dict[str, Any]]:
    index_dir = index_dir.resolve()
    return _cached(("index", str(index_dir)), _stamp(index_dir / "meta.json"), lambda: load_index(index_dir))


def load_retriever(
    ws: Any,
    config: Any,
    kind: Literal["bm25", "dense", "hybrid"],
    encoder: Encoder | None = None,
    trained_dir: str | Path | None = None,
) -> Retriever:
    """A fresh retriever (own counters) over the workspace's chunks.parquet and artifacts/index/.

    `trained_dir`: the retriever of a trained architecture (`query_encoder/` and `index/` written by
    `ragops.retrieval.trainable` and the architecture): dense search then uses the tuned query
    encoder over the index of the tuned passage encoder; BM25 stays the workspace's.
    """
    if kind not in ("bm25", "dense", "hybrid"):
        raise RagopsError(f"unknown retriever '{kind}' (known: bm25, dense, hybrid)")
    table = load_chunk_table(ws.chunks)
    dense, bm25, meta = _load_workspace_index(Path(ws.index_dir))
    where = Path(ws.index_dir)
    if int(meta.get("count", len(table))) != len(table) or meta.get("chunk_ids_hash", table.ids_hash) != table.ids_hash:
        raise RagopsError(
            f"{ws.index_dir}: index was built for other chunks ({meta.get('count')} vs {len(table)} in {ws.chunks});"
            " rerun the 'index' stage"
        )
    if trained_dir is not None and kind != "bm25":
        from ragops.retrieval.trainable import load_trained_encoders

        where = Path(trained_dir) / "index"
        dense, _, meta = _load_workspace_index(where)
        if meta.get("chunk_ids_hash", table.ids_hash) != table.ids_hash:
            raise RagopsError(f"{where}: the trained retriever's index was built for other chunks; retrain it")
        encoder = _cached(("trained-encoder", str(Path(trained_dir).resolve())), _stamp(where / "meta.json"),
                          lambda: load_trained_encoders(trained_dir, device=config.embed.device, batch_size=config.embed.batch_size)[0])

    def make_dense() -> DenseRetriever:
        if dense is None:
            raise RagopsError(f"{where}: no dense index in this index directory")
        enc = encoder if encoder is not None else load_encoder(config.embed)
        check_encoder(meta, enc, where=str(where))
        return DenseRetriever(enc, dense, table)

    def make_bm25() -> BM25Retriever:
        if bm25 is None:
            raise RagopsError(f"{ws.index_dir}: no BM25 index in this index directory")
        return BM25Retriever(bm25, table)

    if kind == "dense":
        return make_dense()
    if kind == "bm25":
        return make_bm25()
    return HybridRetriever([make_dense(), make_bm25()], rrf_k=config.index.rrf_k)
