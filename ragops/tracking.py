"""MLflow tracking: one parent run per pipeline run, one child run per stage or architecture.

The store is SQLite under mlruns/ with artifacts under mlruns/artifacts (MLflow 3.x refuses the
plain ./mlruns file store). The parent run id is always passed explicitly (argument or the
RAGOPS_PARENT_RUN_ID environment variable, which DVC stages started from a pipeline inherit):
MLflow's active run is per thread, and MLFLOW_RUN_ID would override it silently.

Every run is tagged with the git commit and the corpus/index hashes DVC recorded, so a number in
the MLflow UI can be traced to the exact data and code that produced it, and with the process
(`ragops.pid`, `ragops.host`) that runs it: a run whose process was killed (kill -9, OOM, a
power cut) stays RUNNING in MLflow, so the next run on that host marks it KILLED.

The workspace's own store records absolute artifact paths (MLflow has no relative artifact
locations); a workspace that was copied or moved is re-rooted when its first run starts, so it
writes its artifacts into itself, never into the folder it was copied from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ragops.config import Config
from ragops.cost import CostMeter, Phase
from ragops.paths import Workspace

PARENT_ENV = "RAGOPS_PARENT_RUN_ID"
PID_TAG, HOST_TAG, PROCESS_START_TAG = "ragops.pid", "ragops.host", "ragops.process_start"
KILLED_TAG = "ragops.killed"
CI_SUFFIXES = ("_ci_low", "_ci_high")
CI_TAG_PREFIX = "ci/"
#: Runs of these kinds are long enough (minutes) for MLflow's system metrics to say something.
SYSTEM_METRICS_KINDS = frozenset({"pipeline", "train", "architecture", "sweep"})
SYSTEM_METRICS_STAGES = frozenset({"embed", "eval_retrieval", "prepare_lm"})

log = logging.getLogger("ragops.tracking")


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
    """Create (or find) the experiment, with its artifacts under mlruns/artifacts; re-root a copied
    workspace's store onto itself and mark runs whose process is gone as KILLED (once per process)."""
    mlflow = _mlflow()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ws.mlruns / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    artifacts = (ws.mlruns / "artifacts").resolve()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifacts.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    else:
        experiment_id = experiment.experiment_id
        reroot_artifacts(ws, uri, experiment.artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    key = (uri, experiment_id)
    with _reaped_lock:
        first = key not in _reaped
        _reaped.add(key)
    if first:
        mark_killed_runs(mlflow.MlflowClient(tracking_uri=uri), experiment_id)
    return experiment_id


# ------------------------------------------------------------------------------------------------
# A copied or moved workspace writes into itself
# ------------------------------------------------------------------------------------------------

#: (table, column) pairs of MLflow 3's SQL schema that hold artifact locations.
_ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
    ("model_versions", "source"), ("model_versions", "storage_location"),
)


def _own_store(ws: Workspace, uri: str) -> Path | None:
    """The workspace's SQLite store file when `uri` is it (not a server, not another folder's store)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return db if db.parent == ws.mlruns.resolve() else None


def reroot_artifacts(ws: Workspace, uri: str, location: str | None) -> int:
    """When the workspace's own store points at another folder's `mlruns/artifacts` (the workspace
    was copied or moved: MLflow stores absolute locations), rewrite every stored artifact location
    under it to this workspace's `mlruns/artifacts`. Returns the number of rows changed.

    MLflow has no API to change an experiment's artifact location, so the rows are rewritten in the
    SQLite store itself (the copied artifacts are already in place, under the same relative paths).
    Locations elsewhere (s3://, a server's mlflow-artifacts:/, a store outside the workspace) are
    left alone.
    """
    db = _own_store(ws, uri)
    if db is None or not location:
        return 0
    own = (ws.mlruns / "artifacts").resolve()
    if location.startswith("file://"):
        old_path = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    elif location.startswith("/"):
        old_path = Path(location)
    else:  # s3://, mlflow-artifacts:/, ...: not a folder of this machine
        return 0
    if old_path.name != "artifacts" or old_path.parent.name != "mlruns" or old_path == own:
        return 0
    # Both spellings MLflow writes: a file:// URI and a bare path.
    prefixes = [(old_path.as_uri(), own.as_uri()), (str(old_path), str(own))]
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn, conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in _ARTIFACT_COLUMNS:
            if table not in tables or column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                continue
            for old, new in prefixes:
                cursor = conn.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/"),
                )
                changed += cursor.rowcount
    own.mkdir(parents=True, exist_ok=True)
    log.info("workspace moved or copied: MLflow artifact locations re-rooted from %s to %s (%d rows)", old_path, own, changed)
    return changed


# ------------------------------------------------------------------------------------------------
# Runs whose process was killed
# ------------------------------------------------------------------------------------------------

_reaped: set[tuple[str, str]] = set()
_reaped_lock = threading.Lock()


def _process_tags() -> dict[str, str]:
    import psutil

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), PROCESS_START_TAG: f"{psutil.Process().create_time():.2f}"}


def process_alive(pid: int, started: float | None = None) -> bool:
    """True when process `pid` runs on this host and (if `started` is known) is the same process,
    not a later one that reused the pid."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.Error:
        return False


def mark_killed_runs(client, experiment_id: str) -> list[str]:
    """Mark RUNNING runs of `experiment_id` started on this host by a process that no longer exists
    as KILLED, with a `ragops.killed` tag saying why. Runs of other hosts (unknowable from here)
    and runs without process tags are left alone. Returns the run ids marked."""
    host = socket.gethostname()
    try:
        runs = client.search_runs(
            [experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'", max_results=1000
        )
    except Exception as error:  # noqa: BLE001 - bookkeeping must never stop a run
        log.debug("could not look for killed runs: %s", error)
        return []
    marked = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags[PID_TAG])
            started = float(tags[PROCESS_START_TAG]) if PROCESS_START_TAG in tags else None
        except (KeyError, ValueError):
            continue
        if process_alive(pid, started):
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        client.set_tag(run.info.run_id, KILLED_TAG, f"process {pid} on {host} was gone at {when} (found by pid {os.getpid()}); marked KILLED")
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    if marked:
        log.warning("marked %d MLflow run(s) KILLED: their process is gone (%s)", len(marked), ", ".join(marked))
    return marked


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

    def log_table(self, table, artifact_file: str) -> None:
        """A DataFrame as an MLflow table (a .json artifact the UI previews and `mlflow.load_table` reads)."""
        import pandas as pd

        # Through JSON: numpy arrays in cells (list columns read from Parquet) become lists, NaN None.
        records = json.loads(table.to_json(orient="records", default_handler=str))
        _mlflow().log_table(pd.DataFrame.from_records(records, columns=list(table.columns)), artifact_file, run_id=self.run_id)

    def log_results(self, metrics: dict[str, float], artifact_file: str = "metrics_ci.json") -> None:
        """Quality metrics with bootstrap CIs: the point values as metrics (one chart each), the
        `_ci_low`/`_ci_high` bounds as one table artifact and as `ci/<metric>` tags ("[low, high]",
        lined up by MLflow's compare view), so the bounds do not each add a chart."""
        point = {k: v for k, v in metrics.items() if not k.endswith(CI_SUFFIXES)}
        self.log_metrics(point)
        rows, tags = [], {}
        for key, value in point.items():
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            if low is None or high is None:
                continue
            rows.append({"metric": key, "value": value, "ci_low": low, "ci_high": high})
            tags[f"{CI_TAG_PREFIX}{key}"] = json.dumps([low, high])
        if rows:
            import pandas as pd

            _mlflow().MlflowClient().log_batch(self.run_id, tags=[_tag(k, v) for k, v in tags.items()])
            self.log_table(pd.DataFrame(rows), artifact_file)

    def log_dataset(self, table, *, name: str, source: str | Path, context: str, targets: str | None = None) -> None:
        """Record `table` as an input dataset of this run (name, digest, schema, source), shown in
        the run's and the experiment's dataset views."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            # MLflow registers its local-file source twice (schemes "" and "file") and warns that a
            # path matches both; either one records the same source.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(table, source=Path(source).resolve().as_uri(), name=name, targets=targets)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=context)])
        _mlflow().MlflowClient().log_inputs(self.run_id, datasets=[entity])


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def ci_bounds(tags: dict[str, str]) -> dict[str, float]:
    """`{<metric>_ci_low: .., <metric>_ci_high: ..}` from a run's `ci/<metric>` tags (see `log_results`)."""
    bounds = {}
    for key, value in tags.items():
        if key.startswith(CI_TAG_PREFIX):
            with contextlib.suppress(ValueError, TypeError):
                low, high = json.loads(value)
                metric = key[len(CI_TAG_PREFIX):]
                bounds[f"{metric}_ci_low"], bounds[f"{metric}_ci_high"] = float(low), float(high)
    return bounds


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
    system_metrics: bool | None = None,
) -> Iterator[TrackedRun]:
    """Start an MLflow run named `name` (a child of `parent_run_id` or $RAGOPS_PARENT_RUN_ID if set).

    Cost meters created with `run.meter(phase)` are logged when the block ends; a failing block
    marks the run FAILED and re-raises. `system_metrics` (default: for long runs, see
    SYSTEM_METRICS_KINDS) samples CPU, memory, disk and network every
    $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (`ragops.env` sets 15) into `system/*`.
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
        **_process_tags(),
        **(tags or {}),
    }
    if system_metrics is None:
        system_metrics = kind in SYSTEM_METRICS_KINDS or (kind == "stage" and name in SYSTEM_METRICS_STAGES)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Started monitoring ..." for every run
    nested = mlflow.active_run() is not None
    run = mlflow.start_run(
        run_name=name, parent_run_id=parent, nested=nested or bool(parent), tags={k: str(v) for k, v in all_tags.items()},
        log_system_metrics=system_metrics,
    )
    handle = TrackedRun(run.info.run_id, cost_rates=(config.tracking.cost_per_cpu_hour_usd, config.tracking.cost_per_gpu_hour_usd))
    try:
        if params:
            handle.log_params(params)
        yield handle
    except BaseException as error:
        _log_meters(handle)
        # Ctrl-C / SIGTERM: the run was stopped, not broken.
        mlflow.end_run(status="KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED")
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
