"""Embedding fan-out: warm the content-addressed embedding cache in shards, in parallel.

With `orchestration.embed_shards > 1` the refresh flow splits the chunks into block-aligned row
ranges (`ragops.retrieval.embed.shard_ranges`) and runs `embed_shard` on each, on the task runner
(Dask worker processes). Each shard embeds its rows with the same block layout as a one-shot run
and writes them to the shared cache. The ordinary `embed` stage then runs as usual: every vector
is a cache hit, and it writes `artifacts/embeddings/` and its manifest exactly as a
single-process run would (same vectors: the block boundaries and batching are the same).
"""

from __future__ import annotations

from typing import Any

from ragops.ops.orchestration import load


def embed_up_to_date(ws, config) -> bool:
    """True when the `embed` stage would skip itself (its manifest matches chunks + parameters)."""
    from ragops import stages

    return stages.up_to_date("embed", ws, config)


def embed_plan(workspace: str, params: str | None, profile: str | None, block_size: int | None = None) -> list[tuple[int, int]]:
    """Row ranges to embed in parallel; empty when there is nothing to fan out (one shard
    configured, too few chunks for two blocks, or embeddings already up to date)."""
    import pyarrow.parquet as pq

    from ragops.retrieval.embed import DEFAULT_BLOCK_SIZE, shard_ranges

    ws, config = load(workspace, params, profile)
    shards = config.orchestration.embed_shards
    if shards <= 1 or not ws.chunks.exists() or embed_up_to_date(ws, config):
        return []
    n = pq.ParquetFile(ws.chunks).metadata.num_rows
    ranges = shard_ranges(n, shards, block_size or DEFAULT_BLOCK_SIZE)
    return ranges if len(ranges) > 1 else []


def embed_shard(
    workspace: str, params: str | None, profile: str | None, start: int, end: int, parent_run_id: str | None = None,
    tracking_uri: str | None = None, block_size: int | None = None,
) -> dict[str, Any]:
    """Embed chunk rows [start, end) into the embedding cache (an MLflow child run meters it)."""
    import pandas as pd

    from ragops.retrieval.embed import DEFAULT_BLOCK_SIZE, EmbeddingCache, Encoder, chunk_embedding_text, embed_texts
    from ragops.tracking import tracked_run

    ws, config = load(workspace, params, profile, tracking_uri)
    chunks = pd.read_parquet(ws.chunks, columns=["title", "text"]).iloc[start:end]
    texts = [chunk_embedding_text(t, x) for t, x in zip(chunks["title"], chunks["text"], strict=True)]
    cfg = config.embed
    with tracked_run(ws, config, f"embed-shard-{start}-{end}", kind="embed-shard", parent_run_id=parent_run_id,
                     params={"start": start, "end": end, "embed": config.section("embed")}) as run:
        with run.meter("stage") as meter:
            encoder = Encoder.load(cfg.model, device=cfg.device, threads=cfg.threads, max_seq_length=cfg.max_seq_length, batch_size=cfg.batch_size)
            cache = EmbeddingCache(ws.embedding_cache, encoder.fingerprint)
            _, stats = embed_texts(texts, encoder, cache, progress=False, block_size=block_size or DEFAULT_BLOCK_SIZE)
            meter.add(examples=len(texts))
        run.log_metrics({f"embed_shard/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    return {"start": start, "end": end, "texts": len(texts), "cached": int(stats["cached"]), "computed": int(stats["computed"]), "run_id": run.run_id}
