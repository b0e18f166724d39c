"""pytest fixtures for tests that need real servers (loaded by tests/conftest.py: `pytest_plugins`).

Kept in tests/: pytest is a dev extra, the installed package ships no pytest plugin.

- `prefect_server` (session): a real `prefect server start` on a free 127.0.0.1 port with a
  temporary PREFECT_HOME and a fast scheduler loop; stopped (whole process group) at the end.
- `prefect_api`: points this process's Prefect client at that server for one test.
- `mlflow_server_factory`: starts `mlflow server` processes on a given store; all stopped after the test.
- `log_fake_pipeline`: logs a real parent run with architecture child runs (real metrics) into the
  current MLflow store, for comparison tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ragops.ops.servers import ServerProcess, start_mlflow_server, start_prefect_server, stop_all
from ragops.paths import Workspace

#: Server-side settings that make schedules fire within seconds in tests.
FAST_SCHEDULER_ENV = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "5",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}

# Two architectures: the baseline is cheaper, the RAG one is better on describe/f1.
FAKE_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "closed_book": {
        "tags": {"family": "baseline", "finetune": "none"},
        "metrics": {
            "describe/f1": 0.20, "describe/f1_ci_low": 0.15, "describe/f1_ci_high": 0.26,
            "identify/em": 0.10, "lm/token_ppl": 30.0,
            "train/wall_s": 0.0, "train/cost_usd": 0.0,
            "inference/wall_s": 10.0, "inference/qa/cost_usd_per_1k_questions": 0.010, "inference/flops": 1e12,
        },
    },
    "incontext_ralm": {
        "tags": {"family": "black-box", "finetune": "none"},
        "metrics": {
            "describe/f1": 0.45, "describe/f1_ci_low": 0.38, "describe/f1_ci_high": 0.52,
            "identify/em": 0.30, "lm/token_ppl": 22.0,
            "train/wall_s": 0.0, "train/cost_usd": 0.0,
            "inference/wall_s": 25.0, "inference/qa/cost_usd_per_1k_questions": 0.030, "inference/flops": 3e12,
        },
    },
}


def log_fake_pipeline(ws: Workspace, config, architectures: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A real `pipeline` parent run with one real `ragops.kind=architecture` child per entry, with
    the given tags and metrics, in the current MLflow store. Returns {parent, children: {name: run_id}}."""
    from ragops.tracking import pipeline_run, tracked_run

    children = {}
    with pipeline_run(ws, config) as parent:
        for name, spec in (architectures or FAKE_ARCHITECTURES).items():
            with tracked_run(ws, config, name, kind="architecture", parent_run_id=parent.run_id,
                             tags={"architecture": name, **spec["tags"]}) as run:
                run.log_metrics(spec["metrics"])
                children[name] = run.run_id
    return {"parent": parent.run_id, "children": children}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("prefect-server")
    server = start_prefect_server(Workspace(root), prefect_home=root / ".prefect", log_dir=root / "logs", extra_env=FAST_SCHEDULER_ENV)
    try:
        yield server
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30, at_exit=False)  # send the last flow-run logs while the server is up
        server.stop()


@pytest.fixture
def prefect_api(prefect_server) -> str:
    """PREFECT_API_URL for this process (Prefect reads settings once at import: use temporary_settings)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"{prefect_server.url}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


@pytest.fixture
def mlflow_server_factory(tmp_path):
    """`start(ws, **kwargs) -> ServerProcess`; every server started is stopped after the test."""
    started: list[ServerProcess] = []

    def start(ws: Workspace | None = None, **kwargs: Any) -> ServerProcess:
        ws = ws or Workspace(tmp_path)
        kwargs.setdefault("log_dir", Path(tmp_path) / "server-logs")
        server = start_mlflow_server(ws, wait=False, **kwargs)
        started.append(server)
        return server.wait_healthy(kwargs.get("timeout_s", 180))

    try:
        yield start
    finally:
        stop_all(*started)
