"""The pipeline's stages: the one place where the library meets files, MLflow and skipping.

Every entry point runs these same functions: the CLI (`ragops <stage>`), the DVC stages (which
call the CLI) and the Prefect flows (whose tasks call them directly). Each stage

- reads its inputs from, and writes its outputs to, the fixed layout of `ragops.paths.Workspace`,
  atomically (a failed stage leaves the previous outputs intact);
- skips itself when the content hash of its inputs and parameters matches the manifest stored
  with its outputs (`_stage.json`), so re-running the pipeline only redoes what changed;
- opens one MLflow run (a child of the pipeline's run when there is one) and logs its
  parameters, statistics and cost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragops.config import DEFAULT_MODEL, Config
from ragops.cost import CostMeter
from ragops.errors import RagopsError, ValidationFailed
from ragops.io import atomic_dir, json_hash, path_hash, read_json, text_hash, write_json
from ragops.paths import Workspace
from ragops.pipeline import DATA_STAGES, STAGE_CODE, architecture_code, code_fingerprint, training_order
from ragops.tracking import TrackedRun, tracked_run

log = logging.getLogger("ragops.stages")

MANIFEST = "_stage.json"
STAGE_ORDER = list(DATA_STAGES)  # defined once, in ragops.pipeline


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    summary: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None


@dataclass
class _Context:
    """What a stage body gets: its MLflow run, a cost meter and a place for deterministic stats."""

    run: TrackedRun
    meter: CostMeter
    stats: dict[str, Any] = field(default_factory=dict)


def _fingerprint(stage: str, params: dict[str, Any], inputs: dict[str, Path]) -> str:
    hashes = {}
    for name, path in sorted(inputs.items()):
        if not path.exists():
            raise RagopsError(f"{path}: missing input of stage '{stage}' (run the earlier stages first: ragops run)")
        # Manifests are bookkeeping, not content: an upstream stage re-recording its manifest
        # must not make downstream stages re-run.
        hashes[name] = path_hash(path, exclude=(MANIFEST,))
    # The stage's own code (ragops.pipeline.STAGE_CODE; an architecture's evaluation passes its code
    # in `params`): a change to it re-runs the stage, a change elsewhere does not.
    return json_hash({"stage": stage, "code": code_fingerprint(STAGE_CODE.get(stage, ())), "params": params, "inputs": hashes})


def _run_stage(
    stage: str,
    ws: Workspace,
    config: Config,
    *,
    out_dir: Path,
    inputs: dict[str, Path],
    params: dict[str, Any],
    body: Callable[[_Context], None],
    parent_run_id: str | None,
    run_name: str | None = None,
    kind: str = "stage",
    tags: dict[str, Any] | None = None,
    force: bool = False,
    extra_outputs: tuple[Path, ...] = (),
) -> StageOutcome:
    fingerprint = _fingerprint(stage, params, inputs)
    manifest = out_dir / MANIFEST
    if not force and manifest.exists() and all(p.exists() for p in extra_outputs):
        previous = read_json(manifest)
        if previous.get("fingerprint") == fingerprint:
            log.info("%s: inputs and parameters unchanged, skipped", run_name or stage)
            return StageOutcome(stage, True, previous.get("stats", {}), _previous_run(ws, out_dir))
    log.info("%s: running", run_name or stage)
    with tracked_run(ws, config, run_name or stage, kind=kind, parent_run_id=parent_run_id, params=params, tags=tags) as run:
        with run.meter("stage") as meter:
            context = _Context(run, meter)
            body(context)
        numeric = {k: v for k, v in context.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # log_results: CI bounds (an architecture's `<metric>_ci_low/_ci_high`) go to a table and tags, not charts.
        run.log_results({f"{stage}/{k}" if "/" not in k else k: v for k, v in numeric.items()})
        write_json(manifest, {"stage": stage, "fingerprint": fingerprint, "stats": _deterministic(context.stats)})
        _remember_run(ws, out_dir, run.run_id)
        return StageOutcome(stage, False, context.stats, run.run_id)


# What each data stage reads, writes and depends on: one definition, used to run the stage and to
# ask whether it is up to date (e.g. before fanning embedding out over a cluster).
def _spec_validate(ws: Workspace, config: Config) -> dict[str, Any]:
    limits = {"min_chars": config.ingest.min_chars, "max_chars": config.ingest.max_chars}  # the gate checks ingest's limits
    return {"out_dir": ws.validation_dir, "inputs": {"corpus": ws.corpus}, "params": {"validate": config.section("validate"), "ingest": limits}}


def user_questions_file(ws: Workspace, config: Config) -> Path | None:
    """`benchmark.questions` resolved against the workspace root (None when not set)."""
    if config.benchmark.questions is None:
        return None
    path = Path(config.benchmark.questions).expanduser()
    return path if path.is_absolute() else ws.root / path


def _spec_split(ws: Workspace, config: Config) -> dict[str, Any]:
    questions_file = user_questions_file(ws, config)
    return {
        "out_dir": ws.benchmark_dir,
        "inputs": {
            "corpus": ws.corpus, "validation": ws.validation_dir / "status.json",
            **({"user_questions": questions_file} if questions_file is not None else {}),
        },
        "params": {"benchmark": config.section("benchmark"), "seed": config.seed},
    }


def _spec_chunk(ws: Workspace, config: Config) -> dict[str, Any]:
    return {
        "out_dir": ws.chunks_dir, "inputs": {"corpus": ws.corpus, "heldout": ws.heldout},
        "params": {"chunk": config.section("chunk"), "encoder": config.embed.model, "validate": config.section("validate")},
    }


def _spec_embed(ws: Workspace, config: Config) -> dict[str, Any]:
    return {"out_dir": ws.embeddings_dir, "inputs": {"chunks": ws.chunks}, "params": {"embed": config.section("embed")}}


def _spec_index(ws: Workspace, config: Config) -> dict[str, Any]:
    return {
        "out_dir": ws.index_dir,
        "inputs": {"embeddings": ws.embeddings_dir / "vectors.npy", "chunks": ws.chunks, "corpus": ws.corpus},
        "params": {"index": config.section("index")},
    }


def _spec_eval_retrieval(ws: Workspace, config: Config) -> dict[str, Any]:
    return {
        "out_dir": ws.retrieval_eval_dir,
        "inputs": {"questions": ws.questions, "index": ws.index_dir, "chunks": ws.chunks},
        "params": {"retrieval_eval": config.section("retrieval_eval"), "embed_model": config.embed.model},
        "extra_outputs": (ws.metrics_file("retrieval"),),
    }


_SPECS: dict[str, Callable[[Workspace, Config], dict[str, Any]]] = {
    "validate": _spec_validate, "split": _spec_split, "chunk": _spec_chunk,
    "embed": _spec_embed, "index": _spec_index, "eval_retrieval": _spec_eval_retrieval,
}


def up_to_date(stage: str, ws: Workspace, config: Config) -> bool:
    """True when `stage` would skip itself: its outputs' manifest matches its inputs and parameters."""
    spec = _SPECS[stage](ws, config)
    manifest = spec["out_dir"] / MANIFEST
    if not manifest.exists() or not all(p.exists() for p in spec.get("extra_outputs", ())):
        return False
    try:
        fingerprint = _fingerprint(stage, spec["params"], spec["inputs"])
    except RagopsError:  # a missing input: not up to date
        return False
    return read_json(manifest).get("fingerprint") == fingerprint


def _runs_file(ws: Workspace) -> Path:
    return ws.cache_dir / "stage-runs.json"


def _remember_run(ws: Workspace, out_dir: Path, run_id: str) -> None:
    """Which MLflow run produced an output. Kept outside the output itself: the manifest is hashed
    by DVC and must be identical for identical results (data.dvc, dvc.lock)."""
    path = _runs_file(ws)
    runs = read_json(path) if path.exists() else {}
    runs[str(out_dir.relative_to(ws.root))] = run_id
    write_json(path, runs)


def _previous_run(ws: Workspace, out_dir: Path) -> str | None:
    path = _runs_file(ws)
    return (read_json(path) if path.exists() else {}).get(str(out_dir.relative_to(ws.root)))


def _deterministic(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats stored in the manifest (a DVC-hashed output) must not change between identical runs."""
    volatile = ("seconds", "_s", "per_s", "latency", "ms", "throughput")
    return {
        k: v for k, v in stats.items()
        if not any(token in k for token in volatile)
        and not (isinstance(v, str) and v.startswith("/"))  # absolute paths differ between checkouts
    }


def _dvc_executable() -> str:
    """DVC from this interpreter's environment (the venv may not be on PATH), else from PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def _dvc_add_corpus(ws: Workspace) -> None:
    """Version the new corpus with DVC (data.dvc) when the workspace is a DVC repository."""
    if not (ws.root / ".dvc").is_dir():
        return
    result = subprocess.run([_dvc_executable(), "add", "--quiet", "data"], cwd=ws.root, capture_output=True, text=True)
    if result.returncode != 0:
        raise RagopsError(f"dvc add data failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")


# ------------------------------------------------------------------------------------------------
# Data plane
# ------------------------------------------------------------------------------------------------


def ingest(ws: Workspace, config: Config, *, source: str | None = None, parent_run_id: str | None = None, force: bool = False) -> StageOutcome:
    from ragops.data.ingest import load_corpus, write_corpus
    from ragops.resources import default_corpus_file

    if source is None:
        source = config.ingest.source
    if not source.strip():  # never fall back to the default corpus over the user's
        raise RagopsError("ingest source is empty: give a folder of documents or 'default'")
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(source).decode("utf-8", "backslashreplace")
        raise RagopsError(f"{shown}: ingest source path is not valid UTF-8 (rename the folder)") from None
    if source == "default":
        source_path = default_corpus_file()
    else:
        source_path = Path(source).expanduser()
        if not source_path.is_absolute():
            source_path = (ws.root / source_path).resolve()
        if not source_path.exists():
            raise RagopsError(f"{source}: ingest source does not exist")
        if not source_path.is_dir():
            raise RagopsError(f"{source}: ingest source must be a folder of .txt, .md, .html or .jsonl files")

    def body(ctx: _Context) -> None:
        corpus, report = load_corpus("default" if source == "default" else str(source_path), config.ingest)
        # The report is part of the DVC-hashed corpus version: record the source as the user named
        # it, not the absolute path of this checkout.
        report["source"] = source
        previous_corpus = path_hash(ws.corpus) if ws.corpus.exists() else None
        write_corpus(corpus, report, ws.data_dir)
        if previous_corpus is not None and previous_corpus != path_hash(ws.corpus):
            _remove_stale_metrics(ws)
        ctx.run.log_artifact(ws.ingest_report, "ingest")
        ctx.stats.update(
            documents=len(corpus),
            duplicates_dropped=report.get("duplicates_dropped", 0),
            skipped=len(report.get("skipped", [])),
            characters=int(corpus["text"].str.len().sum()),
        )
        for problem in report.get("skipped", [])[:20]:
            where = problem["path"] + (f":{problem['line']}" if problem.get("line") else "")
            log.warning("skipped %s: %s", where, problem["reason"])

    outcome = _run_stage(
        "ingest", ws, config, out_dir=ws.data_dir, inputs={"source": source_path},
        params={"ingest": {**config.section("ingest"), "source": source}}, body=body,
        parent_run_id=parent_run_id, force=force, extra_outputs=(ws.corpus,),
        tags={"ingest.source": source},
    )
    # After the manifest is written, so that data.dvc records the complete corpus version.
    _dvc_add_corpus(ws)
    return outcome


def _remove_stale_metrics(ws: Workspace) -> None:
    """metrics/*.json describe the previous corpus: an architecture or sweep not re-run on the new
    one would otherwise be reported (and compared) with numbers from other data."""
    stale = sorted(ws.metrics_dir.glob("*.json")) if ws.metrics_dir.is_dir() else []
    for path in stale:
        path.unlink()
    if stale:
        log.info("ingest: the corpus changed; removed %d metrics files of the previous one (%s)",
                 len(stale), ", ".join(p.name for p in stale))


def validate(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False) -> StageOutcome:
    import pandas as pd

    from ragops.data.validate import validate_corpus

    result_file = ws.validation_dir / "corpus.json"

    def body(ctx: _Context) -> None:
        corpus = pd.read_parquet(ws.corpus)
        report = validate_corpus(corpus, config.validate_, config.ingest)
        with atomic_dir(ws.validation_dir) as tmp:
            write_json(tmp / "corpus.json", report.result)
            write_json(tmp / "status.json", {"success": report.success, "summary": report.summary, "corpus_hash": path_hash(ws.corpus)})
        ctx.run.log_artifact(result_file, "validation")
        ctx.stats.update(rows=len(corpus), expectations_failed=len(report.failures))
        if not report.success:
            # Nothing downstream may run on a corpus that failed its gate.
            raise ValidationFailed(report.summary)
        log.info(report.summary)

    return _run_stage(
        "validate", ws, config, **_spec_validate(ws, config), body=body, parent_run_id=parent_run_id, force=force,
    )


def require_validated_corpus(ws: Workspace) -> None:
    """Downstream stages refuse a corpus that has not passed the gate (or changed since it did)."""
    status_file = ws.validation_dir / "status.json"
    if not status_file.exists():
        raise ValidationFailed(f"{ws.corpus}: not validated yet (run: ragops validate)")
    status = read_json(status_file)
    if not status.get("success"):
        raise ValidationFailed(f"{ws.corpus}: failed validation, nothing downstream runs ({status.get('summary')})")
    if status.get("corpus_hash") != path_hash(ws.corpus):
        raise ValidationFailed(f"{ws.corpus}: changed since it was validated (run: ragops validate)")


def split(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False) -> StageOutcome:
    """Held-out documents and the QA tasks (`ragops.data.benchmark`); the user's questions file,
    when configured, is read here (bad lines reported with file:line and skipped) and must pass its
    GX gate. split.json says which tasks were built, why others were not, and how many held-out
    documents were not evaluated because a near-duplicate is indexed."""
    import pandas as pd

    from ragops.data.benchmark import benchmark_summary, build_benchmark

    require_validated_corpus(ws)
    questions_file = user_questions_file(ws, config)
    if questions_file is not None and not questions_file.exists():
        raise RagopsError(f"{config.benchmark.questions}: benchmark.questions file not found (relative to {ws.root})")

    def body(ctx: _Context) -> None:
        corpus = pd.read_parquet(ws.corpus)
        user_questions, skipped = _read_user_questions(ws, config, corpus, questions_file)
        benchmark = build_benchmark(corpus, config.benchmark, config.seed, user_questions)
        heldout, questions = benchmark.heldout, benchmark.questions
        summary = benchmark_summary(corpus, heldout, questions, benchmark)
        if questions_file is not None:
            summary["user_questions"] = {
                "file": config.benchmark.questions, "valid": 0 if user_questions is None else len(user_questions),
                "skipped": len(skipped), "skipped_lines": skipped[:100],
            }
        with atomic_dir(ws.benchmark_dir) as tmp:
            heldout.to_parquet(tmp / "heldout.parquet", index=False)
            questions.to_parquet(tmp / "questions.parquet", index=False)
            write_json(tmp / "split.json", summary)
        _log_benchmark_inputs(ctx.run, ws, questions, heldout, context="benchmark")
        ctx.run.log_dict(summary, "split.json")
        for task, state in benchmark.tasks.items():
            if state["built"]:
                log.info("split: task %s built: %s", task, state["reason"])
            elif config.benchmark.tasks != "auto" and task in config.benchmark.tasks:
                log.warning("split: task %s skipped: %s", task, state["reason"])
        excluded = len(benchmark.near_duplicates)
        if excluded:
            first = benchmark.near_duplicates.iloc[0]
            log.warning("split: %d held-out document%s not evaluated: a near-duplicate is indexed (e.g. %s ~ %s, %.0f%% of its %d-grams)",
                        excluded, "s" if excluded != 1 else "", first["doc_id"], first["duplicate_of"], 100 * first["overlap"],
                        config.benchmark.near_duplicate_ngram)
        if questions.empty:
            log.warning("split: 0 questions: no QA task could be built (see %s); only the lm task can be evaluated", ws.benchmark_dir / "split.json")
        counts = questions.groupby(["task", "split"]).size()
        ctx.stats.update(heldout_docs=len(heldout), questions=len(questions), near_duplicates_excluded=excluded,
                         tasks=",".join(t for t, st in benchmark.tasks.items() if st["built"]) or "none")
        if questions_file is not None:
            ctx.stats.update(user_questions_skipped=len(skipped))
        ctx.stats.update({f"{task}_{split_name}": int(n) for (task, split_name), n in counts.items()})

    return _run_stage(
        "split", ws, config, **_spec_split(ws, config), body=body, parent_run_id=parent_run_id, force=force,
    )


def _read_user_questions(ws: Workspace, config: Config, corpus, path: Path | None):
    """(questions or None, skipped lines): the user's questions file, parsed and through its GX gate."""
    from ragops.data.questions import read_user_questions
    from ragops.data.validate import validate_questions

    if path is None:
        return None, []
    questions, skipped = read_user_questions(path, corpus, label=config.benchmark.questions)
    for problem in skipped[:50]:
        log.warning("skipped %s:%d: %s", problem["path"], problem["line"], problem["reason"])
    if len(skipped) > 50:
        log.warning("... and %d more skipped lines (all in %s)", len(skipped) - 50, ws.benchmark_dir / "split.json")
    report = validate_questions(questions)
    if not report.success:
        raise ValidationFailed(f"{config.benchmark.questions}: {report.summary}")
    log.info("%s: %s", config.benchmark.questions, report.summary)
    return questions, skipped


def _log_benchmark_inputs(run: TrackedRun, ws: Workspace, questions, heldout, *, context: str) -> None:
    """The benchmark split as MLflow dataset inputs of `run` (same digests in every run that used it)."""
    run.log_dataset(questions, name="benchmark-questions", source=ws.questions, context=context, targets="answer")
    run.log_dataset(heldout, name="benchmark-heldout", source=ws.heldout, context=context)


def chunk(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False) -> StageOutcome:
    import pandas as pd

    from ragops.data.benchmark import indexed_corpus
    from ragops.data.chunk import chunk_corpus, load_tokenizer
    from ragops.data.validate import validate_chunks

    require_validated_corpus(ws)

    def body(ctx: _Context) -> None:
        corpus = pd.read_parquet(ws.corpus)
        indexed = indexed_corpus(corpus, pd.read_parquet(ws.heldout, columns=["doc_id"]))  # held-out text never enters the index
        tokenizer = load_tokenizer(config.embed.model)
        chunks = chunk_corpus(indexed, tokenizer, config.chunk.size, config.chunk.overlap)
        report = validate_chunks(chunks, config.validate_)
        with atomic_dir(ws.chunks_dir) as tmp:
            chunks.to_parquet(tmp / "chunks.parquet", index=False)
            write_json(tmp / "validation.json", report.result)
        ctx.run.log_artifact(ws.chunks_dir / "validation.json", "validation")
        ctx.stats.update(
            documents=int(chunks["doc_id"].nunique()), chunks=len(chunks),
            tokens=int(chunks["n_tokens"].sum()), mean_tokens=round(float(chunks["n_tokens"].mean()), 2),
        )
        if not report.success:
            shutil.rmtree(ws.chunks_dir, ignore_errors=True)
            raise ValidationFailed(report.summary)
        log.info(report.summary)

    return _run_stage(
        "chunk", ws, config, **_spec_chunk(ws, config), body=body, parent_run_id=parent_run_id, force=force,
    )


def embed(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False, progress: bool = True) -> StageOutcome:
    import pandas as pd

    from ragops.retrieval.embed import EmbeddingCache, Encoder, chunk_embedding_text, embed_texts

    def body(ctx: _Context) -> None:
        chunks = pd.read_parquet(ws.chunks, columns=["chunk_id", "title", "text"])
        cfg = config.embed
        encoder = Encoder.load(cfg.model, device=cfg.device, threads=cfg.threads, max_seq_length=cfg.max_seq_length, batch_size=cfg.batch_size)
        cache = EmbeddingCache(ws.embedding_cache, encoder.fingerprint)
        texts = [chunk_embedding_text(t, x) for t, x in zip(chunks["title"], chunks["text"], strict=True)]
        vectors, stats = embed_texts(texts, encoder, cache, progress=progress)
        with atomic_dir(ws.embeddings_dir) as tmp:
            np.save(tmp / "vectors.npy", vectors)
            write_json(tmp / "meta.json", {
                "encoder": cfg.model, "fingerprint": encoder.fingerprint, "dim": int(vectors.shape[1]),
                "count": int(vectors.shape[0]), "chunks_hash": path_hash(ws.chunks),
            })
        ctx.meter.add(examples=len(texts))
        ctx.stats.update(
            chunks=len(texts), dim=int(vectors.shape[1]), cached=stats["cached"], computed=stats["computed"],
            embed_seconds=round(stats["seconds"], 3), texts_per_s=round(stats["texts_per_s"], 2),
        )

    return _run_stage(
        "embed", ws, config, **_spec_embed(ws, config), body=body, parent_run_id=parent_run_id, force=force,
    )


def index(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False) -> StageOutcome:
    import pandas as pd

    from ragops.retrieval.embed import chunk_embedding_text
    from ragops.retrieval.index import build_index, write_index

    def body(ctx: _Context) -> None:
        vectors = np.load(ws.embeddings_dir / "vectors.npy")
        embed_meta = read_json(ws.embeddings_dir / "meta.json")
        chunks = pd.read_parquet(ws.chunks, columns=["chunk_id", "title", "text"])
        if len(chunks) != len(vectors):
            raise RagopsError(f"{ws.embeddings_dir}: {len(vectors)} vectors for {len(chunks)} chunks (re-run ragops embed)")
        started = time.perf_counter()
        dense, bm25, meta = build_index(
            vectors, [chunk_embedding_text(t, x) for t, x in zip(chunks["title"], chunks["text"], strict=True)], config.index,
            encoder=embed_meta["encoder"], fingerprint=embed_meta["fingerprint"], chunk_ids=chunks["chunk_id"].tolist(),
            extra_meta={"corpus_hash": path_hash(ws.corpus), "chunks_hash": embed_meta["chunks_hash"]},
        )
        build_seconds = time.perf_counter() - started
        write_index(ws.index_dir, dense, bm25, meta)
        ctx.stats.update(
            vectors=len(chunks), dim=int(vectors.shape[1]), build_seconds=round(build_seconds, 3),
            dense_bytes=(ws.index_dir / "dense.faiss").stat().st_size,
            bm25_bytes=sum(p.stat().st_size for p in (ws.index_dir / "bm25").rglob("*") if p.is_file()),
        )

    return _run_stage(
        "index", ws, config, **_spec_index(ws, config), body=body, parent_run_id=parent_run_id, force=force,
    )


def eval_retrieval(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False, progress: bool = True) -> StageOutcome:
    import pandas as pd

    from ragops.retrieval.evaluate import evaluate_retrievers
    from ragops.retrieval.retriever import load_retriever

    metrics_file = ws.metrics_file("retrieval")

    def body(ctx: _Context) -> None:
        cfg = config.retrieval_eval
        questions = pd.read_parquet(ws.questions)
        retrievers = {kind: load_retriever(ws, config, kind) for kind in cfg.retrievers}
        metrics, per_question = evaluate_retrievers(
            questions, retrievers, splits=cfg.splits, ks=cfg.ks, max_questions=cfg.max_questions, progress=progress
        )
        with atomic_dir(ws.retrieval_eval_dir) as tmp:
            per_question.to_parquet(tmp / "results.parquet", index=False)
        write_json(metrics_file, metrics)
        ctx.run.log_metrics(metrics)
        ctx.run.log_artifact(ws.retrieval_eval_dir / "results.parquet", "retrieval_eval")
        ctx.meter.add(retrieval_calls=sum(getattr(r, "calls", 0) for r in retrievers.values()), questions=len(per_question))
        ctx.stats.update(questions=len(per_question))

    return _run_stage(
        "eval_retrieval", ws, config, **_spec_eval_retrieval(ws, config), body=body,
        parent_run_id=parent_run_id, force=force,
    )


# ------------------------------------------------------------------------------------------------
# Language model and architectures
# ------------------------------------------------------------------------------------------------


def prepare_lm(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False) -> StageOutcome:
    from ragops.lm import prepare_lm as convert
    from ragops.resources import default_lm_gguf

    spec = config.lm.model
    inputs: dict[str, Path] = {}
    if spec == DEFAULT_MODEL:
        inputs["gguf"] = default_lm_gguf()
    elif Path(spec).expanduser().exists():
        inputs["model"] = Path(spec).expanduser().resolve()

    def body(ctx: _Context) -> None:
        meta = convert(spec, ws.lm_dir)
        ctx.stats.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)})

    return _run_stage(
        "prepare_lm", ws, config, out_dir=ws.lm_dir, inputs=inputs, params={"lm.model": spec}, body=body,
        parent_run_id=parent_run_id, force=force,
    )


def _lm_inputs(ws: Workspace, config: Config) -> dict[str, Path]:
    """The prepared LM is an input only when it is the default (another spec is loaded as named)."""
    return {"lm": ws.lm_dir} if config.lm.model == DEFAULT_MODEL else {}


TRAIN_COST_FILE = "train_cost.json"


def _checkpoint_path(ws: Workspace, name: str, fingerprint: str) -> Path:
    """Resumable checkpoints live outside the DVC output (which `dvc repro` deletes before a run)."""
    return ws.cache_dir / "checkpoints" / name / f"{fingerprint[:16]}.ckpt"


def _report_other_checkpoints(checkpoint: Path, settings: dict[str, Any]) -> None:
    """A checkpoint of this architecture made with other settings is not resumed from: say which differ."""
    from ragops.training.checkpoint import load_checkpoint

    for other in sorted(checkpoint.parent.glob("[!.]*.ckpt")) if checkpoint.parent.is_dir() else []:  # not temp files
        if other == checkpoint:
            continue
        try:
            load_checkpoint(other, settings)
        except RagopsError as refused:
            log.warning("%s", refused)


def train_architecture(
    ws: Workspace, config: Config, name: str, *, parent_run_id: str | None = None, force: bool = False,
    progress: bool = True, restart: bool = False,
) -> StageOutcome:
    """Train `name` into artifacts/models/<name> when it fine-tunes something and its artifacts are
    missing or were made with other settings (options, LM, benchmark, index or code: see
    `Architecture.training_settings`). A killed training resumes from its checkpoint when re-run.
    Architectures that train nothing get a manifest saying so, and a training cost of exactly 0."""
    from ragops.architectures import registry
    from ragops.evaluation.runner import build_architecture
    from ragops.lm.model import resolve_device
    from ragops.training.checkpoint import remove_checkpoint
    from ragops.training.loop import TrainRun
    from ragops.training.plots import plot_history

    cls = registry.resolve(name, config.architecture_options(name))  # one line naming the configured ones if unknown
    arch = build_architecture(name, ws, config, progress=progress)
    out_dir = ws.architecture_dir(name)
    if cls.finetune == "none":
        manifest = {"architecture": name, "trains": False, "fingerprint": arch.training_fingerprint()}
        if force or arch.trained_manifest() != manifest:
            with atomic_dir(out_dir) as tmp:
                write_json(tmp / arch.MANIFEST, manifest)
        return StageOutcome("train", True, {"architecture": name, "trains": False})
    if not force and not arch.needs_training() and (out_dir / TRAIN_COST_FILE).exists():
        log.info("train %s: trained artifacts match the current settings, skipped", name)
        return StageOutcome("train", True, {"architecture": name, **_train_summary(out_dir)}, _previous_run(ws, out_dir))
    settings = arch.training_settings()
    fingerprint = arch.training_fingerprint()
    checkpoint = _checkpoint_path(ws, name, fingerprint)
    if restart:
        remove_checkpoint(checkpoint)
    _report_other_checkpoints(checkpoint, settings)
    if checkpoint.exists():
        log.info("train %s: resuming from %s", name, checkpoint)
    tags = {"architecture": name, "family": cls.family, "finetune": cls.finetune}
    history: list[tuple[int, dict[str, float]]] = []
    with tracked_run(ws, config, f"train {name}", kind="train", parent_run_id=parent_run_id, tags=tags,
                     params={"architecture": name, "options": settings["options"], "lm": settings["lm"], "seed": config.seed}) as run:
        def report(step: int, metrics: dict[str, float]) -> None:
            history.append((step, metrics))
            run.log_metrics(metrics, step=step)

        with run.meter("train") as meter:
            info = arch.train(TrainRun(
                meter=meter, checkpoint=checkpoint, settings=settings, report=report,
                max_minutes=config.train.max_minutes, progress=progress, device=resolve_device(config.train.device),
            )) or {}
        total, trainable = arch.param_counts()
        meter.set_params(total, trainable)
        cost = meter.metrics(*run.cost_rates)
        write_json(out_dir / TRAIN_COST_FILE, cost)
        tuned = _evaluate_tuned_retriever(ws, config, name, arch, progress)
        if tuned:
            run.log_metrics({f"retrieval/{k}": v for k, v in tuned.items()})
        png = plot_history(history, ws.plots_dir / f"training-{name}.png", f"{name}: training")
        if png is not None:
            run.log_artifact(png, "plots")
        run.log_dict(info, "train_info.json")
        manifest = arch.trained_manifest() or {}
        truncated = bool(manifest.get("truncated"))
        if truncated:
            log.warning("train %s: stopped by train.max_minutes=%s; re-run to continue from the checkpoint", name, config.train.max_minutes)
        elif not config.train.keep_checkpoints:
            remove_checkpoint(checkpoint)
        _remember_run(ws, out_dir, run.run_id)
    return StageOutcome("train", False, {"architecture": name, **_train_summary(out_dir)}, run.run_id)


TUNED_RETRIEVAL_FILE = "retrieval_eval.json"


def _evaluate_tuned_retriever(ws: Workspace, config: Config, name: str, arch: Any, progress: bool) -> dict[str, float]:
    """Recall/MRR/nDCG of an architecture's tuned dense retriever on the same questions as the
    `eval_retrieval` stage (retriever named `dense:<architecture>`), next to the untuned ones."""
    import pandas as pd

    from ragops.retrieval.evaluate import evaluate_retrievers
    from ragops.retrieval.retriever import load_retriever

    trained_dir = arch.trained_retriever_dir()
    if trained_dir is None:
        return {}
    cfg = config.retrieval_eval
    retriever = load_retriever(ws, config, "dense", trained_dir=trained_dir)
    metrics, _ = evaluate_retrievers(pd.read_parquet(ws.questions), {f"dense:{name}": retriever}, splits=cfg.splits, ks=cfg.ks,
                                     max_questions=cfg.max_questions, progress=progress)
    write_json(ws.architecture_dir(name) / TUNED_RETRIEVAL_FILE, metrics)
    return metrics


def tuned_retrieval_metrics(ws: Workspace, names: list[str]) -> dict[str, float]:
    """The tuned retrievers' metrics of `names` (those that have one), for the retrieval table."""
    out: dict[str, float] = {}
    for name in names:
        path = ws.architecture_dir(name) / TUNED_RETRIEVAL_FILE
        if path.exists():
            out.update(read_json(path))
    return out


def _train_summary(out_dir: Path) -> dict[str, Any]:
    manifest = read_json(out_dir / "manifest.json") if (out_dir / "manifest.json").exists() else {}
    training = (manifest.get("info") or {}).get("training") or {}
    cost = read_json(out_dir / TRAIN_COST_FILE) if (out_dir / TRAIN_COST_FILE).exists() else {}
    return {
        "steps": training.get("steps"), "final_train_loss": training.get("final_train_loss"),
        "truncated": manifest.get("truncated"), "train_wall_s": cost.get("train/wall_s"),
    }


def train_cost(ws: Workspace, name: str) -> dict[str, float]:
    """`train/*` cost keys of an architecture's training (exactly 0 for one that trains nothing)."""
    from ragops.cost import CostMeter

    path = ws.architecture_dir(name) / TRAIN_COST_FILE
    if path.exists():
        return {k: float(v) for k, v in read_json(path).items()}
    return {k: 0.0 for k in CostMeter("train").metrics()}


def evaluate_architecture(
    ws: Workspace, config: Config, name: str, *, parent_run_id: str | None = None, force: bool = False, progress: bool = True
) -> StageOutcome:
    import pandas as pd

    from ragops.architectures import registry
    from ragops.evaluation import run_architecture
    from ragops.resources import encoder_name, lm_name

    options = config.architecture_options(name)
    cls = registry.resolve(name, options)
    metrics_file = ws.metrics_file(name)
    inputs = {
        "questions": ws.questions, "heldout": ws.heldout, "index": ws.index_dir, "chunks": ws.chunks,
        "model": ws.architecture_dir(name), **_lm_inputs(ws, config),
    }
    if not (ws.architecture_dir(name) / "manifest.json").exists():
        raise RagopsError(f"{ws.architecture_dir(name)}: '{name}' has not been through its train stage (run: ragops train {name})")
    retriever = getattr(options, "retriever", None)
    tags = {
        "architecture": name, "family": cls.family, "finetune": cls.finetune,
        "lm_model": lm_name(config.lm.model), "retriever": retriever or "none", "encoder": encoder_name(config.embed.model),
    }

    def body(ctx: _Context) -> None:
        infer_meter = ctx.run.meter("inference")
        result = run_architecture(name, ws, config, infer_meter=infer_meter, progress=progress)
        arch_info = result.info.get("architecture_info") or {}
        # An architecture may report extra metrics (e.g. SELF-RAG's <task>/retrieval_rate) and files (its δ sweep).
        extra_metrics = {k: float(v) for k, v in (arch_info.get("metrics") or {}).items()}
        write_files = getattr(cls, "write_eval_files", None)
        with atomic_dir(ws.eval_dir(name)) as tmp:
            result.predictions.to_parquet(tmp / "predictions.parquet", index=False)
            write_json(tmp / "info.json", result.info)
            extra_files = [p.name for p in write_files(arch_info, tmp)] if write_files is not None else []
        metrics = {
            **result.metrics,
            **extra_metrics,
            **train_cost(ws, name),
            **infer_meter.metrics(*ctx.run.cost_rates),
        }
        write_json(metrics_file, metrics)
        ctx.run.log_params(result.info.get("conventions") or {})
        ctx.run.log_metrics(train_cost(ws, name))  # the quality metrics (and their CIs) are logged by _run_stage
        _log_benchmark_inputs(ctx.run, ws, pd.read_parquet(ws.questions), pd.read_parquet(ws.heldout), context="evaluation")
        ctx.run.log_artifact(ws.eval_dir(name) / "predictions.parquet", "predictions")
        ctx.run.log_table(result.predictions, "predictions/predictions.json")
        ctx.run.log_dict(result.info, "info.json")
        for file_name in extra_files:
            ctx.run.log_artifact(ws.eval_dir(name) / file_name, "evaluation")
        ctx.stats.update({**result.metrics, **extra_metrics})  # logged by _run_stage

    params = {
        "architecture": name, "options": options.model_dump(mode="json"),
        "lm": config.section("lm"), "eval": config.section("eval"), "seed": config.seed,
        "code": code_fingerprint(architecture_code(config, name)["evaluate"]),
    }
    outcome = _run_stage(
        "evaluate", ws, config, out_dir=ws.eval_dir(name), inputs=inputs, params=params,
        body=body, parent_run_id=parent_run_id, run_name=name, kind="architecture", tags=tags, force=force,
        extra_outputs=(metrics_file,),
    )
    if outcome.skipped and parent_run_id:
        # Unchanged: nothing is recomputed, but the pipeline run still gets this architecture's
        # child run (its stored metrics, tagged as reused) so that every pipeline run is complete
        # in MLflow's compare view.
        with tracked_run(ws, config, name, kind="architecture", parent_run_id=parent_run_id,
                         tags={**tags, **({"ragops.reused_from": outcome.run_id} if outcome.run_id else {})},
                         params=params) as run:
            run.log_results(read_json(metrics_file))
            info_file = ws.eval_dir(name) / "info.json"
            if info_file.exists():
                run.log_params(read_json(info_file).get("conventions") or {})
            outcome.run_id = run.run_id
    return outcome


def sweep(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False, progress: bool = True) -> StageOutcome:
    from ragops.evaluation import plot_sweep, run_sweep

    plot_file = ws.plots_dir / "sweep.png"

    def body(ctx: _Context) -> None:
        table = run_sweep(ws, config, progress=progress)
        with atomic_dir(ws.sweep_dir) as tmp:
            table.to_parquet(tmp / "sweep.parquet", index=False)
            table.to_csv(tmp / "sweep.csv", index=False)
        ws.plots_dir.mkdir(parents=True, exist_ok=True)
        plot_sweep(table, plot_file)
        write_json(ws.metrics_file("sweep"), {"points": json.loads(table.to_json(orient="records"))})
        for row in table.to_dict(orient="records"):
            point = f"stride={int(row['stride'])},query_length={int(row['query_length'])}"
            with tracked_run(ws, config, point, kind="sweep-point", parent_run_id=ctx.run.run_id,
                             params={"stride": row["stride"], "query_length": row["query_length"]}) as child:
                child.log_metrics({k: v for k, v in row.items() if k not in ("stride", "query_length")})
        ctx.run.log_artifact(plot_file, "plots")
        ctx.run.log_artifact(ws.sweep_dir / "sweep.csv", "sweep")
        ctx.stats.update(points=len(table))

    return _run_stage(
        "sweep", ws, config, out_dir=ws.sweep_dir,
        inputs={"heldout": ws.heldout, "index": ws.index_dir, "chunks": ws.chunks, **_lm_inputs(ws, config)},
        params={"sweep": config.section("sweep"), "lm": config.section("lm"), "architectures": config.section("architectures")},
        body=body, parent_run_id=parent_run_id, force=force, extra_outputs=(plot_file,),
    )


def _compare_spec(ws: Workspace, config: Config) -> dict[str, Any]:
    from ragops.compare.inputs import input_files, with_results

    names, missing = with_results(ws, config.enabled_architectures())
    return {
        "out_dir": ws.compare_dir,
        # With no results at all, the missing files are the inputs (the stage names the first one).
        "inputs": input_files(ws, names or missing),
        "params": {
            "architectures": names, "not_evaluated": missing, "champion": config.section("champion"),
            "report": config.section("report"), "seed": config.seed,
            "eval": {k: config.eval.model_dump()[k] for k in ("bootstrap_samples", "confidence")},
        },
    }


def read_comparison(ws: Workspace) -> dict[str, Any]:
    """The comparison the compare stage wrote (summary, table and display rows), or {} if none."""
    from ragops.compare.analysis import format_table

    summary_file, table_file = ws.compare_dir / "summary.json", ws.compare_dir / "comparison.json"
    if not summary_file.exists() or not table_file.exists():
        return {}
    import pandas as pd

    records = read_json(table_file)
    summary = read_json(summary_file)
    files = sorted(str(p) for p in ws.compare_dir.iterdir() if p.name != MANIFEST)
    return {**summary, "table": records, "display": format_table(pd.DataFrame(records)), "files": files}


def compare(ws: Workspace, config: Config, *, parent_run_id: str | None = None, force: bool = False) -> StageOutcome:
    """Compare the enabled architectures from their evaluation outputs: table, paired differences,
    Pareto plots, champion decision (`ragops.compare.build`), written to artifacts/compare/.

    A pure function of DVC-tracked files (metrics/<name>.json, artifacts/eval/<name>/predictions.parquet)
    and params.yaml, so it skips itself when they are unchanged. Its MLflow run (the comparison's
    files as artifacts) and the champion's registration are side effects; they work on an empty store.
    """
    from ragops.compare.build import build_comparison
    from ragops.env import tracking_uri as default_uri
    from ragops.ops.mlflow_compare import architecture_card, register_champion

    registered: dict[str, Any] = {}  # the registry's answer: reported, never written into the (DVC-hashed) outputs

    def body(ctx: _Context) -> None:
        import os

        with atomic_dir(ws.compare_dir) as tmp:
            summary = build_comparison(ws, config, tmp)
        ctx.run.log_artifact(ws.compare_dir, "compare")
        for message in summary["messages"]:
            log.warning("compare: %s", message)
        champion = summary.get("champion")
        ctx.stats.update(architectures=len(summary["architectures"]), champion=champion["architecture"] if champion else None)
        if champion:
            row = next(r for r in summary["table"] if r["architecture"] == champion["architecture"])
            source_run = _previous_run(ws, ws.eval_dir(champion["architecture"]))
            card = architecture_card({**row, "run_id": source_run}, config)
            card["decision"] = champion["reason"]
            registered.update(register_champion(
                card, run_id=ctx.run.run_id, registered_model=config.champion.registered_model, alias=config.champion.alias,
                tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or default_uri(ws.root),
                tags={"metric": champion["metric"], "value": champion["value"], "source_run_id": source_run},
            ))
            log.info("champion: %s → %s (version %s)", champion["architecture"], registered["uri"], registered["version"])

    outcome = _run_stage("compare", ws, config, **_compare_spec(ws, config), body=body, parent_run_id=parent_run_id, force=force)
    outcome.summary = {**outcome.summary, **read_comparison(ws)}
    if registered and outcome.summary.get("champion"):
        outcome.summary["champion"] = {**outcome.summary["champion"], **{k: registered[k] for k in ("uri", "version", "new_version")}}
    return outcome


def report(
    ws: Workspace, config: Config, *, black_box_only: bool | None = None, max_train_hours: float | None = None,
    max_latency_ms: float | None = None, metric: str | None = None, parent_run_id: str | None = None,
) -> StageOutcome:
    """The decision report for these constraints (params.yaml's `report:` where not given), from the
    same inputs as compare: report.html, report.md and the Pareto plots in artifacts/report/,
    logged to MLflow (a `report` run). Never skipped: it is cheap and asked for by hand."""
    from ragops.compare.build import build_report, constraints_from

    constraints = constraints_from(config, black_box_only=black_box_only, max_train_hours=max_train_hours, max_latency_ms=max_latency_ms)
    params = {"constraints": constraints.__dict__, "metric": metric or config.report.metric or config.champion.metric}
    with tracked_run(ws, config, "report", kind="report", parent_run_id=parent_run_id, params=params) as run:
        summary = build_report(ws, config, ws.report_dir, constraints, metric)
        run.log_artifact(ws.report_dir, "report")
    return StageOutcome("report", False, summary, run.run_id)


# ------------------------------------------------------------------------------------------------
# Whole pipeline, in process
# ------------------------------------------------------------------------------------------------

DATA_STAGES: dict[str, Callable[..., StageOutcome]] = {
    "ingest": ingest, "validate": validate, "split": split, "chunk": chunk,
    "embed": embed, "index": index, "eval_retrieval": eval_retrieval, "prepare_lm": prepare_lm,
}


def record_in_dvc_lock(ws: Workspace, config: Config) -> bool:
    """Record the outputs this run produced in dvc.lock (`dvc commit`), when the workspace is a DVC repo.

    The stages ran the same commands `dvc repro` would run, with the same parameters, so their
    outputs are exactly what DVC would have produced: recording them makes a following
    `dvc repro` a no-op and puts the corpus, index and model versions under DVC (`dvc push`).
    """
    if not (ws.root / ".dvc").is_dir() or not (ws.root / "dvc.yaml").exists():
        return False
    outputs = {
        "validate": ws.validation_dir, "split": ws.benchmark_dir, "chunk": ws.chunks_dir, "embed": ws.embeddings_dir,
        "index": ws.index_dir, "eval_retrieval": ws.retrieval_eval_dir, "prepare_lm": ws.lm_dir,
        **{f"train@{name}": ws.architecture_dir(name) for name in config.enabled_architectures()},
        **{f"evaluate@{name}": ws.eval_dir(name) for name in config.enabled_architectures()},
    }
    targets = [stage for stage, out_dir in outputs.items() if (out_dir / MANIFEST).exists() or (out_dir / "manifest.json").exists()]
    if ws.compare_dir.exists():
        targets.append("compare")
    if not targets:
        return False
    dirs = {stage: outputs.get(stage, ws.compare_dir) for stage in targets}
    marker = ws.cache_dir / "dvc-recorded.json"
    if marker.exists() and read_json(marker) == _recorded_state(ws, dirs):
        # `dvc commit` re-hashes every output (~1 min for the default workspace): skipped when no
        # output, dependency, params.yaml, dvc.yaml or dvc.lock changed since it last recorded them.
        log.info("dvc.lock already records these %d stages", len(targets))
        return True
    dvc = _dvc_executable()
    result = subprocess.run([dvc, "commit", "--force", "--quiet", *targets], cwd=ws.root, capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("dvc commit failed, dvc.lock not updated: %s", (result.stderr or result.stdout).strip()[-300:])
        return False
    write_json(marker, _recorded_state(ws, dirs))  # after the commit: DVC may relink the files it cached
    log.info("recorded %d stages in dvc.lock (dvc repro now has nothing to do)", len(targets))
    return True


def _recorded_state(ws: Workspace, dirs: dict[str, Path]) -> dict[str, Any]:
    """What `dvc commit` recorded, cheaply: the path, size and modification time (a stat, not a
    hash) of every output file and of every other dependency in dvc.yaml (the corpus under data/,
    the code under ragops/), and the contents of params.yaml, dvc.yaml and dvc.lock."""

    def files(root: Path) -> list[list[Any]]:
        found = []
        for path in sorted(root.rglob("*")) if root.exists() else []:
            if path.is_file() and "__pycache__" not in path.parts:  # .dvcignore'd: bytecode is not a dependency
                stat = path.stat()
                found.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
        return found

    def text(path: Path) -> str | None:
        return text_hash(path.read_text()) if path.exists() else None

    return {
        **{name: text(ws.root / name) for name in ("params.yaml", "dvc.yaml", "dvc.lock")},
        "inputs": {name: files(ws.root / name) for name in ("data", "ragops")},
        "outputs": {stage: files(path) for stage, path in sorted(dirs.items())},
    }


def run_pipeline(
    ws: Workspace,
    config: Config,
    *,
    source: str | None = None,
    architectures: list[str] | None = None,
    with_compare: bool = True,
    progress: bool = True,
) -> dict[str, StageOutcome]:
    """Every stage in order under one MLflow parent run (the CLI's `ragops run`)."""
    from ragops.tracking import pipeline_run

    outcomes: dict[str, StageOutcome] = {}
    with pipeline_run(ws, config) as parent:
        pid = parent.run_id
        outcomes["ingest"] = ingest(ws, config, source=source, parent_run_id=pid)
        for name in STAGE_ORDER[1:]:
            stage = DATA_STAGES[name]
            kwargs = {"progress": progress} if name in ("embed", "eval_retrieval") else {}
            outcomes[name] = stage(ws, config, parent_run_id=pid, **kwargs)
        for name in training_order(config, architectures if architectures is not None else config.enabled_architectures()):
            outcomes[f"train@{name}"] = train_architecture(ws, config, name, parent_run_id=pid, progress=progress)
            outcomes[f"evaluate@{name}"] = evaluate_architecture(ws, config, name, parent_run_id=pid, progress=progress)
        if with_compare:
            outcomes["compare"] = compare(ws, config, parent_run_id=pid)
    record_in_dvc_lock(ws, config)
    return outcomes
