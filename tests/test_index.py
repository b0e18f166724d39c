"""FAISS and BM25 indexes and the atomic index directory, on real MiniLM vectors of ~250 chunks."""

from __future__ import annotations


import faiss
import numpy as np
import pandas as pd
import pytest


from ragops.config import IndexConfig
from ragops.errors import RagopsError
from ragops.resources import default_corpus_file
from ragops.retrieval import index as index_module
from ragops.retrieval.embed import EmbeddingCache, Encoder, chunk_embedding_text, embed_texts
from ragops.retrieval.index import (
    BM25Index,
    build_bm25,
    build_dense_index,
    build_index,
    load_index,
    write_index,
)

from tests.retrieval_fixtures import FIXTURE_TITLES, chunks, corpus_entries, doc_id_of, encoder, fixture_chunks, texts, vectors  # noqa: F401


def recall_vs_flat(index, vectors, queries, k=10) -> float:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


def test_fixture_size(chunks):
    assert 150 <= len(chunks) <= 300
    assert chunks["doc_id"].nunique() == 120 and (chunks.groupby("doc_id").size() > 1).any()


@pytest.mark.parametrize(
    "factory, ef_search, nprobe, min_recall",
    [("Flat", None, None, 1.0), ("HNSW32", 64, None, 0.95), ("IVF8,Flat", None, 4, 0.85), ("IVF4,PQ16x4", None, 4, 0.3)],
)
def test_factories_build_and_recall(vectors, factory, ef_search, nprobe, min_recall):
    index = build_dense_index(vectors, factory, ef_search, nprobe)
    assert index.ntotal == len(vectors) and index.d == 384
    rng = np.random.default_rng(0)
    queries = vectors[rng.choice(len(vectors), 60, replace=False)] + rng.normal(0, 0.02, (60, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert recall_vs_flat(index, vectors, queries) >= min_recall


def test_search_parameters_are_applied(vectors):
    hnsw = build_dense_index(vectors, "HNSW32", ef_search=77, nprobe=5)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77
    ivf = build_dense_index(vectors, "IVF8,Flat", ef_search=77, nprobe=5)
    assert faiss.extract_index_ivf(ivf).nprobe == 5
    assert faiss.extract_index_ivf(build_dense_index(vectors, "IVF8,Flat", nprobe=100)).nprobe == 8  # clamped


@pytest.mark.parametrize("factory", ["HNSW-32", "Bogus", "IVF16,Flat,Nope"])
def test_bad_factory_is_one_line_error(vectors, factory):
    with pytest.raises(RagopsError) as info:
        build_dense_index(vectors, factory)
    message = str(info.value)
    assert "\n" not in message and "index.factory" in message and f"'{factory}'" in message


def test_too_few_vectors_to_train_is_one_line_error(vectors):
    with pytest.raises(RagopsError) as info:
        build_dense_index(vectors[:200], "IVF64,PQ16")
    message = str(info.value)
    assert "\n" not in message and "index.factory" in message and "256" in message and "only 200" in message


def test_bm25_different_queries_give_different_results(texts):
    bm25 = build_bm25(texts)
    queries = ["Who painted the Mona Lisa?", "black hole gravity", "chess pieces board game", "photosynthesis in plants"]
    rows, scores = bm25.search(queries, 5)
    tops = [tuple(r) for r in rows]
    assert len(set(tops)) == len(queries)  # the bm25s "same results for every query" bug would collapse these
    assert np.all(np.diff(scores, axis=1)[np.isfinite(scores[:, 1:])] <= 0)
    assert "mona" in texts[rows[0][0]].lower()
    # Words outside the vocabulary give no hits rather than arbitrary ones.
    none_rows, none_scores = bm25.search(["zzzxq qqqzz"], 3)
    assert (none_rows == -1).all() and np.isneginf(none_scores).all()


def test_write_and_load_roundtrip(tmp_path, vectors, texts, chunks, encoder):
    config = IndexConfig(factory="HNSW32", ef_search=48, nprobe=4)
    dense, bm25, meta = build_index(
        vectors, texts, config, encoder="default", fingerprint=encoder.fingerprint, chunk_ids=chunks["chunk_id"].tolist(),
        extra_meta={"corpus_hash": "c" * 8, "chunks_hash": "h" * 8},
    )
    written = write_index(tmp_path / "index", dense, bm25, meta)
    assert {p.name for p in (tmp_path / "index").iterdir()} == {"dense.faiss", "bm25", "meta.json"}
    dense2, bm252, meta2 = load_index(tmp_path / "index", encoder)
    assert meta2 == written
    for key in ("encoder", "fingerprint", "dim", "count", "factory", "ef_search", "nprobe", "corpus_hash", "chunks_hash"):
        assert key in meta2, key
    assert (meta2["dim"], meta2["count"], meta2["factory"]) == (384, len(chunks), "HNSW32")
    assert faiss.downcast_index(dense2).hnsw.efSearch == 48
    np.testing.assert_array_equal(dense.search(vectors[:5], 5)[1], dense2.search(vectors[:5], 5)[1])
    queries = ["theory of general relativity", "Italian Renaissance painter"]
    np.testing.assert_array_equal(bm25.search(queries, 5)[0], bm252.search(queries, 5)[0])


def test_atomic_write_keeps_the_old_index_on_failure(tmp_path, vectors, texts, monkeypatch):
    target = tmp_path / "index"
    write_index(target, build_dense_index(vectors, "Flat"), build_bm25(texts), {"factory": "Flat"})
    before = (target / "meta.json").read_text()

    def broken_save(self, directory):
        raise OSError("disk full while writing bm25")

    monkeypatch.setattr(BM25Index, "save", broken_save)
    with pytest.raises(OSError):
        write_index(target, build_dense_index(vectors, "HNSW32"), build_bm25(texts[:-1] + ["x"]), {"factory": "HNSW32"})
    monkeypatch.undo()
    assert (target / "meta.json").read_text() == before
    dense, bm25, meta = load_index(target)
    assert meta["factory"] == "Flat" and dense.ntotal == len(vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary directory left


def test_load_errors_are_clear(tmp_path, vectors, texts):
    with pytest.raises(RagopsError, match="no index here"):
        load_index(tmp_path / "missing")
    target = tmp_path / "index"
    write_index(target, build_dense_index(vectors, "Flat"), build_bm25(texts), {"factory": "Flat"})
    (target / "dense.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(RagopsError) as info:
        load_index(target)
    assert "\n" not in str(info.value) and "dense.faiss" in str(info.value)


def test_dim_mismatch_with_encoder_is_refused(tmp_path, encoder, texts):
    rng = np.random.default_rng(1)
    small = rng.normal(size=(len(texts), 32)).astype(np.float32)
    write_index(tmp_path / "index", build_dense_index(small, "Flat"), build_bm25(texts), {"encoder": "other", "factory": "Flat"})
    with pytest.raises(RagopsError, match="dim 32.*dim 384"):
        load_index(tmp_path / "index", encoder)


def test_mismatched_sizes_are_refused(tmp_path, vectors, texts):
    with pytest.raises(RagopsError, match="rows"):
        write_index(tmp_path / "index", build_dense_index(vectors, "Flat"), build_bm25(texts[:10]), {})
    assert not (tmp_path / "index").exists()
