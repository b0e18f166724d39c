"""MLflow tracking: one parent run per pipeline run, one child run per stage or architecture.

The store is SQLite under mlruns/ with artifacts under mlruns/artifacts (MLflow 3.x refuses the
plain ./mlruns file store). The parent run id is always passed explicitly (argument or the
RAGOPS_PARENT_RUN_ID environment variable, which DVC stages started from a pipeline inherit):
MLflow's active run is per thread, and MLFLOW_RUN_ID would override it silently.

Every run is tagged with the git commit and the corpus/index hashes DVC recorded, so a number in
the MLflow UI can be traced to the exact data and code that produced it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ragops.config import Config
from ragops.cost import CostMeter, Phase
from ragops.paths import Workspace

PARENT_ENV = "RAGOPS_PARENT_RUN_ID"


def _mlflow():
    import mlflow  # imported lazily: ~3 s, and the library must be usable without it

    return mlflow


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_hashes(root: Path) -> dict[str, str]:
    """md5s DVC recorded for the corpus (data.dvc) and for each stage's outputs (dvc.lock)."""
    hashes: dict[str, str] = {}
    data_dvc = root / "data.dvc"
    if data_dvc.exists():
        outs = (yaml.safe_load(data_dvc.read_text()) or {}).get("outs") or []
        if outs:
            hashes["corpus_md5"] = str(outs[0].get("md5", ""))
    lock = root / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
        for stage, tag in (("index", "index_md5"), ("chunk", "chunks_md5"), ("lm", "lm_md5")):
            outs = (stages.get(stage) or {}).get("outs") or []
            if outs:
                hashes[tag] = str(outs[0].get("md5", ""))
    return hashes


def ensure_experiment(ws: Workspace, name: str) -> str:
    """Create (or find) the experiment, with its artifacts under mlruns/artifacts."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ws.mlruns / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifacts = (ws.mlruns / "artifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return flat
    return {prefix: value}


@dataclass
class TrackedRun:
    """A started MLflow run plus the cost meter(s) that will be logged when it ends."""

    run_id: str
    meters: list[CostMeter] = field(default_factory=list)
    cost_rates: tuple[float, float] = (0.05, 2.5)

    def meter(self, phase: Phase = "stage") -> CostMeter:
        meter = CostMeter(phase)
        self.meters.append(meter)
        return meter

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        _mlflow().log_metrics(clean, step=step, run_id=self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow = _mlflow()
        flat = {k: (str(v)[:6000] if v is not None else "null") for k, v in flatten("", params).items()}
        mlflow.log_params(flat, run_id=self.run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            _mlflow().log_artifacts(str(path), artifact_path=artifact_path, run_id=self.run_id)
        elif path.exists():
            _mlflow().log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        _mlflow().log_dict(obj, artifact_file, run_id=self.run_id)



@contextlib.contextmanager
def tracked_run(
    ws: Workspace,
    config: Config,
    name: str,
    *,
    kind: str = "stage",
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> Iterator[TrackedRun]:
    """Start an MLflow run named `name` (a child of `parent_run_id` or $RAGOPS_PARENT_RUN_ID if set).

    Cost meters created with `run.meter(phase)` are logged when the block ends; a failing block
    marks the run FAILED and re-raises.
    """
    mlflow = _mlflow()
    ensure_experiment(ws, config.tracking.experiment)
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    all_tags = {
        "ragops.kind": kind,
        "ragops.name": name,
        "profile": config.profile,
        "git_commit": git_commit(ws.root),
        **dvc_hashes(ws.root),
        **(tags or {}),
    }
    nested = mlflow.active_run() is not None
    run = mlflow.start_run(run_name=name, parent_run_id=parent, nested=nested or bool(parent), tags={k: str(v) for k, v in all_tags.items()})
    handle = TrackedRun(run.info.run_id, cost_rates=(config.tracking.cost_per_cpu_hour_usd, config.tracking.cost_per_gpu_hour_usd))
    try:
        if params:
            handle.log_params(params)
        yield handle
    except BaseException:
        _log_meters(handle)
        mlflow.end_run(status="FAILED")
        raise
    _log_meters(handle)
    mlflow.end_run(status="FINISHED")


def _log_meters(handle: TrackedRun) -> None:
    for meter in handle.meters:
        if meter.wall_s or any(meter.counters.values()):
            handle.log_metrics(meter.metrics(*handle.cost_rates))


@contextlib.contextmanager
def pipeline_run(ws: Workspace, config: Config, name: str = "pipeline") -> Iterator[TrackedRun]:
    """The parent run of one pipeline run; children started inside (any thread, any subprocess) attach to it."""
    previous = os.environ.get(PARENT_ENV)
    os.environ.pop(PARENT_ENV, None)
    with tracked_run(ws, config, name, kind="pipeline", params=config.model_dump(by_alias=True, mode="json")) as run:
        os.environ[PARENT_ENV] = run.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous
