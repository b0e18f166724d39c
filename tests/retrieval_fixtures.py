"""Shared retrieval fixtures: a chunks table from named articles of the packaged corpus, the real
MiniLM encoder and its vectors (module-scoped in each test module that imports them)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from ragops.resources import default_corpus_file
from ragops.retrieval.embed import EmbeddingCache, Encoder, chunk_embedding_text, embed_texts

FIXTURE_TITLES = [
    "Mona Lisa", "Leonardo da Vinci", "General relativity", "Albert Einstein", "Isaac Newton", "Photosynthesis",
    "The Starry Night", "Vincent van Gogh", "Pablo Picasso", "Michelangelo", "Paris", "Louvre", "Jupiter", "Moon",
    "DNA", "Black hole", "Water", "Chess",
]


def corpus_entries() -> dict:
    data = json.loads(default_corpus_file().read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {e["title"]: e for e in data}


def doc_id_of(title: str) -> str:
    return "wiki:" + hashlib.sha1(title.encode()).hexdigest()[:16]


def fixture_chunks(n_docs: int = 120, words: int = 50) -> pd.DataFrame:
    """A chunks.parquet-shaped table (docs/contracts.md) from the packaged corpus: named articles first."""
    entries = corpus_entries()
    titles = [t for t in FIXTURE_TITLES if t in entries]
    titles += [t for t in entries if t not in titles][: n_docs - len(titles)]
    rows = []
    for title in titles:
        tokens = entries[title]["extract"].split()
        for position, start in enumerate(range(0, len(tokens), words)):
            piece = tokens[start : start + words]
            rows.append(
                {"chunk_id": f"{doc_id_of(title)}#{position:04d}", "doc_id": doc_id_of(title), "position": position,
                 "title": title, "text": " ".join(piece), "n_tokens": len(piece)}
            )
    return pd.DataFrame(rows).sort_values("chunk_id", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load("default", device="cpu")


@pytest.fixture(scope="module")
def chunks() -> pd.DataFrame:
    return fixture_chunks()


@pytest.fixture(scope="module")
def texts(chunks) -> list[str]:
    return [chunk_embedding_text(t, x) for t, x in zip(chunks["title"], chunks["text"])]


@pytest.fixture(scope="module")
def vectors(encoder, texts, tmp_path_factory) -> np.ndarray:
    cache = EmbeddingCache(tmp_path_factory.getbasetemp() / "shared-embedding-cache", encoder.fingerprint)
    return embed_texts(texts, encoder, cache, progress=False)[0]
