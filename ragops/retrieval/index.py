"""Dense (FAISS) and sparse (bm25s) indexes over the chunk table, written and read atomically.

On-disk layout of `artifacts/index/` (see docs/contracts.md): `dense.faiss`, `bm25/` (bm25s's
files plus `ragops_tokenizer.json`), `meta.json`.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ragops.errors import RagopsError
from ragops.io import atomic_dir, read_json, text_hash, write_json

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
DENSE_FILE = "dense.faiss"
BM25_DIR = "bm25"
META_FILE = "meta.json"
BM25_TOKENIZER_FILE = "ragops_tokenizer.json"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"


# --- dense ---------------------------------------------------------------------------------------
def _faiss_reason(error: BaseException) -> str:
    """FAISS errors are one C++ trace line; keep the human part after the source location."""
    text = " ".join(str(error).split())
    match = re.search(r"\.(?:cpp|h):\d+: (?:Error: '.*?' failed: )?(.+)$", text)
    if match:
        return match.group(1).strip()
    return text or type(error).__name__


def training_requirement(index: faiss.Index) -> tuple[int, str]:
    """(minimum number of training vectors, why) for an untrained index from `index_factory`."""
    needs, reasons = 1, []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needs = max(needs, int(ivf.nlist))
        reasons.append(f"{ivf.nlist} IVF lists")
    base = faiss.downcast_index(ivf if ivf is not None else index)
    pq = getattr(base, "pq", None)
    if pq is not None:
        centroids = 1 << int(pq.nbits)
        needs = max(needs, centroids)
        reasons.append(f"{centroids} PQ centroids per sub-quantizer")
    return needs, ", ".join(reasons) or "training"


def set_search_params(index: faiss.Index, ef_search: int | None = None, nprobe: int | None = None) -> dict[str, int]:
    """Apply efSearch (HNSW, also an HNSW coarse quantizer) and nprobe (IVF) where they exist."""
    applied: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
        applied["nprobe"] = int(ivf.nprobe)
    if ef_search is not None:
        for candidate in (index, getattr(ivf, "quantizer", None) if ivf is not None else None):
            if candidate is None:
                continue
            hnsw_index = faiss.downcast_index(candidate)
            hnsw = getattr(hnsw_index, "hnsw", None)
            if hnsw is not None:
                hnsw.efSearch = int(ef_search)
                applied["ef_search"] = int(ef_search)
    return applied


def build_dense_index(
    vectors: np.ndarray,
    factory: str = "HNSW32",
    ef_search: int | None = 64,
    nprobe: int | None = 16,
    metric: int = faiss.METRIC_INNER_PRODUCT,
) -> faiss.Index:
    """A FAISS index over `vectors` (rows = chunk rows), trained when the factory needs it.

    Vectors are expected L2-normalised, so inner product = cosine. A bad factory string, or too
    few vectors for an IVF/PQ factory, raises a one-line `RagopsError` naming `index.factory`.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise RagopsError(f"index: need a non-empty 2-D array of vectors, got shape {vectors.shape}")
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(dim, factory, metric)
    except Exception as error:  # noqa: BLE001 - faiss raises RuntimeError with a C++ trace
        raise RagopsError(
            f"index.factory: '{factory}' is not a valid FAISS index factory string for dim {dim} ({_faiss_reason(error)})"
        ) from None
    if not index.is_trained:
        needs, why = training_requirement(index)
        if n < needs:
            raise RagopsError(
                f"index.factory: '{factory}' needs at least {needs} vectors to train ({why}) but there are only {n} chunks;"
                f" use fewer lists/bits or a factory without training (Flat, HNSW32)"
            )
        if n < 39 * needs:
            log.warning("index.factory '%s': %d training vectors for %s (FAISS recommends %d)", factory, n, why, 39 * needs)
        try:
            index.train(vectors)
        except Exception as error:  # noqa: BLE001
            raise RagopsError(f"index.factory: training '{factory}' on {n} vectors failed ({_faiss_reason(error)})") from None
    index.add(vectors)
    set_search_params(index, ef_search, nprobe)
    return index


# --- sparse --------------------------------------------------------------------------------------
def _available_stemmer() -> tuple[Any, str | None]:
    """PyStemmer's English stemmer when installed (it is optional); else no stemming."""
    try:
        import Stemmer  # type: ignore[import-not-found]
    except ImportError:
        return None, None
    return Stemmer.Stemmer("english"), "pystemmer-english"


class BM25Index:
    """bm25s's BM25 plus the tokenizer settings it was built with (queries must use the same).

    Queries are tokenised to *strings* with the same function as the corpus and mapped through the
    index's own vocabulary (unknown words dropped). Tokenising queries to ids with a fresh vocabulary
    is what makes bm25s return the same documents for every query (FlashRAG #103); we never do it.
    """

    def __init__(self, bm25: Any, *, stemmer_name: str | None, stopwords: str = "en", k1: float, b: float) -> None:
        self.bm25 = bm25
        self.stemmer_name = stemmer_name
        self.stopwords = stopwords
        self.k1 = float(k1)
        self.b = float(b)
        self._stemmer = None
        if stemmer_name is not None:
            stemmer, available = _available_stemmer()
            if available != stemmer_name:
                raise RagopsError(
                    f"BM25 index was built with stemmer '{stemmer_name}', which is not installed here; rebuild the index"
                )
            self._stemmer = stemmer

    @property
    def n_docs(self) -> int:
        return int(self.bm25.scores["num_docs"])

    @property
    def vocab_size(self) -> int:
        return len(self.bm25.vocab_dict)

    def tokenize(self, texts: Sequence[str], progress: bool = False) -> list[list[str]]:
        import bm25s

        if not texts:
            return []
        return bm25s.tokenize(
            list(texts),
            lower=True,
            token_pattern=TOKEN_PATTERN,
            stopwords=self.stopwords,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=progress,
        )

    def query_ids(self, queries: Sequence[str]) -> list[list[int]]:
        return [self.bm25.get_tokens_ids(tokens) for tokens in self.tokenize(queries)]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for one query (zeros when no query word is in the vocabulary)."""
        ids = self.query_ids([query])[0]
        if not ids:
            return np.zeros(self.n_docs, dtype=np.float32)
        return np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float32)

    def search(
        self, queries: Sequence[str], k: int, exclude_rows: Sequence[np.ndarray | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, k] int64 padded with -1, scores [n, k] float32 padded with -inf).

        Only documents sharing at least one term with the query (score > 0) are returned; rows in
        `exclude_rows[i]` are never returned for query i.
        """
        k = int(k)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for qi, ids in enumerate(self.query_ids(queries)):
            if not ids or k == 0:
                continue
            doc_scores = np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float32).copy()
            if exclude_rows is not None and exclude_rows[qi] is not None and len(exclude_rows[qi]):
                doc_scores[exclude_rows[qi]] = 0.0
            positive = np.flatnonzero(doc_scores > 0)
            if positive.size > k:
                top = np.argpartition(-doc_scores[positive], k - 1)[:k]
                positive = positive[top]
            order = np.lexsort((positive, -doc_scores[positive]))  # score desc, then row asc
            chosen = positive[order]
            rows[qi, : chosen.size] = chosen
            scores[qi, : chosen.size] = doc_scores[chosen]
        return rows, scores

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.bm25.save(str(directory), show_progress=False)
        write_json(
            directory / BM25_TOKENIZER_FILE,
            {
                "library": "bm25s",
                "lower": True,
                "token_pattern": TOKEN_PATTERN,
                "stopwords": self.stopwords,
                "stemmer": self.stemmer_name,
                "k1": self.k1,
                "b": self.b,
                "n_docs": self.n_docs,
            },
        )

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        import bm25s

        directory = Path(directory)
        settings_file = directory / BM25_TOKENIZER_FILE
        if not settings_file.exists():
            raise RagopsError(f"{directory}: not a ragops BM25 index ({BM25_TOKENIZER_FILE} missing); rebuild the index")
        settings = read_json(settings_file)
        try:
            bm25 = bm25s.BM25.load(str(directory), mmap=False, show_progress=False)
        except Exception as error:  # noqa: BLE001
            raise RagopsError(f"{directory}: cannot read the BM25 index ({type(error).__name__}: {error})") from None
        return cls(bm25, stemmer_name=settings.get("stemmer"), stopwords=settings.get("stopwords", "en"), k1=settings["k1"], b=settings["b"])


def build_bm25(texts: Sequence[str], k1: float = 1.5, b: float = 0.75, progress: bool = False) -> BM25Index:
    """BM25 (Lucene variant) over `texts` (row i = chunk row i): lowercase, English stopwords,
    PyStemmer's English stemmer only when it happens to be installed."""
    import bm25s

    texts = list(texts)
    if not texts:
        raise RagopsError("index: cannot build a BM25 index over zero chunks")
    stemmer, stemmer_name = _available_stemmer()
    index = BM25Index(bm25s.BM25(k1=k1, b=b), stemmer_name=stemmer_name, k1=k1, b=b)
    index._stemmer = stemmer
    corpus_tokens = index.tokenize(texts, progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index.bm25.index(corpus_tokens, show_progress=progress)
    return index


# --- the index directory -------------------------------------------------------------------------
def chunk_ids_hash(chunk_ids: Sequence[str]) -> str:
    """Identity of the row order an index was built for."""
    return text_hash("\n".join(chunk_ids))


def build_index(
    vectors: np.ndarray,
    texts: Sequence[str],
    config: Any,
    *,
    encoder: str,
    fingerprint: str,
    chunk_ids: Sequence[str] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> tuple[faiss.Index, BM25Index, dict[str, Any]]:
    """Both indexes and their meta from an `IndexConfig` (factory, ef_search, nprobe, bm25.k1/b).

    `extra_meta` is merged in (the index stage passes corpus_hash and chunks_hash). The meta holds
    no timings: it is written into a DVC-hashed output, which must be identical for identical inputs.
    """
    dense = build_dense_index(vectors, config.factory, config.ef_search, config.nprobe)
    bm25 = build_bm25(texts, config.bm25.k1, config.bm25.b)
    meta = {
        "encoder": encoder,
        "fingerprint": fingerprint,
        "factory": config.factory,
        "ef_search": config.ef_search,
        "nprobe": config.nprobe,
        "bm25": {"k1": config.bm25.k1, "b": config.bm25.b, "stemmer": bm25.stemmer_name, "stopwords": bm25.stopwords},
        **({"chunk_ids_hash": chunk_ids_hash(chunk_ids)} if chunk_ids is not None else {}),
        **(extra_meta or {}),
    }
    return dense, bm25, meta


def write_index(index_dir: str | Path, dense: faiss.Index | None, bm25: BM25Index | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `dense.faiss`, `bm25/` and `meta.json` into `index_dir`, all or nothing.

    `meta` should carry encoder, fingerprint, factory, ef_search, nprobe, corpus_hash,
    chunks_hash and build_seconds; dim, count and format are added here. Returns the written meta.
    """
    if dense is None and bm25 is None:
        raise RagopsError("index: nothing to write (neither a dense nor a BM25 index)")
    if dense is not None and bm25 is not None and dense.ntotal != bm25.n_docs:
        raise RagopsError(f"index: dense index has {dense.ntotal} rows but BM25 has {bm25.n_docs}")
    meta = dict(meta)
    if dense is not None:
        if "dim" in meta and int(meta["dim"]) != dense.d:
            raise RagopsError(f"index: meta says dim {meta['dim']} but the dense index has dim {dense.d}")
        meta["dim"] = int(dense.d)
        meta["count"] = int(dense.ntotal)
    else:
        meta["count"] = bm25.n_docs
    meta["has_dense"] = dense is not None
    meta["has_bm25"] = bm25 is not None
    meta["format"] = INDEX_FORMAT
    with atomic_dir(index_dir) as tmp:
        if dense is not None:
            faiss.write_index(dense, str(tmp / DENSE_FILE))
        if bm25 is not None:
            bm25.save(tmp / BM25_DIR)
        write_json(tmp / META_FILE, meta)
    return meta


def load_index(
    index_dir: str | Path,
    encoder: Any | None = None,
    *,
    strict_fingerprint: bool = False,
) -> tuple[faiss.Index | None, BM25Index | None, dict[str, Any]]:
    """(dense, bm25, meta) from `index_dir`; search parameters re-applied from meta.

    With `encoder`, a dim mismatch is refused; a fingerprint mismatch (e.g. a fine-tuned query
    encoder over an index of the original one) is a warning, or an error with strict_fingerprint.
    """
    index_dir = Path(index_dir)
    meta_file = index_dir / META_FILE
    if not meta_file.exists():
        raise RagopsError(f"{index_dir}: no index here ({META_FILE} missing; run the 'index' stage)")
    try:
        meta = read_json(meta_file)
    except ValueError as error:
        raise RagopsError(f"{meta_file}: corrupt index meta ({error})") from None
    dense = bm25 = None
    if meta.get("has_dense", True):
        dense_file = index_dir / DENSE_FILE
        if not dense_file.exists():
            raise RagopsError(f"{dense_file}: missing (index is incomplete; rerun the 'index' stage)")
        try:
            dense = faiss.read_index(str(dense_file))
        except Exception as error:  # noqa: BLE001
            raise RagopsError(f"{dense_file}: cannot read FAISS index ({_faiss_reason(error)}); rerun the 'index' stage") from None
        if "count" in meta and dense.ntotal != int(meta["count"]):
            raise RagopsError(f"{dense_file}: {dense.ntotal} vectors but meta.json says {meta['count']}; rerun the 'index' stage")
        set_search_params(dense, meta.get("ef_search"), meta.get("nprobe"))
    if meta.get("has_bm25", True):
        bm25_dir = index_dir / BM25_DIR
        if not bm25_dir.is_dir():
            raise RagopsError(f"{bm25_dir}: missing (index is incomplete; rerun the 'index' stage)")
        bm25 = BM25Index.load(bm25_dir)
    if encoder is not None and dense is not None:
        check_encoder(meta, encoder, strict_fingerprint=strict_fingerprint, where=str(index_dir))
    return dense, bm25, meta


def check_encoder(meta: dict[str, Any], encoder: Any, *, strict_fingerprint: bool = False, where: str = "index") -> None:
    if "dim" in meta and int(meta["dim"]) != encoder.dim:
        raise RagopsError(
            f"{where}: index has dim {meta['dim']} (encoder '{meta.get('encoder')}') but the encoder '{encoder.spec}' has dim"
            f" {encoder.dim}; rebuild the index with this encoder"
        )
    # An index of a fine-tuned retriever with untied towers records its query tower separately.
    built_with = meta.get("query_fingerprint") or meta.get("fingerprint")
    if built_with and built_with != encoder.fingerprint:
        message = (
            f"{where}: index was built with encoder fingerprint {built_with} ('{meta.get('encoder')}'),"
            f" querying with {encoder.fingerprint} ('{encoder.spec}')"
        )
        if strict_fingerprint:
            raise RagopsError(message + "; rebuild the index")
        log.warning(message)
