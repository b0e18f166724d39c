"""The data plane: pure functions, no Prefect or MLflow.

- `ingest`: packaged Wikipedia summaries or a folder of .txt/.md/.html/.jsonl -> corpus table + report
- `validate`: Great Expectations 1.x gates for the corpus and chunk tables (GX imported lazily)
- `benchmark`: held-out documents and QA tasks (built-in, the user's own, or derived), deterministic from the seed
- `questions`: the user's own questions file (JSONL) -> the `qa` task
- `chunk`: sentence-aware token windows measured with the encoder's tokenizer
"""
