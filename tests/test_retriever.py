"""Dense, BM25 and hybrid retrievers, workspace loading and retrieval evaluation (real MiniLM, FAISS, bm25s)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console


from ragops.config import Config
from ragops.errors import RagopsError
from ragops.paths import Workspace
from ragops.resources import default_corpus_file
from ragops.retrieval.embed import EmbeddingCache, Encoder, chunk_embedding_text, embed_texts
from ragops.retrieval.evaluate import evaluate_retrievers, retrieval_table
from ragops.retrieval.index import build_bm25, build_index, write_index
from ragops.retrieval.retriever import (
    BM25Retriever,
    DenseRetriever,
    HybridRetriever,
    Retriever,
    SearchResult,
    clear_cache,
    load_retriever,
)

from tests.retrieval_fixtures import FIXTURE_TITLES, chunks, corpus_entries, doc_id_of, encoder, fixture_chunks, texts, vectors  # noqa: F401


@pytest.fixture(scope="module")
def dense(encoder, vectors, chunks) -> DenseRetriever:
    return DenseRetriever.from_vectors(encoder, vectors, chunks, factory="HNSW32", ef_search=64)


@pytest.fixture(scope="module")
def bm25(texts, chunks) -> BM25Retriever:
    return BM25Retriever(build_bm25(texts), chunks)


@pytest.fixture(scope="module")
def hybrid(dense, bm25) -> HybridRetriever:
    return HybridRetriever([dense, bm25], rrf_k=60)


MONA = doc_id_of("Mona Lisa")


def test_retrievers_follow_the_protocol(dense, bm25, hybrid):
    for retriever, name in ((dense, "dense"), (bm25, "bm25"), (hybrid, "hybrid")):
        assert isinstance(retriever, Retriever) and retriever.name == name


@pytest.mark.parametrize("which", ["dense", "bm25", "hybrid"])
def test_mona_lisa_sanity_query(which, request):
    retriever = request.getfixturevalue(which)
    result = retriever.search(["Who painted the Mona Lisa?"], 5)
    assert MONA in result.doc_ids[0][:3]
    assert any(text.startswith("Mona Lisa\n") for text in result.texts[0])


def test_dense_finds_relativity(dense):
    result = dense.search(["theory of general relativity"], 3)
    assert result.doc_ids[0][0] == doc_id_of("General relativity")


def test_search_result_shape_and_order(dense, chunks):
    queries = ["Who painted the Mona Lisa?", "largest planet in the solar system", "DNA double helix"]
    result = dense.search(queries, 7)
    assert isinstance(result, SearchResult) and len(result) == 3
    assert result.scores.shape == (3, 7) and result.scores.dtype == np.float32
    assert all(len(ids) == 7 for ids in result.chunk_ids)
    assert np.all(np.diff(result.scores, axis=1) <= 1e-6)
    by_id = chunks.set_index("chunk_id")
    for ids, docs, texts in zip(result.chunk_ids, result.doc_ids, result.texts):
        for chunk_id, doc_id, text in zip(ids, docs, texts):
            row = by_id.loc[chunk_id]
            assert row["doc_id"] == doc_id and text == f"{row['title']}\n{row['text']}"
    assert result.doc_ids[1][0] == doc_id_of("Jupiter")


def test_bm25_two_different_queries_give_different_top_k(bm25):
    result = bm25.search(["Who painted the Mona Lisa?", "black hole event horizon gravity"], 5)
    assert result.chunk_ids[0] != result.chunk_ids[1]
    assert result.doc_ids[1][0] == doc_id_of("Black hole")


def test_hybrid_is_reciprocal_rank_fusion(dense, bm25, hybrid):
    query = ["Renaissance painter of the Mona Lisa and the Last Supper"]
    fused = hybrid.search(query, 10)
    depth = max(10 * 4, 50)
    expected: dict[str, float] = {}
    for sub in (dense.search(query, depth), bm25.search(query, depth)):
        for rank, chunk in enumerate(sub.chunk_ids[0], start=1):
            expected[chunk] = expected.get(chunk, 0.0) + 1 / (60 + rank)
    best = sorted(expected.items(), key=lambda item: -item[1])[:10]
    assert fused.chunk_ids[0] == [c for c, _ in best]
    np.testing.assert_allclose(fused.scores[0], [s for _, s in best], rtol=1e-6)
    assert fused.scores[0][0] > 1 / 61  # found by both retrievers
    assert fused.rows is not None and (fused.rows[0] >= 0).all()


@pytest.mark.parametrize("which", ["dense", "bm25", "hybrid"])
def test_exclude_doc_ids_filters_but_keeps_k(which, request, chunks):
    retriever = request.getfixturevalue(which)
    leo = doc_id_of("Leonardo da Vinci")
    queries = ["Who painted the Mona Lisa?", "Leonardo da Vinci Mona Lisa painting"]
    result = retriever.search(queries, 10, exclude_doc_ids=[{MONA}, {MONA, leo}])
    assert MONA not in result.doc_ids[0]
    assert MONA not in result.doc_ids[1] and leo not in result.doc_ids[1]
    assert [len(ids) for ids in result.chunk_ids] == [10, 10]
    unfiltered = retriever.search(queries, 10)
    assert MONA in unfiltered.doc_ids[0]


def test_dense_exclusion_holds_when_excluded_chunks_fill_the_top(encoder, vectors, chunks):
    flat = DenseRetriever.from_vectors(encoder, vectors, chunks, factory="Flat")
    query = ["Mona Lisa portrait Louvre"]
    top_docs = flat.search(query, 10).doc_ids[0]
    exclude = set(top_docs[:6])
    result = flat.search(query, 10, exclude_doc_ids=[exclude])
    assert len(result.chunk_ids[0]) == 10 and not exclude & set(result.doc_ids[0])


def test_k_larger_than_corpus_pads(bm25, encoder, vectors, chunks):
    small = DenseRetriever.from_vectors(encoder, vectors[:5], chunks.iloc[:5], factory="Flat")
    result = small.search(["anything"], 8)
    assert len(result.chunk_ids[0]) == 5
    assert np.isneginf(result.scores[0, 5:]).all() and np.isfinite(result.scores[0, :5]).all()
    assert (result.rows[0, 5:] == -1).all()
    sparse = bm25.search(["Mona Lisa"], 50)
    assert 0 < len(sparse.chunk_ids[0]) < 50 and np.isneginf(sparse.scores[0, len(sparse.chunk_ids[0]):]).all()


def test_calls_are_counted(texts, chunks):
    retriever = BM25Retriever(build_bm25(texts), chunks)
    retriever.search(["a", "b", "c"], 3)
    retriever.search(["d"], 3)
    assert (retriever.calls, retriever.queries) == (2, 4)
    assert retriever.counters()["seconds"] > 0


def test_search_vectors_matches_search(dense, encoder):
    query = ["Dutch post-impressionist painter"]
    by_text = dense.search(query, 5)
    by_vector = dense.search_vectors(encoder.encode(query, progress=False), 5)
    assert by_text.chunk_ids == by_vector.chunk_ids


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, chunks, texts, vectors, encoder) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    ws.chunks.parent.mkdir(parents=True)
    chunks.to_parquet(ws.chunks, index=False)
    config = Config()
    dense, bm25, meta = build_index(
        vectors, texts, config.index, encoder=config.embed.model, fingerprint=encoder.fingerprint,
        chunk_ids=chunks["chunk_id"].tolist(),
    )
    write_index(ws.index_dir, dense, bm25, meta)
    return ws


def test_load_retriever_from_workspace(workspace, encoder):
    clear_cache()
    config = Config()
    dense = load_retriever(workspace, config, "dense", encoder=encoder)
    again = load_retriever(workspace, config, "dense", encoder=encoder)
    assert dense is not again and dense.index is again.index  # own counters, shared index
    assert dense.table is again.table
    bm25 = load_retriever(workspace, config, "bm25")
    hybrid = load_retriever(workspace, config, "hybrid", encoder=encoder)
    for retriever in (dense, bm25, hybrid):
        assert MONA in retriever.search(["Who painted the Mona Lisa?"], 5).doc_ids[0]
    with pytest.raises(RagopsError, match="unknown retriever"):
        load_retriever(workspace, config, "splade")


def test_load_retriever_refuses_stale_index(workspace, chunks, encoder, tmp_path):
    stale = Workspace(tmp_path)
    stale.chunks.parent.mkdir(parents=True)
    chunks.iloc[:-1].to_parquet(stale.chunks, index=False)
    import shutil

    shutil.copytree(workspace.index_dir, stale.index_dir)
    with pytest.raises(RagopsError, match="rerun the 'index' stage"):
        load_retriever(stale, Config(), "bm25")


def fixture_questions() -> pd.DataFrame:
    entries = corpus_entries()
    rows = []
    for i, title in enumerate(FIXTURE_TITLES):
        split = "dev" if i % 2 == 0 else "test"
        rows.append({"qid": f"d{i}", "task": "describe", "split": split, "question": f"Tell me about {title}.",
                     "answer": "", "gold_doc_id": doc_id_of(title)})
        rows.append({"qid": f"i{i}", "task": "identify", "split": split,
                     "question": " ".join(entries[title]["extract"].split()[3:20]), "answer": title,
                     "gold_doc_id": doc_id_of(title)})
    rows.append({"qid": "t0", "task": "describe", "split": "train", "question": "Tell me about Paris.", "answer": "",
                 "gold_doc_id": doc_id_of("Paris")})
    return pd.DataFrame(rows)


def test_evaluate_retrievers(dense, bm25, hybrid):
    questions = fixture_questions()
    metrics, per_question = evaluate_retrievers(
        questions, {"dense": dense, "bm25": bm25, "hybrid": hybrid}, ["dev", "test"], [1, 5, 10], progress=False
    )
    for split in ("dev", "test"):
        for name in ("dense", "bm25", "hybrid"):
            for metric in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10"):
                assert 0.0 <= metrics[f"{split}/{name}/{metric}"] <= 1.0
            assert metrics[f"{split}/{name}/recall_at_1"] <= metrics[f"{split}/{name}/recall_at_5"] <= metrics[f"{split}/{name}/recall_at_10"]
            assert metrics[f"{split}/{name}/latency_ms"] > 0
            assert f"{split}/{name}/identify/recall_at_10" in metrics
        assert metrics[f"{split}/dense/describe/recall_at_5"] >= 0.75  # "Tell me about <title>"
    assert not any(key.startswith("train/") for key in metrics)
    assert len(per_question) == 3 * 36
    assert list(per_question.columns) == ["qid", "split", "task", "retriever", "gold_doc_id", "retrieved_doc_ids", "gold_rank"]
    assert all(len(set(docs)) == len(docs) <= 10 for docs in per_question["retrieved_doc_ids"])
    dense_rows = per_question[per_question["retriever"] == "dense"]
    assert all(len(docs) == 10 for docs in dense_rows["retrieved_doc_ids"])  # 3x over-fetch fills 10 documents
    hits = per_question[per_question["gold_rank"] > 0]
    assert all(docs[rank - 1] == gold for docs, rank, gold in zip(hits["retrieved_doc_ids"], hits["gold_rank"], hits["gold_doc_id"]))
    dev_dense = per_question[(per_question["split"] == "dev") & (per_question["retriever"] == "dense")]
    assert metrics["dev/dense/recall_at_5"] == pytest.approx(((dev_dense["gold_rank"] > 0) & (dev_dense["gold_rank"] <= 5)).mean())

    limited, frame = evaluate_retrievers(questions, {"bm25": bm25}, ["dev"], [1, 10], max_questions=2, progress=False)
    assert limited["dev/bm25/n_questions"] == 4 and len(frame) == 4

    console = Console(file=io.StringIO(), width=140)
    console.print(retrieval_table(metrics))
    rendered = console.file.getvalue()
    assert "R@5" in rendered and "MRR@10" in rendered and "hybrid" in rendered and "ms/query" in rendered
