"""Prefect support for the flows in `flows/`: configuration loading, the task runner, the
workspace guard (file lock + Prefect global concurrency limit), stage invocation, and the run's
artifacts (markdown summary, statistics and comparison tables).

The flows stay thin: every task calls one `ragops.stages` function through `call_stage`.

What a Prefect user sees: flow runs named by what they do (`pipeline-smoke-20261202-0300`), one
task run per stage, stages whose inputs did not change in a distinct `Skipped` state (a kind of
Completed), ragops' own log lines in each run's logs, and artifacts: a markdown summary, tables,
and a link to the MLflow run. The MLflow parent run id is passed to subflows internally (a context
variable), never as a deployment parameter. Runs started from a deployment check their parameters
(`check_deployment_parameters`): the server has no say over which folders a flow run may touch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from ragops.errors import ConfigError
from ragops.ops.lock import WorkspaceBusy, workspace_lock
from ragops.paths import Workspace

log = logging.getLogger("ragops.flows")

#: Prefect global concurrency limit every pipeline/refresh/evaluate run holds (created by `ragops server`).
GLOBAL_LIMIT = "ragops-workspace"
#: Stages whose failures can be transient (file-system / network I/O): retried with a delay.
RETRIES: dict[str, tuple[int, list[float]]] = {
    "ingest": (3, [10, 30, 60]),
    "compare": (2, [10, 30]),  # reads and writes the MLflow store / registry (a server, possibly)
}
#: Exceptions treated as transient; anything else (a RagopsError, a bug) fails at once.
TRANSIENT = (OSError, TimeoutError, ConnectionError)


# ------------------------------------------------------------------------------------------------
# Configuration and stage calls
# ------------------------------------------------------------------------------------------------


def load(workspace: str | Path = ".", params: str | Path | None = None, profile: str | None = None, tracking_uri: str | None = None):
    """(Workspace, Config) for a flow or task; also sets the tool environment (in Dask workers too).

    `tracking_uri`: the MLflow store of the flow that submitted the task. A Dask worker (possibly
    started long before, on another host) does not share the flow's environment, so tasks carry it.
    """
    from ragops.params import load_config
    from ragops.env import configure_environment

    ws = Workspace(workspace)
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    configure_environment(ws.root)
    # Prefect attaches its handlers (console, API) to the `ragops` logger but leaves its level at
    # the root's WARNING: the stages' INFO lines ("index: running") would not reach the run's logs.
    ragops_logger = logging.getLogger("ragops")
    if ragops_logger.level == logging.NOTSET or ragops_logger.level > logging.INFO:
        ragops_logger.setLevel(logging.INFO)
    return ws, load_config(params or ws.params, profile)


def current_tracking_uri() -> str | None:
    """The MLflow store this process logs to (passed along with every task)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def outcome_dict(outcome: Any) -> dict[str, Any]:
    data = asdict(outcome) if is_dataclass(outcome) else dict(outcome)
    data.setdefault("run_id", None)
    return data


def call_stage(
    stage: str,
    workspace: str,
    params: str | None,
    profile: str | None,
    parent_run_id: str | None,
    options: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Run one `ragops.stages` function (`options` are its extra keyword arguments) and return its
    StageOutcome as a dict (picklable, JSON-able)."""
    from ragops import stages

    ws, config = load(workspace, params, profile, tracking_uri)
    function = getattr(stages, stage)
    return outcome_dict(function(ws, config, parent_run_id=parent_run_id, **(options or {})))


def stage_task(*args: Any, **kwargs: Any):
    """`call_stage` as a Prefect task body: a stage that skipped itself (inputs unchanged) ends in
    a Completed state named `Skipped`, so the UI tells it from one that ran. Callers get the
    outcome dict back through `unwrap`."""
    from prefect.states import Completed

    outcome = call_stage(*args, **kwargs)
    if outcome.get("skipped"):
        return Completed(name="Skipped", message="inputs and parameters unchanged", data=outcome)
    return outcome


def unwrap(value: Any) -> Any:
    """The data of a task's or flow's returned State (see `stage_task`), or the value itself."""
    from prefect.states import State

    return value.result() if isinstance(value, State) else value


#: The MLflow parent run of the flow run in progress, for its subflows (never a flow parameter:
#: a deployment would show it, and a caller could attach runs to any run id).
_parent_run_id: ContextVar[str | None] = ContextVar("ragops_parent_run_id", default=None)


@contextlib.contextmanager
def parent_run(ws: Workspace, config, name: str) -> Iterator[str]:
    """The MLflow parent run id for a flow: the enclosing flow's (a subflow of `pipeline`), or a
    new `ragops.kind=pipeline` run named after the flow."""
    inherited = _parent_run_id.get()
    if inherited:
        yield inherited
        return
    from ragops.tracking import pipeline_run

    with pipeline_run(ws, config, name) as run:
        token = _parent_run_id.set(run.run_id)
        try:
            yield run.run_id
        finally:
            _parent_run_id.reset(token)


def flow_run_name(flow: str) -> Callable[[], str]:
    """A `flow_run_name` callable: `<flow>-<profile>-<YYYYmmdd-HHMMSS>` (the profile resolved from
    the run's `profile` parameter or its params.yaml), instead of Prefect's random names."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters or {}
        profile = parameters.get("profile")
        if not profile:
            try:
                from ragops.params import load_config

                workspace = Workspace(parameters.get("workspace") or ".")
                profile = load_config(parameters.get("params") or workspace.params).profile
            except Exception:  # noqa: BLE001 - a name must never fail a run; the run reports a bad config itself
                profile = "unknown-profile"
        return f"{flow}-{profile}-{time.strftime('%Y%m%d-%H%M%S')}"

    return name


def check_deployment_parameters(workspace: str, *, params: str | None, source: str | None) -> None:
    """Refuse parameters a deployment run must not take (anyone who can reach the Prefect server
    can start a deployment with any parameters): a workspace other than the deployment's own, a
    params file outside it, a corpus source outside the workspace and params.yaml's own
    `ingest.source`. Called before anything is read or written. Direct flow calls (`ragops run
    --prefect`, `python -m flows.pipeline`) are the caller's choice: not checked."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return
    # The deployment's own parameters (prefect.runtime.deployment.parameters are this run's).
    with get_client(sync_client=True) as client:
        defaults = client.read_deployment(deployment.id).parameters or {}
    root = Workspace(workspace).root
    own = Workspace(defaults.get("workspace") or ".").root
    if root != own:
        raise ConfigError(f"workspace '{workspace}': deployment '{deployment.name}' runs only on its own workspace {own}")
    if params and params != defaults.get("params") and not _resolve(params, root).is_relative_to(root):
        raise ConfigError(f"params '{params}': deployment '{deployment.name}' takes a params file inside {root} only")
    if source and source != "default":
        from ragops.params import load_config

        allowed = [root]
        configured = load_config(params or Workspace(root).params).ingest.source
        for folder in (configured, defaults.get("source")):
            if folder and folder != "default":
                allowed.append(_resolve(folder, root))
        if not any(_resolve(source, root).is_relative_to(folder) for folder in allowed):
            raise ConfigError(
                f"source '{source}': deployment '{deployment.name}' ingests only from {', '.join(str(f) for f in allowed)} "
                "(set ingest.source in params.yaml to allow another folder)"
            )


def _resolve(path: str, root: Path) -> Path:
    candidate = Path(path).expanduser()
    return (candidate if candidate.is_absolute() else root / candidate).resolve()


def is_transient(exc: BaseException | None) -> bool:
    from ragops.errors import RagopsError

    return isinstance(exc, TRANSIENT) and not isinstance(exc, RagopsError)


def retry_transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
    """Prefect `retry_condition_fn`: retry only I/O-ish failures, never user/config/validation errors."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001
        return is_transient(exc)
    return False


# ------------------------------------------------------------------------------------------------
# Task runner
# ------------------------------------------------------------------------------------------------


def make_task_runner(config):
    """The task runner named by `orchestration.task_runner`.

    - `dask`: `DaskTaskRunner` on `dask_address`, or a temporary local cluster of `dask_workers`
      single-threaded worker processes. Each fanned-out task (an architecture, an embedding shard)
      runs in its own process, so its cost meter (CPU seconds, peak memory) is its own.
    - `thread`: a one-thread pool: tasks still go through the task runner (and show in the UI),
      but run one at a time. Torch already uses every core inside one task, and concurrent tasks
      in one process would count each other's CPU time in their cost meters.

    Dask's `tcp://` protocol has neither authentication nor encryption: anyone who reaches the
    scheduler can run code on the workers. Use a `tls://` address; the client's certificates come
    from Dask's configuration (`DASK_DISTRIBUTED__COMM__TLS__CA_FILE`,
    `DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT`, `DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY`, or
    the same keys in ~/.config/dask/*.yaml), with the scheduler started with `--tls-ca-file`,
    `--tls-cert`, `--tls-key` (mutual TLS: it accepts only clients whose certificate the CA signed).
    """
    orchestration = config.orchestration
    if orchestration.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orchestration.dask_address:
            address = orchestration.dask_address
            if address.startswith("tls://"):
                return DaskTaskRunner(address=address, client_kwargs={"security": dask_security(address)})
            host = address.split("://", 1)[-1].rsplit(":", 1)[0]
            from ragops.ops.servers import is_loopback

            if not is_loopback(host):
                log.warning(
                    "orchestration.dask_address %s: Dask's tcp:// protocol is unauthenticated and unencrypted "
                    "(anyone who reaches the scheduler can run code on its workers); use a tls:// address", address,
                )
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": orchestration.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,  # nothing listens beyond the scheduler on 127.0.0.1
                "host": "127.0.0.1",
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def dask_security(address: str):
    """The client's `distributed.Security` for a `tls://` scheduler, from Dask's configuration;
    a one-line ConfigError naming the missing settings when the certificates are not configured."""
    from distributed import Security

    security = Security(require_encryption=True)
    missing = [
        env for field_name, env in (
            ("tls_ca_file", "DASK_DISTRIBUTED__COMM__TLS__CA_FILE"),
            ("tls_client_cert", "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"),
            ("tls_client_key", "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"),
        ) if not getattr(security, field_name)
    ]
    if missing:
        raise ConfigError(
            f"params.yaml: orchestration.dask_address {address}: a tls:// scheduler needs the client's CA file, "
            f"certificate and key in Dask's configuration (missing: {', '.join(missing)})"
        )
    return security


# ------------------------------------------------------------------------------------------------
# Workspace guard
# ------------------------------------------------------------------------------------------------


@dataclass
class Guard:
    acquired: bool
    reason: str | None = None
    outermost: bool = True


@contextlib.contextmanager
def workspace_guard(ws: Workspace, config, what: str) -> Iterator[Guard]:
    """Hold the workspace for a flow run: the file lock (always), then the Prefect global
    concurrency limit `ragops-workspace` (when the server has one). Waits up to
    `orchestration.lock_timeout_s`; yields `Guard(acquired=False, reason=...)` instead of raising
    when the workspace is busy, so the flow can skip cleanly. Re-entrant for subflows."""
    timeout = config.orchestration.lock_timeout_s
    with contextlib.ExitStack() as stack:
        try:
            outermost = stack.enter_context(workspace_lock(ws, timeout, what=what))
        except WorkspaceBusy as busy:
            guard = Guard(False, str(busy))
        else:
            if outermost:
                reason = stack.enter_context(_global_limit(timeout))
                guard = Guard(reason is None, reason)
            else:
                guard = Guard(True, outermost=False)
        yield guard


@contextlib.contextmanager
def _global_limit(timeout_s: float) -> Iterator[str | None]:
    """Take one slot of GLOBAL_LIMIT; yields None when held (or when the server has no such limit:
    `strict=False`), or the reason it could not be taken."""
    from prefect.concurrency.sync import concurrency

    with contextlib.ExitStack() as stack:
        if not _global_limit_exists():  # e.g. the ephemeral server: the file lock alone guards the workspace
            yield None
            return
        try:
            stack.enter_context(concurrency(GLOBAL_LIMIT, occupy=1, timeout_seconds=max(timeout_s, 5.0), strict=False))
        except TimeoutError:
            reason = f"Prefect global concurrency limit '{GLOBAL_LIMIT}' is full (another run holds the workspace); skipping"
        else:
            reason = None
        yield reason


def _global_limit_exists() -> bool:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return bool(client.read_global_concurrency_limit_by_name(GLOBAL_LIMIT).active)
    except Exception:  # noqa: BLE001 - ObjectNotFound, or no server reachable
        return False


def ensure_global_limit(limit: int = 1) -> None:
    """Create (or reset) the `ragops-workspace` global concurrency limit on the current Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GLOBAL_LIMIT)
            client.update_global_concurrency_limit(GLOBAL_LIMIT, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
        except Exception:  # noqa: BLE001 - ObjectNotFound: create it
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GLOBAL_LIMIT, limit=limit, active=True))


# ------------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------------

CORPUS_STAGES = ("ingest", "validate", "split", "chunk")
INDEX_STAGES = ("embed", "index", "eval_retrieval")


@dataclass
class RunRecord:
    """What a flow run did, stage by stage, for its summary artifact."""

    flow: str
    started: float = field(default_factory=time.time)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    workspace: str | None = None
    mlflow_run_id: str | None = None

    def add(self, outcome: dict[str, Any], label: str | None = None) -> dict[str, Any]:
        self.outcomes.append({**outcome, "label": label or outcome["stage"]})
        return outcome

    def extend(self, other: RunRecord) -> None:
        self.outcomes.extend(other.outcomes)
        self.planned.extend(other.planned)
        self.failed.update(other.failed)

    def by_stage(self, stage: str) -> dict[str, Any] | None:
        for outcome in reversed(self.outcomes):
            if outcome["stage"] == stage:
                return outcome
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"flow": self.flow, "note": self.note, "failed": dict(self.failed), "outcomes": list(self.outcomes)}


def _scalar_items(summary: dict[str, Any], limit: int = 8) -> str:
    items = [f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(items[:limit])


def summary_markdown(record: RunRecord) -> str:
    """What changed (stages that ran), what was skipped (unchanged inputs) and what failed."""
    ran = [o for o in record.outcomes if not o["skipped"]]
    skipped = [o for o in record.outcomes if o["skipped"]]
    done = {o["label"] for o in record.outcomes} | set(record.failed)
    not_reached = [name for name in record.planned if name not in done]
    lines = [f"# ragops `{record.flow}` run", ""]
    if record.note:
        lines += [f"> {record.note}", ""]
    lines += [
        f"- duration: {time.time() - record.started:.1f} s",
        f"- MLflow run: {mlflow_run_line(record)}",
        f"- ran (inputs changed): {len(ran)}, skipped (unchanged): {len(skipped)}, failed: {len(record.failed)}",
        "",
        "| stage | status | details |",
        "|---|---|---|",
    ]
    for o in record.outcomes:
        status = "skipped (unchanged)" if o["skipped"] else "ran"
        details = _scalar_items(o.get("summary") or {})
        if o["stage"] == "compare":
            champion = (o.get("summary") or {}).get("champion") or {}
            details = f"champion: {champion.get('architecture', '—')} ({champion.get('metric', '')}={champion.get('value', '—')})"
        lines.append(f"| {o['label']} | {status} | {details.replace('|', '/')} |")
    for label, error in record.failed.items():
        lines.append(f"| {label} | **failed** | {error.replace('|', '/')[:300]} |")
    for label in not_reached:
        lines.append(f"| {label} | not reached | |")
    if ran:
        lines += ["", "**What changed:** " + ", ".join(o["label"] for o in ran) + " were rebuilt because their inputs or parameters changed."]
    if skipped:
        lines += ["", "**Unchanged:** " + ", ".join(o["label"] for o in skipped) + " (content hash matched their manifest)."]
    return "\n".join(lines) + "\n"


def mlflow_run_page(record: RunRecord) -> str | None:
    """The MLflow UI page of the run's MLflow parent run, when a UI is known: a tracking server
    (MLFLOW_TRACKING_URI=http...) or the `ragops ui` / `ragops server --ui-port` of this workspace."""
    if not record.mlflow_run_id:
        return None
    base = None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        base = uri
    elif record.workspace:
        from ragops.ops.servers import running_server

        base = running_server(Workspace(record.workspace), "mlflow")
    if not base:
        return None
    try:
        import mlflow

        experiment_id = mlflow.MlflowClient().get_run(record.mlflow_run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a convenience
        return None
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{record.mlflow_run_id}"


def mlflow_run_line(record: RunRecord) -> str:
    if not record.mlflow_run_id:
        return "none"
    page = mlflow_run_page(record)
    if page:
        return f"[{record.mlflow_run_id}]({page})"
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return f"`{record.mlflow_run_id}` in `{uri}` (open the UI with `ragops ui`)"


def stats_table(record: RunRecord, stages: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per (stage, statistic): the scalar statistics from the stage summaries."""
    rows = []
    for stage in stages:
        outcome = record.by_stage(stage)
        if outcome is None:
            continue
        for key, value in (outcome.get("summary") or {}).items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                rows.append({"stage": stage, "statistic": key, "value": value, "status": "skipped" if outcome["skipped"] else "ran"})
    return rows


def comparison_rows(record: RunRecord) -> list[dict[str, Any]]:
    outcome = record.by_stage("compare")
    if outcome is None:
        return []
    summary = outcome.get("summary") or {}
    return list(summary.get("display") or summary.get("table") or [])


def artifact_key(*parts: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_artifacts(record: RunRecord) -> dict[str, str]:
    """Prefect artifacts of this run (keys lowercase letters, digits, dashes):
    `ragops-<flow>-summary` (markdown), `ragops-corpus-stats`, `ragops-index-stats` and
    `ragops-comparison` (tables, when the run produced them), `ragops-<flow>-mlflow-run` (a link,
    when an MLflow UI is known) and `ragops-report` (the compare stage's decision report,
    markdown). Returns {key: kind}."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    made = {}
    page = mlflow_run_page(record)
    if page:
        key = artifact_key("ragops", record.flow, "mlflow-run")
        create_link_artifact(page, link_text=f"MLflow run {record.mlflow_run_id}", key=key,
                             description=f"ragops {record.flow}: the MLflow parent run (stages and architectures are its children)")
        made[key] = "link"
    key = artifact_key("ragops", record.flow, "summary")
    create_markdown_artifact(summary_markdown(record), key=key, description=f"ragops {record.flow}: what ran, what was skipped")
    made[key] = "markdown"
    for name, stages, description in (
        ("corpus-stats", CORPUS_STAGES, "corpus statistics from the ingest/validate/split/chunk stages"),
        ("index-stats", INDEX_STAGES, "embedding, index and retrieval statistics"),
    ):
        rows = stats_table(record, stages)
        if rows:
            create_table_artifact(rows, key=artifact_key("ragops", name), description=description)
            made[artifact_key("ragops", name)] = "table"
    rows = comparison_rows(record)
    if rows:
        create_table_artifact(rows, key="ragops-comparison", description="architectures: quality (95% CI) and cost")
        made["ragops-comparison"] = "table"
    report = report_markdown(record)
    if report:
        create_markdown_artifact(report, key="ragops-report", description="which architecture to ship: families, cost, paired comparisons, recommendation")
        made["ragops-report"] = "markdown"
    return made


def report_markdown(record: RunRecord) -> str | None:
    """The compare stage's decision report (report.md), when this run compared architectures."""
    outcome = record.by_stage("compare")
    files = ((outcome or {}).get("summary") or {}).get("files") or []
    path = next((Path(f) for f in files if Path(f).name == "report.md"), None)
    if path is None or not path.exists():
        return None
    # The plots are files beside report.md: a Prefect artifact cannot show them, it names them.
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(f"(plot: {path.parent / line.split('(', 1)[1].rstrip(')')})" if line.startswith("![") else line for line in lines) + "\n"


def run_recorded(record: RunRecord, label: str, function, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a task (or subflow) returning an outcome dict; record it, or record its failure and re-raise."""
    try:
        outcome = unwrap(function(*args, **kwargs))
    except BaseException as exc:
        record.failed[label] = f"{type(exc).__name__}: {exc}"
        raise
    return record.add(outcome, label)


def finish(record: RunRecord, **extra: Any) -> dict[str, Any]:
    """Publish the run's artifacts (never failing the run over an artifact) and return its result."""
    record.mlflow_run_id = record.mlflow_run_id or extra.get("parent_run_id")
    try:
        artifacts = publish_artifacts(record)
    except Exception as error:  # noqa: BLE001 - artifacts are a report, not the work
        log.warning("could not publish Prefect artifacts: %s", error)
        artifacts = {}
    return {**record.as_dict(), "artifacts": artifacts, **extra}


def skipped(record: RunRecord, reason: str | None):
    """The end of a run that found the workspace busy: logged, summarised, and a Completed state
    named `Skipped` (its data: the usual result dict, with `skipped` and `reason`)."""
    from prefect import get_run_logger
    from prefect.states import Completed

    record.note = f"skipped: {reason}"
    get_run_logger().warning("ragops %s skipped: %s", record.flow, reason)
    return Completed(name="Skipped", message=reason, data=finish(record, skipped=True, reason=reason))
