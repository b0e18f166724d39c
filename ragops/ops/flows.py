"""Prefect flows: `refresh` (data plane), `evaluate` (architectures + comparison) and `pipeline`
(both, under one MLflow parent run). The deployable entry points are re-exported by the top-level
`flows` package (`python -m flows.pipeline`); they live here, in the ops adapter layer, so that the
`ragops` package (the CLI's `run --prefect` and `server`) never imports upward into `flows/`.

Thin by design: each task calls one `ragops.stages` function, which skips itself when its inputs
are unchanged (content-hash manifests) and logs its own MLflow child run. Prefect adds
scheduling, retries of transient failures, fan-out on the configured task runner, the workspace
guard, and a summary of every run as Prefect artifacts.

Every flow takes `workspace` (the project folder), `params` (default `<workspace>/params.yaml`)
and `profile` (default: params.yaml's `profile`). Run one with `python -m flows.pipeline` or
`ragops run --prefect`; schedules come from `ragops.ops.deploy` (`ragops server`).

Adding a stage: give it a task in STAGE_TASKS and one `orch.run_recorded(...)` line in the flow
that runs it (and its name in that flow's planned list).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ragops.ops import orchestration as orch
from ragops.ops import sharding
from ragops.pipeline import REFRESH_STAGES, trains_after, training_order  # defined once, in ragops.pipeline


def _stage_task(stage: str):
    """A task running `ragops.stages.<stage>`. No Prefect cache: the stage skips itself from its
    content-hash manifest. Retries (with delays) only where a failure can be transient."""
    retries, delays = orch.RETRIES.get(stage, (0, [0]))
    return task(
        orch.stage_task,
        name=stage,
        task_run_name=stage,
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=delays,
        retry_condition_fn=orch.retry_transient if retries else None,
    )


STAGE_TASKS = {name: _stage_task(name) for name in [*REFRESH_STAGES, "prepare_lm", "train_architecture", "evaluate_architecture", "compare"]}
embed_shard_task = task(sharding.embed_shard, name="embed_shard", task_run_name="embed-shard-{start}-{end}", cache_policy=NO_CACHE)


@flow(name="embed-shards", flow_run_name="embed-shards", log_prints=True)
def embed_shards(workspace: str, params: str | None, profile: str | None, ranges: list[tuple[int, int]], parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """Fan the embedding out over the task runner: one task per block-aligned row range."""
    tracking_uri = orch.current_tracking_uri()
    futures = [
        embed_shard_task.submit(workspace, params, profile, start, end, parent_run_id, tracking_uri)
        for start, end in ranges
    ]
    return [future.result() for future in futures]


@flow(name="architectures", flow_run_name="train-and-evaluate-architectures", log_prints=True)
def architectures_flow(workspace: str, params: str | None, profile: str | None, names: list[str], parent_run_id: str) -> dict[str, Any]:
    """Train (when it trains and its settings changed) then evaluate each architecture, submitted to
    the task runner: on Dask, independent architectures train and evaluate in parallel processes.
    One failing architecture does not stop the others; failures are returned, not raised."""
    tracking_uri = orch.current_tracking_uri()
    _, config = orch.load(workspace, params, profile)
    trained: dict[str, Any] = {}
    for name in training_order(config, names):  # a variant trains after the base whose weights it may reuse
        after = trains_after(config, name)
        trained[name] = (
            STAGE_TASKS["train_architecture"]
            .with_options(task_run_name=f"train-{name}")
            .submit("train_architecture", workspace, params, profile, parent_run_id, {"name": name, "progress": False}, tracking_uri,
                    wait_for=[trained[after]] if after in trained else [])
        )
    evaluated = {
        name: STAGE_TASKS["evaluate_architecture"]
        .with_options(task_run_name=f"evaluate-{name}")
        .submit("evaluate_architecture", workspace, params, profile, parent_run_id, {"name": name, "progress": False}, tracking_uri,
                wait_for=[trained[name]])
        for name in names
    }
    outcomes, failed = {}, {}
    for name in names:
        for label, future in ((f"train@{name}", trained[name]), (f"evaluate@{name}", evaluated[name])):
            try:
                outcomes[label] = orch.unwrap(future.result())
            except Exception as exc:  # noqa: BLE001 - reported by the caller
                failed[label] = f"{type(exc).__name__}: {exc}"
                break  # an architecture that failed to train is not evaluated
    return {"outcomes": outcomes, "failed": failed}


@flow(name="refresh", flow_run_name=orch.flow_run_name("refresh"), log_prints=True)
def refresh(
    workspace: str = ".",
    params: str | None = None,
    profile: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """ingest → validate → split → chunk → embed → index → eval_retrieval. Stages whose inputs
    did not change skip themselves; a failing gate (validate, chunk) stops the flow."""
    orch.check_deployment_parameters(workspace, params=params, source=source)
    ws, config = orch.load(workspace, params, profile)
    record = orch.RunRecord("refresh", planned=list(REFRESH_STAGES), workspace=str(ws.root))
    with orch.workspace_guard(ws, config, "refresh") as guard:
        if not guard.acquired:
            return orch.skipped(record, guard.reason)
        ranges: list[tuple[int, int]] = []
        pid = None
        try:
            with orch.parent_run(ws, config, "refresh") as pid:
                common = (workspace, params, profile, pid)
                orch.run_recorded(record, "ingest", STAGE_TASKS["ingest"], "ingest", *common, {"source": source})
                for stage in ("validate", "split", "chunk"):
                    orch.run_recorded(record, stage, STAGE_TASKS[stage], stage, *common)
                ranges = sharding.embed_plan(workspace, params, profile)
                if ranges:
                    runner = orch.make_task_runner(config)
                    embed_shards.with_options(task_runner=runner)(workspace, params, profile, ranges, pid)
                orch.run_recorded(record, "embed", STAGE_TASKS["embed"], "embed", *common, {"progress": False})
                orch.run_recorded(record, "index", STAGE_TASKS["index"], "index", *common)
                orch.run_recorded(record, "eval_retrieval", STAGE_TASKS["eval_retrieval"], "eval_retrieval", *common, {"progress": False})
        finally:
            result = orch.finish(record, parent_run_id=pid, embed_shards=len(ranges))
    return result


@flow(name="evaluate", flow_run_name=orch.flow_run_name("evaluate"), log_prints=True)
def evaluate(
    workspace: str = ".",
    params: str | None = None,
    profile: str | None = None,
    architectures: list[str] | None = None,
) -> dict[str, Any]:
    """prepare_lm → every enabled architecture (train when it trains and its settings changed, then
    evaluate; fanned out on the configured task runner) → compare (table, Pareto plots, champion)."""
    orch.check_deployment_parameters(workspace, params=params, source=None)
    ws, config = orch.load(workspace, params, profile)
    names = list(architectures or config.enabled_architectures())
    planned = ["prepare_lm", *[f"{stage}@{n}" for n in names for stage in ("train", "evaluate")], "compare"]
    record = orch.RunRecord("evaluate", planned=planned, workspace=str(ws.root))
    with orch.workspace_guard(ws, config, "evaluate") as guard:
        if not guard.acquired:
            return orch.skipped(record, guard.reason)
        pid = None
        try:
            with orch.parent_run(ws, config, "evaluate") as pid:
                common = (workspace, params, profile, pid)
                orch.run_recorded(record, "prepare_lm", STAGE_TASKS["prepare_lm"], "prepare_lm", *common)
                runner = orch.make_task_runner(config)
                fanned = architectures_flow.with_options(task_runner=runner)(workspace, params, profile, names, pid)
                for label, outcome in fanned["outcomes"].items():
                    record.add(outcome, label)
                record.failed.update(fanned["failed"])
                if any(label.startswith("evaluate@") for label in fanned["outcomes"]):
                    orch.run_recorded(record, "compare", STAGE_TASKS["compare"], "compare", *common)
                if fanned["failed"]:
                    raise RuntimeError("architectures failed: " + "; ".join(f"{n}: {e}" for n, e in fanned["failed"].items()))
        finally:
            result = orch.finish(record, parent_run_id=pid)
    return result


@flow(name="pipeline", flow_run_name=orch.flow_run_name("pipeline"), log_prints=True)
def pipeline(
    workspace: str = ".",
    params: str | None = None,
    profile: str | None = None,
    source: str | None = None,
    architectures: list[str] | None = None,
) -> dict[str, Any]:
    """refresh then evaluate, under one MLflow parent run, holding the workspace for both."""
    orch.check_deployment_parameters(workspace, params=params, source=source)
    ws, config = orch.load(workspace, params, profile)
    record = orch.RunRecord("pipeline", planned=[*REFRESH_STAGES, "prepare_lm", "compare"], workspace=str(ws.root))
    with orch.workspace_guard(ws, config, "pipeline") as guard:
        if not guard.acquired:
            return orch.skipped(record, guard.reason)
        pid = None
        try:
            with orch.parent_run(ws, config, "pipeline") as pid:  # the subflows log under this MLflow run
                for name, subflow, extra in (("refresh", refresh, {"source": source}), ("evaluate", evaluate, {"architectures": architectures})):
                    try:
                        result = orch.unwrap(subflow(workspace, params, profile, **extra))
                    except BaseException as exc:
                        record.failed[name] = f"{type(exc).__name__}: {exc}"
                        raise
                    record.outcomes.extend(result["outcomes"])
            from ragops.stages import record_in_dvc_lock

            record_in_dvc_lock(ws, config)
        finally:
            result = orch.finish(record, parent_run_id=pid)
    return result
