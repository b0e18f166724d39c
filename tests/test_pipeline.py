"""The stage layer end to end on the smoke workspace: outputs, skipping, leakage, MLflow lineage."""

import os

import mlflow
import numpy as np
import pandas as pd
import pytest

from ragops import stages
from ragops.params import load_config
from ragops.errors import ValidationFailed
from ragops.io import path_hash, read_json
from ragops.paths import Workspace


def test_data_plane_outputs_follow_the_contract(smoke_workspace):
    ws = Workspace(smoke_workspace)
    corpus = pd.read_parquet(ws.corpus)
    assert len(corpus) == 300
    assert corpus["doc_id"].is_unique
    heldout = pd.read_parquet(ws.heldout)
    questions = pd.read_parquet(ws.questions)
    chunks = pd.read_parquet(ws.chunks)
    vectors = np.load(ws.embeddings_dir / "vectors.npy")
    assert len(vectors) == len(chunks)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    # Leakage: held-out articles are neither indexed nor the gold document of any question.
    assert not set(heldout["doc_id"]) & set(chunks["doc_id"])
    assert not set(heldout["doc_id"]) & set(questions["gold_doc_id"])
    assert set(questions["task"]) == {"describe", "identify"}
    meta = read_json(ws.index_dir / "meta.json")
    assert meta["count"] == len(chunks) and meta["factory"] == "Flat"
    metrics = read_json(ws.metrics_file("retrieval"))
    for retriever in ("bm25", "dense", "hybrid"):
        assert 0 <= metrics[f"test/{retriever}/recall_at_10"] <= 1
    # a real retriever on real questions finds most gold articles in its top 10
    assert metrics["dev/hybrid/recall_at_10"] > 0.5


def test_rerunning_unchanged_stages_skips_them(smoke_workspace):
    ws = Workspace(smoke_workspace)
    config = load_config(ws.params)
    before = path_hash(ws.index_dir)
    outcomes = [stages.ingest(ws, config)] + [
        stages.DATA_STAGES[name](ws, config) for name in stages.STAGE_ORDER[1:] if name != "prepare_lm"
    ]
    assert [o.skipped for o in outcomes] == [True] * len(outcomes)
    assert path_hash(ws.index_dir) == before


def test_changed_parameter_reruns_only_downstream(copy_workspace):
    ws = Workspace(copy_workspace())
    config = load_config(ws.params)
    changed = config.model_copy(update={"index": config.index.model_copy(update={"factory": "HNSW16"})})
    assert stages.embed(ws, changed).skipped
    outcome = stages.index(ws, changed)
    assert not outcome.skipped
    assert read_json(ws.index_dir / "meta.json")["factory"] == "HNSW16"


def test_editing_one_document_embeds_only_its_chunks(copy_workspace):
    ws = Workspace(copy_workspace())
    config = load_config(ws.params)
    corpus = pd.read_parquet(ws.corpus)
    chunks = pd.read_parquet(ws.chunks)
    doc_id = chunks["doc_id"].iloc[0]
    corpus.loc[corpus["doc_id"] == doc_id, "text"] = "A completely rewritten article. " * 3
    corpus.to_parquet(ws.corpus, index=False)
    for stage in (stages.validate, stages.split, stages.chunk):
        stage(ws, config)
    outcome = stages.embed(ws, config)
    new_chunks = pd.read_parquet(ws.chunks)
    assert outcome.summary["computed"] == int((new_chunks["doc_id"] == doc_id).sum())
    assert outcome.summary["cached"] == len(new_chunks) - outcome.summary["computed"]


def test_failed_validation_stops_before_downstream_and_keeps_outputs(copy_workspace):
    ws = Workspace(copy_workspace())
    config = load_config(ws.params)
    broken = pd.read_parquet(ws.corpus)
    broken.loc[1, "doc_id"] = broken.loc[0, "doc_id"]  # a duplicate id
    broken.loc[2, "text"] = "   "
    broken.to_parquet(ws.corpus, index=False)
    benchmark_before = path_hash(ws.benchmark_dir)
    with pytest.raises(ValidationFailed) as error:
        stages.validate(ws, config)
    message = str(error.value)
    assert "\n" not in message
    assert "doc_id" in message and "unique" in message
    # The failed stage's run is in MLflow with its full validation result as an artifact.
    runs = mlflow.search_runs(experiment_names=["ragops"], filter_string="tags.`ragops.name` = 'validate'", order_by=["start_time DESC"])
    failed = runs.iloc[0]
    assert failed["status"] == "FAILED"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(failed["run_id"], "validation")]
    assert artifacts == ["validation/corpus.json"]
    # Nothing downstream runs on the corpus that failed its gate, and nothing built is lost.
    for stage in (stages.split, stages.chunk):
        with pytest.raises(ValidationFailed, match="failed validation"):
            stage(ws, config)
    assert path_hash(ws.benchmark_dir) == benchmark_before


def test_pipeline_run_logs_parent_and_child_runs_with_lineage_tags(copy_workspace):
    ws = Workspace(copy_workspace())
    config = load_config(ws.params)
    # force two stages to run so that the parent gets children
    (ws.index_dir / stages.MANIFEST).unlink()
    (ws.retrieval_eval_dir / stages.MANIFEST).unlink()
    outcomes = stages.run_pipeline(ws, config, architectures=[], with_compare=False, progress=False)
    assert not outcomes["index"].skipped and outcomes["embed"].skipped
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("ragops")
    parents = client.search_runs([experiment.experiment_id], "tags.`ragops.kind` = 'pipeline'", order_by=["start_time DESC"])
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = {run.data.tags["ragops.name"] for run in children}
    assert names == {"index", "eval_retrieval"}
    for run in children:
        assert run.data.tags["git_commit"]
        assert run.data.tags["profile"] == "smoke"
        assert run.data.metrics["stage/wall_s"] > 0
        assert "stage/peak_rss_mb" in run.data.metrics
    index_run = next(r for r in children if r.data.tags["ragops.name"] == "index")
    assert index_run.data.params["index.factory"] == "Flat"
    assert index_run.data.metrics["index/vectors"] > 0
    assert os.environ.get("RAGOPS_PARENT_RUN_ID") is None  # never leaks out of the pipeline
