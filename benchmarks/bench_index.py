"""FAISS index trade-offs on real MiniLM embeddings of ~3,000 corpus chunks.

For Flat, HNSW32 (efSearch 16/64/128), IVF64,Flat (nprobe 1/8/16) and IVF64,PQ16 (nprobe 8/16):
build seconds, µs/query (batched and one query at a time) and recall@10 against Flat. Queries are
the Wikipedia short descriptions ("Italian Renaissance painter") of 500 articles, embedded with
the same encoder. Embeddings are cached in .cache/ragops/embeddings (the pipeline's embedding
cache), so reruns only time the indexes. Writes benchmarks/results/index.json and
benchmarks/results/index_tradeoff.png.

    .venv/bin/python benchmarks/bench_index.py [--n 3000] [--queries 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ragops.env import configure_environment  # offline hub, telemetry off: the same settings as the CLI

configure_environment(Path(__file__).resolve().parents[1])

import faiss  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragops.io import write_json  # noqa: E402
from ragops.paths import Workspace  # noqa: E402
from ragops.resources import default_corpus_file  # noqa: E402
from ragops.retrieval.embed import EmbeddingCache, Encoder, chunk_embedding_text, embed_texts  # noqa: E402
from ragops.retrieval.index import build_dense_index, set_search_params  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = [
    ("Flat", [{}]),
    ("HNSW32", [{"ef_search": 16}, {"ef_search": 64}, {"ef_search": 128}]),
    ("IVF64,Flat", [{"nprobe": 1}, {"nprobe": 8}, {"nprobe": 16}]),
    ("IVF64,PQ16", [{"nprobe": 8}, {"nprobe": 16}]),
]


def corpus_sample(n: int, n_queries: int, words: int = 96, seed: int = 0) -> tuple[list[str], list[str]]:
    data = json.loads(default_corpus_file().read_text(encoding="utf-8"))
    entries = list(data.values()) if isinstance(data, dict) else data
    chunks = []
    for entry in entries:
        tokens = entry["extract"].split()
        for start in range(0, len(tokens), words):
            chunks.append(chunk_embedding_text(entry["title"], " ".join(tokens[start : start + words])))
    rng = random.Random(seed)
    described = [e["description"] for e in entries if e.get("description")]
    return rng.sample(chunks, n), rng.sample(described, n_queries)


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, float, np.ndarray]:
    """(best batched µs/query, best single-query µs/query, ids)."""
    batched, single = [], []
    ids = None
    for _ in range(repeats):
        began = time.perf_counter()
        _, ids = index.search(queries, k)
        batched.append((time.perf_counter() - began) / len(queries))
        subset = queries[:100]
        began = time.perf_counter()
        for row in range(len(subset)):
            index.search(subset[row : row + 1], k)
        single.append((time.perf_counter() - began) / len(subset))
    return 1e6 * min(batched), 1e6 * min(single), ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for factory in dict.fromkeys(row["factory"] for row in rows):
        points = [row for row in rows if row["factory"] == factory]
        ax.plot([p["us_per_query"] for p in points], [p["recall_at_10"] for p in points], marker="o", label=factory)
        for p in points:
            label = ", ".join(f"{key}={value}" for key, value in p["params"].items())
            if label:
                ax.annotate(label, (p["us_per_query"], p["recall_at_10"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("µs per query (batched, k=10, log scale)")
    ax.set_ylabel("recall@10 vs Flat")
    n = rows[0]["n_vectors"]
    ax.set_title(f"FAISS trade-off: {n} MiniLM chunk vectors, {rows[0]['n_queries']} queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    chunks, descriptions = corpus_sample(args.n, args.queries)
    encoder = Encoder.load("default", device="cpu", threads=args.threads)
    cache = EmbeddingCache(Workspace(ROOT).embedding_cache, encoder.fingerprint)
    vectors, chunk_stats = embed_texts(chunks, encoder, cache)
    queries, query_stats = embed_texts(descriptions, encoder, cache)
    print(f"embeddings: chunks {chunk_stats}, queries {query_stats}")

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 10)

    rows = []
    for factory, settings in CONFIGS:
        began = time.perf_counter()
        index = build_dense_index(vectors, factory, ef_search=None, nprobe=None)
        build_seconds = time.perf_counter() - began
        for params in settings:
            set_search_params(index, params.get("ef_search"), params.get("nprobe"))
            batched, single, ids = timed_search(index, queries, 10, args.repeats)
            row = {
                "factory": factory,
                "params": params,
                "n_vectors": len(vectors),
                "n_queries": len(queries),
                "build_seconds": round(build_seconds, 3),
                "us_per_query": round(batched, 1),
                "us_per_query_single": round(single, 1),
                "recall_at_10": round(recall(ids, truth), 4),
            }
            rows.append(row)
            print(row)

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(
        RESULTS / "index.json",
        {
            "encoder": "default (all-MiniLM-L6-v2)",
            "fingerprint": encoder.fingerprint,
            "faiss": faiss.__version__,
            "omp_threads": faiss.omp_get_max_threads(),
            "k": 10,
            "embedding": {"chunks": chunk_stats, "queries": query_stats},
            "loadavg": os.getloadavg()[0],
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "results": rows,
        },
    )
    plot(rows, RESULTS / "index_tradeoff.png")
    print("| factory | params | build s | µs/query (batched) | µs/query (one at a time) | recall@10 vs Flat |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        print(
            f"| {row['factory']} | {params} | {row['build_seconds']:.3f} | {row['us_per_query']:.1f} |"
            f" {row['us_per_query_single']:.1f} | {row['recall_at_10']:.3f} |"
        )


if __name__ == "__main__":
    main()
