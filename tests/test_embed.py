"""Encoder, embedding cache and sharded embedding, with the real packaged MiniLM (no mocks)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ragops.errors import RagopsError
from ragops.resources import default_corpus_file
from ragops.retrieval import embed as embed_module
from ragops.retrieval.embed import (
    EmbeddingCache,
    Encoder,
    chunk_embedding_text,
    embed_texts,
    shard_ranges,
    text_key,
)


def corpus_texts(n: int) -> list[str]:
    data = json.loads(default_corpus_file().read_text(encoding="utf-8"))
    entries = list(data.values()) if isinstance(data, dict) else data
    return [chunk_embedding_text(e["title"], " ".join(e["extract"].split()[:60])) for e in entries[:n]]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load("default", device="cpu")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts(48)


def test_chunk_embedding_text():
    assert chunk_embedding_text("Mona Lisa", "A portrait.") == "Mona Lisa\nA portrait."
    assert chunk_embedding_text("", "Only text") == "Only text"


def test_vectors_are_normalised_float32_in_input_order(encoder, texts):
    vectors = encoder.encode(texts, progress=False)
    assert vectors.shape == (len(texts), encoder.dim) == (len(texts), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Sorting by length inside the batching must not scramble rows: compare with one-by-one encodes.
    for i in (0, 7, len(texts) - 1):
        single = encoder.encode([texts[i]], progress=False)[0]
        np.testing.assert_allclose(vectors[i], single, atol=1e-5)
    assert encoder.encode([], progress=False).shape == (0, 384)


def test_encoder_exposes_tokenizer_and_model(encoder):
    assert encoder.tokenizer("hello world")["input_ids"]
    assert encoder.model.max_seq_length == encoder.max_seq_length == 256


def test_fingerprint_is_stable_and_tracks_weights_and_settings(encoder):
    again = Encoder.load("default", device="cpu", max_seq_length=128)
    assert len(encoder.fingerprint) == 32
    assert again.fingerprint != encoder.fingerprint  # max_seq_length is part of it
    again.model.max_seq_length = 256
    assert again.refresh_fingerprint() == encoder.fingerprint  # same weights + settings
    import torch

    with torch.no_grad():
        next(again.model.parameters()).add_(1e-3)  # "fine-tuning"
    assert again.refresh_fingerprint() != encoder.fingerprint


def test_cache_avoids_recompute_and_matches_uncached(encoder, texts, tmp_path):
    uncached, stats = embed_texts(texts, encoder, None, progress=False)
    assert stats["computed"] == len(texts) and stats["cached"] == 0

    cache = EmbeddingCache(tmp_path, encoder.fingerprint)
    first, stats = embed_texts(texts, encoder, cache, progress=False)
    assert (stats["total"], stats["cached"], stats["computed"]) == (len(texts), 0, len(texts))
    assert np.array_equal(first, uncached)  # same blocks, same batches: bit-identical

    reopened = EmbeddingCache(tmp_path, encoder.fingerprint)  # a later process
    assert len(reopened) == len(texts)
    second, stats = embed_texts(texts, encoder, reopened, progress=False)
    assert (stats["cached"], stats["computed"]) == (len(texts), 0)
    assert np.array_equal(second, uncached)

    edited = list(texts)
    edited[5] = edited[5] + " Edited."
    edited.append("A brand new document about violins.")
    third, stats = embed_texts(edited, encoder, reopened, progress=False)
    assert (stats["cached"], stats["computed"]) == (len(texts) - 1, 2)
    keep = [i for i in range(len(texts)) if i != 5]
    assert np.array_equal(third[keep], uncached[keep])
    fresh = encoder.encode([edited[5], edited[-1]], progress=False)
    np.testing.assert_allclose(third[[5, -1]], fresh, atol=1e-5)
    assert set(stats) >= {"total", "cached", "computed", "seconds", "texts_per_s"}


def test_duplicate_texts_are_computed_once(encoder, texts, tmp_path):
    doubled = texts[:4] + texts[:4]
    vectors, stats = embed_texts(doubled, encoder, EmbeddingCache(tmp_path, encoder.fingerprint), progress=False)
    assert stats["computed"] == 4
    assert np.array_equal(vectors[:4], vectors[4:])


def test_cache_refuses_other_encoder(encoder, texts, tmp_path):
    with pytest.raises(RagopsError, match="belongs to encoder"):
        embed_texts(texts[:2], encoder, EmbeddingCache(tmp_path, "0" * 32), progress=False)


def test_cache_survives_crash_mid_write(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path, "fp")
    cache.put_many(["a", "b"], np.eye(2, 4, dtype=np.float32))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # The vectors file is written, then the process dies before the keys file (the commit marker).
    monkeypatch.setattr(embed_module, "atomic_file", crash)
    with pytest.raises(OSError):
        cache.put_many(["c"], np.ones((1, 4), dtype=np.float32))
    monkeypatch.undo()
    # A torn shard from another writer: keys and vectors disagree.
    (tmp_path / "fp" / "torn.keys").write_text("x\ny\n", encoding="ascii")
    np.save(tmp_path / "fp" / "torn.npy", np.ones((1, 4), dtype=np.float32))

    reopened = EmbeddingCache(tmp_path, "fp")
    assert len(reopened) == 2 and "c" not in reopened and "x" not in reopened
    np.testing.assert_array_equal(reopened.get("b"), np.eye(2, 4, dtype=np.float32)[1])
    assert not list((tmp_path / "fp").glob(".*tmp*"))  # no temporary files left behind


def test_concurrent_reader_sees_new_shards_after_refresh(tmp_path):
    writer = EmbeddingCache(tmp_path, "fp")
    reader = EmbeddingCache(tmp_path, "fp")
    writer.put_many([text_key("one"), text_key("two")], np.ones((2, 3), dtype=np.float32))
    assert len(reader) == 0
    assert reader.refresh() == 2 and text_key("two") in reader
    assert writer.compact() == 2 and len(list((tmp_path / "fp").glob("*.keys"))) == 1
    assert len(EmbeddingCache(tmp_path, "fp")) == 2


def test_shard_ranges_cover_and_align():
    assert shard_ranges(10, 3, block_size=2) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(3, 5, block_size=2) == [(0, 2), (2, 3)]
    assert shard_ranges(0, 4) == []
    for n, shards, block in [(1000, 3, 64), (7, 7, 1), (1025, 2, 1024)]:
        ranges = shard_ranges(n, shards, block)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % block == 0 for start, _ in ranges)


def test_sharded_embedding_equals_one_shot(encoder, texts):
    one_shot, _ = embed_texts(texts, encoder, None, progress=False, block_size=16)
    parts = [
        embed_texts(texts[start:end], encoder, None, progress=False, block_size=16)[0]
        for start, end in shard_ranges(len(texts), 2, block_size=16)
    ]
    assert np.array_equal(np.concatenate(parts), one_shot)
