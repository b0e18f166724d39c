"""Throughput of ragops' `embed_texts` (cold cache) vs a bare `SentenceTransformer.encode`.

Both embed the same ~1,000 corpus chunks with the same model object (the packaged
all-MiniLM-L6-v2), batch size 64, normalised. To cancel drift on a shared machine the texts are
processed in blocks, alternating which contender goes first (ABBA). Writes
benchmarks/results/embedding.json and benchmarks/results/embedding.md (one markdown line).

    .venv/bin/python benchmarks/bench_embedding.py [--n 1000] [--block 250] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ragops.env import configure_environment  # offline hub, telemetry off: the same settings as the CLI

configure_environment(Path(__file__).resolve().parents[1])

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragops.io import write_json  # noqa: E402
from ragops.resources import default_corpus_file  # noqa: E402
from ragops.retrieval.embed import EmbeddingCache, Encoder, chunk_embedding_text, embed_texts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def corpus_chunks(n: int, words: int = 96, seed: int = 0) -> list[str]:
    """n random ~128-token chunks (96-word windows) of the packaged corpus, as embedded by ragops."""
    data = json.loads(default_corpus_file().read_text(encoding="utf-8"))
    entries = list(data.values()) if isinstance(data, dict) else data
    chunks = []
    for entry in entries:
        tokens = entry["extract"].split()
        for start in range(0, len(tokens), words):
            chunks.append(chunk_embedding_text(entry["title"], " ".join(tokens[start : start + words])))
    return random.Random(seed).sample(chunks, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    texts = corpus_chunks(args.n)
    encoder = Encoder.load("default", device=args.device, threads=args.threads, batch_size=args.batch_size)
    model = encoder.model
    _ = encoder.fingerprint  # computed once, outside the timings (cached on the encoder)
    model.encode(texts[:16], batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)  # warm-up

    bare_seconds = ours_seconds = bare_cpu = ours_cpu = 0.0
    bare_vectors, our_vectors = [], []
    with tempfile.TemporaryDirectory(prefix="bench-embed-cache-") as cache_root:
        cache = EmbeddingCache(cache_root, encoder.fingerprint)  # cold: nothing cached yet
        for number, start in enumerate(range(0, len(texts), args.block)):
            block = texts[start : start + args.block]

            def bare() -> tuple[float, float]:
                wall, cpu = time.perf_counter(), time.process_time()
                bare_vectors.append(
                    model.encode(block, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)
                )
                return time.perf_counter() - wall, time.process_time() - cpu

            def ours() -> tuple[float, float]:
                wall, cpu = time.perf_counter(), time.process_time()
                vectors, stats = embed_texts(block, encoder, cache, progress=False)
                assert stats["computed"] == len(block), stats
                our_vectors.append(vectors)
                return time.perf_counter() - wall, time.process_time() - cpu

            for contender in ((bare, ours) if number % 2 == 0 else (ours, bare)):
                wall, cpu = contender()
                if contender is bare:
                    bare_seconds, bare_cpu = bare_seconds + wall, bare_cpu + cpu
                else:
                    ours_seconds, ours_cpu = ours_seconds + wall, ours_cpu + cpu

    diff = float(np.abs(np.concatenate(bare_vectors) - np.concatenate(our_vectors)).max())
    result = {
        "n_texts": len(texts),
        "block": args.block,
        "batch_size": args.batch_size,
        "device": encoder.device,
        "torch_threads": __import__("torch").get_num_threads(),
        "bare_seconds": round(bare_seconds, 2),
        "ours_seconds": round(ours_seconds, 2),
        "bare_texts_per_s": round(len(texts) / bare_seconds, 2),
        "ours_texts_per_s": round(len(texts) / ours_seconds, 2),
        "ratio": round(bare_seconds / ours_seconds, 3),  # throughput ratio ours / bare, wall clock
        "bare_cpu_seconds": round(bare_cpu, 2),
        "ours_cpu_seconds": round(ours_cpu, 2),
        "cpu_ratio": round(bare_cpu / ours_cpu, 3),  # same, in process CPU time (less sensitive to other load)
        "target_ratio": 0.9,
        "max_abs_diff": diff,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "cpu": platform.processor() or platform.machine(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "embedding.json", result)
    line = (
        f"| {result['n_texts']} chunks | bare `SentenceTransformer.encode` {result['bare_texts_per_s']} texts/s"
        f" | `embed_texts` (cold cache) {result['ours_texts_per_s']} texts/s | ratio **{result['ratio']}** wall, {result['cpu_ratio']} CPU time (target ≥ 0.9)"
        f" | max abs diff {diff:.1e} | {result['device']}, {result['torch_threads']} threads |"
    )
    (RESULTS / "embedding.md").write_text(line + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(line)


if __name__ == "__main__":
    main()
