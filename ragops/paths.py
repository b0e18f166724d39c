"""Where every stage reads and writes, relative to the project (workspace) root.

One place for the layout, so the CLI, DVC stages, Prefect flows and tests agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __init__(self, root: str | Path = ".") -> None:
        object.__setattr__(self, "root", Path(root).resolve())

    # --- configuration -------------------------------------------------------------------------
    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # --- the corpus version (tracked by data.dvc) -------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def corpus(self) -> Path:  # doc_id, title, text, source, description, topic
        return self.data_dir / "corpus.parquet"

    @property
    def ingest_report(self) -> Path:
        return self.data_dir / "ingest_report.json"

    # --- stage outputs (DVC outs) -------------------------------------------------------------------
    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def validation_dir(self) -> Path:  # corpus.json, chunks.json: full GX validation results
        return self.artifacts / "validation"

    @property
    def benchmark_dir(self) -> Path:  # heldout.parquet, questions.parquet, split.json
        return self.artifacts / "benchmark"

    @property
    def heldout(self) -> Path:  # doc_id, title, text: articles never indexed nor trained on
        return self.benchmark_dir / "heldout.parquet"

    @property
    def questions(self) -> Path:  # qid, task, split, question, answer, gold_doc_id
        return self.benchmark_dir / "questions.parquet"

    @property
    def chunks_dir(self) -> Path:
        return self.artifacts / "chunks"

    @property
    def chunks(self) -> Path:  # chunk_id, doc_id, position, title, text, n_tokens
        return self.chunks_dir / "chunks.parquet"

    @property
    def embeddings_dir(self) -> Path:  # vectors.npy (float32, row i = chunks row i), meta.json
        return self.artifacts / "embeddings"

    @property
    def index_dir(self) -> Path:  # dense.faiss, bm25/, meta.json
        return self.artifacts / "index"

    @property
    def retrieval_eval_dir(self) -> Path:  # per-question results
        return self.artifacts / "retrieval_eval"

    @property
    def lm_dir(self) -> Path:  # the prepared (safetensors) language model
        return self.artifacts / "models" / "lm"

    def architecture_dir(self, name: str) -> Path:  # trained artifacts of one architecture
        return self.artifacts / "models" / name

    def eval_dir(self, name: str) -> Path:  # predictions.parquet and friends of one architecture
        return self.artifacts / "eval" / name

    @property
    def sweep_dir(self) -> Path:
        return self.artifacts / "sweep"

    @property
    def compare_dir(self) -> Path:
        return self.artifacts / "compare"

    @property
    def report_dir(self) -> Path:  # `ragops report` for constraints other than params.yaml's (not a DVC output)
        return self.artifacts / "report"

    # --- metrics and plots (small, git-tracked, diffable by `dvc metrics diff`) ---------------------
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics_file(self, name: str) -> Path:
        return self.metrics_dir / f"{name}.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    # --- caches and tool state (never in git nor DVC) -----------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache" / "ragops"

    @property
    def embedding_cache(self) -> Path:
        return self.cache_dir / "embeddings"

    @property
    def retrieval_cache(self) -> Path:
        return self.cache_dir / "retrieval"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"

    @property
    def lock_file(self) -> Path:
        return self.root / ".ragops.lock"
