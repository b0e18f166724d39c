"""The data plane: pure functions, no Prefect or MLflow.

- `ingest`: packaged Wikipedia summaries or a folder of .txt/.md/.html/.jsonl -> corpus table + report
- `validate`: Great Expectations 1.x gates for the corpus and chunk tables (GX imported lazily)
- `benchmark`: held-out articles and describe/identify question sets, deterministic from the seed
- `chunk`: sentence-aware token windows measured with the encoder's tokenizer
"""
