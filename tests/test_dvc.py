"""A real DVC repository: `dvc repro` builds the data plane from the ingested corpus, a second
`dvc repro` does nothing, and `dvc exp run -S` tries a variant that `dvc exp show` compares."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, write_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def dvc_repo(tmp_path, smoke_workspace, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(PROJECT_ROOT / "ragops", repo / "ragops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(PROJECT_ROOT / ".gitignore", repo / ".gitignore")
    write_params(repo, retrieval_eval={"max_questions": 10})
    # The embedding cache is content-addressed: reuse the session's so the test embeds nothing new.
    shutil.copytree(smoke_workspace / ".cache", repo / ".cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "ci@example.invalid")
    sh(repo, "git", "config", "user.name", "ci")
    sh(repo, "dvc", "init", "-q")
    return repo


def test_repro_from_ingested_corpus_then_noop_then_experiment(dvc_repo):
    repo = dvc_repo
    sh(repo, "ragops", "ingest")
    data_dvc = (repo / "data.dvc").read_text()
    assert "md5:" in data_dvc and "path: data" in data_dvc
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "corpus")

    first = sh(repo, "dvc", "repro", "eval_retrieval")
    for stage in ("validate", "split", "chunk", "embed", "index", "eval_retrieval"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((repo / "metrics" / "retrieval.json").read_text())
    assert 0 <= metrics["test/bm25/recall_at_10"] <= 1

    second = sh(repo, "dvc", "repro", "eval_retrieval")
    assert "Running stage" not in second.stdout
    assert "up to date" in sh(repo, "dvc", "status", "eval_retrieval", "--with-deps").stdout

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    sh(repo, "dvc", "exp", "run", "-S", "index.factory=HNSW16", "eval_retrieval")
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    factories = json.dumps(shown)
    assert "HNSW16" in factories and "Flat" in factories
    diff = sh(repo, "dvc", "params", "diff", "--json").stdout
    assert "HNSW16" in diff


def test_outputs_of_ragops_stages_are_recorded_so_dvc_repro_has_nothing_to_do(dvc_repo):
    """`ragops run` ends with `dvc commit`: the CLI and DVC agree on what is up to date."""
    from ragops import stages
    from ragops.params import load_config
    from ragops.paths import Workspace

    repo = dvc_repo
    ws = Workspace(repo)
    config = load_config(ws.params)
    stages.ingest(ws, config)
    for name in ("validate", "split", "chunk", "embed", "index"):
        stages.DATA_STAGES[name](ws, config)
    assert "changed" in sh(repo, "dvc", "status", "index", "--with-deps").stdout
    assert stages.record_in_dvc_lock(ws, config)
    assert "up to date" in sh(repo, "dvc", "status", "index", "--with-deps").stdout
    assert "Running stage" not in sh(repo, "dvc", "repro", "index").stdout


def test_corpus_and_index_round_trip_through_a_local_remote(dvc_repo, tmp_path):
    """A teammate's fresh checkout gets the exact corpus version and index with `dvc pull`."""
    from ragops.io import path_hash

    repo = dvc_repo
    sh(repo, "ragops", "ingest")
    sh(repo, "dvc", "repro", "index")
    before = {name: path_hash(repo / name) for name in ("data", "artifacts/index")}
    sh(repo, "dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"))
    sh(repo, "dvc", "push")
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / "artifacts")
    shutil.rmtree(repo / ".dvc" / "cache")
    sh(repo, "dvc", "pull", "data.dvc", "index")  # what this checkout needs; other stages never ran
    assert {name: path_hash(repo / name) for name in before} == before
