"""Shared test fixtures: isolated tool state, a pre-migrated MLflow store, a tiny LM, a smoke workspace.

Everything is real (MLflow SQLite store, FAISS, the packaged MiniLM, GX, DVC, Prefect); only the
sizes are small. Tool state never touches the developer's ~/.prefect or the project's mlruns/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.server_fixtures"]  # real Prefect/MLflow server fixtures, shared across files
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ragops-tests-"))

# Before anything imports Prefect or MLflow: point every tool at the session's temp dir.
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlruns' / 'mlflow.db'}"
os.environ.pop("RAGOPS_PARENT_RUN_ID", None)
from ragops.env import configure_environment  # noqa: E402

configure_environment(_SESSION_DIR)


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_mlflow_db() -> Path:
    """An MLflow SQLite store with its migrations already run (7 s once instead of per test)."""
    import mlflow

    path = _SESSION_DIR / "template-mlflow.db"
    if not path.exists():
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, migrated_mlflow_db) -> str:
    """A fresh, real MLflow tracking store for one test; returns its URI."""
    import mlflow

    (tmp_path / "mlruns").mkdir(exist_ok=True)
    db = tmp_path / "mlruns" / "mlflow.db"
    shutil.copy(migrated_mlflow_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def tiny_lm_dir() -> Path:
    """A tiny Llama-style causal LM (random weights) and a BPE tokenizer trained here: no download."""
    from tests.builders import build_tiny_lm

    return build_tiny_lm(_SESSION_DIR / "tiny-lm")


def write_params(root: Path, **overrides) -> Path:
    """Copy the project's params.yaml into `root` with the smoke profile active and overrides merged in."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["profile"] = "smoke"

    def merge(base, extra):
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value

    merge(params, overrides)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def smoke_workspace(tiny_lm_dir, migrated_mlflow_db) -> Path:
    """A workspace whose data plane (300 documents) has been built once, in process, for the session.

    Tests that change it must copy it first (`copy_workspace`).
    """
    from ragops import stages
    from ragops.params import load_config
    from ragops.paths import Workspace

    root = _SESSION_DIR / "smoke-workspace"
    root.mkdir(exist_ok=True)
    (root / "mlruns").mkdir(exist_ok=True)
    shutil.copy(migrated_mlflow_db, root / "mlruns" / "mlflow.db")
    write_params(root, lm={"model": str(tiny_lm_dir)})
    ws = Workspace(root)
    config = load_config(ws.params)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    try:
        stages.ingest(ws, config)
        for name in stages.STAGE_ORDER[1:]:
            kwargs = {"progress": False} if name in ("embed", "eval_retrieval") else {}
            stages.DATA_STAGES[name](ws, config, **kwargs)
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = previous or ""
    return root


@pytest.fixture
def copy_workspace(smoke_workspace, tmp_path, monkeypatch):
    """A private copy of the smoke workspace (with its own MLflow store) that a test may change."""

    def make(name: str = "ws") -> Path:
        target = tmp_path / name
        shutil.copytree(smoke_workspace, target, symlinks=True, ignore=shutil.ignore_patterns(".cache"))
        # The embedding cache is content-addressed and read-only for tests: share it.
        if (smoke_workspace / ".cache").exists():
            shutil.copytree(smoke_workspace / ".cache", target / ".cache")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{target / 'mlruns' / 'mlflow.db'}")
        return target

    return make
