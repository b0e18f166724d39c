"""A real DVC repository: `dvc repro` builds the whole pipeline (smoke profile, tiny LM) from the
ingested corpus, a second `dvc repro` does nothing, `dvc plots show` renders, and `dvc exp run
--temp -S` tries a variant in a temporary copy (with an empty MLflow store) that `dvc exp show` compares."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import PROJECT_ROOT, write_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def dvc_repo(tmp_path, smoke_workspace, tiny_lm_dir, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(PROJECT_ROOT / "ragops", repo / "ragops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / ".gitignore", repo / ".gitignore")
    params = write_params(repo, retrieval_eval={"max_questions": 10}, lm={"model": str(tiny_lm_dir)})
    # The two architectures that train nothing: the pipeline's shape without minutes of training.
    values = yaml.safe_load(params.read_text())
    values["architectures"] = {name: values["architectures"][name] for name in ("closed_book", "incontext_ralm")}
    for profile in values["profiles"].values():
        if isinstance(profile, dict):
            profile.pop("architectures", None)
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    # dvc.yaml for these architectures, as a user does after enabling or disabling one.
    sh(repo, "ragops", "pipeline", "--write")
    # The embedding cache is content-addressed: reuse the session's so the test embeds nothing new.
    shutil.copytree(smoke_workspace / ".cache", repo / ".cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "ci@example.invalid")
    sh(repo, "git", "config", "user.name", "ci")
    sh(repo, "dvc", "init", "-q")
    return repo


def test_repro_from_ingested_corpus_then_noop_then_experiment(dvc_repo, monkeypatch):
    repo = dvc_repo
    sh(repo, "ragops", "ingest")
    data_dvc = (repo / "data.dvc").read_text()
    assert "md5:" in data_dvc and "path: data" in data_dvc
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "corpus")

    first = sh(repo, "dvc", "repro")
    for stage in ("validate", "split", "chunk", "embed", "index", "eval_retrieval", "prepare_lm", "train@closed_book",
                  "train@incontext_ralm", "evaluate@closed_book", "evaluate@incontext_ralm", "compare"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((repo / "metrics" / "retrieval.json").read_text())
    assert 0 <= metrics["test/bm25/recall_at_10"] <= 1
    summary = json.loads((repo / "artifacts" / "compare" / "summary.json").read_text())
    assert summary["architectures"] == ["closed_book", "incontext_ralm"] and summary["champion"]["architecture"]
    # what changes the numbers is recorded with each architecture run; nothing trained costs exactly 0
    runs = {run.info.run_name: run.data for run in _mlflow_runs(repo)}
    closed, ralm = runs["closed_book"], runs["incontext_ralm"]
    assert closed.params["lm.document_start"] == "<|endoftext|>" and closed.params["lm.start_token"] == "separator"
    assert closed.params["prompt.format"] == "raw" and "{passage}" not in closed.params["prompt.template"]
    assert "{passage}" in ralm.params["prompt.template"] and closed.params["lm.quantisation"] == "none"
    assert closed.metrics["train/wall_s"] == 0.0 and closed.metrics["train/cost_usd"] == 0.0
    smoke = yaml.safe_load((repo / "params.yaml").read_text())["profiles"]["smoke"]["eval"]
    assert closed.metrics["inference/qa/questions"] == 2 * smoke["max_questions"]  # describe + identify
    assert closed.metrics["inference/lm/tokens"] == sum(
        pd.read_parquet(repo / "artifacts" / "eval" / "closed_book" / "predictions.parquet").query("task == 'lm'")["n_tokens"])

    # Nothing changed: nothing runs (compare included), and DVC agrees everything is up to date.
    second = sh(repo, "dvc", "repro")
    assert "Running stage" not in second.stdout, second.stdout
    assert "up to date" in sh(repo, "dvc", "status").stdout
    runs_before = _mlflow_run_names(repo)
    assert runs_before.count("compare") == 1  # no orphan compare run per `dvc repro`

    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")  # every plot's file exists (a stage produces it)
    assert "artifacts/compare/comparison.csv" in json.dumps(plots["data"])

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    # A temporary copy: only compare re-runs, against that copy's own (empty) MLflow store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    experiment = sh(repo, "dvc", "exp", "run", "--temp", "-S", "champion.rule=point")
    assert "Running stage 'compare'" in experiment.stdout and "Running stage 'evaluate" not in experiment.stdout
    shown = json.dumps(json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout))
    assert '"rule": "point"' in shown and '"rule": "paired"' in shown
    assert "point" in sh(repo, "dvc", "params", "diff", "--all", "--json", "HEAD", shown_ref(repo)).stdout


def shown_ref(repo: Path) -> str:
    """The newest experiment's ref (for `dvc params diff HEAD <exp>`)."""
    rows = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    for row in rows:
        for experiment in row.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                return revision["rev"]
    raise AssertionError("no experiment in dvc exp show")


def _mlflow_runs(repo: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    return [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]


def _mlflow_run_names(repo: Path) -> list[str]:
    return [run.info.run_name for run in _mlflow_runs(repo)]


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

    # A warm re-run changed nothing: dvc.lock is not rewritten (no `dvc commit`, which re-hashes everything).
    lock = repo / "dvc.lock"
    before = (lock.read_text(), lock.stat().st_mtime_ns)
    assert stages.record_in_dvc_lock(ws, config)
    assert (lock.read_text(), lock.stat().st_mtime_ns) == before
    # A parameter changed that no output of this profile depends on (another profile's): nothing
    # re-runs, but DVC tracks `profiles` as a whole, so the next run records it again.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["full"]["eval"]["bootstrap_samples"] = 1234
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "changed" in sh(repo, "dvc", "status", "index").stdout
    assert stages.record_in_dvc_lock(ws, config)
    assert "up to date" in sh(repo, "dvc", "status", "index", "--with-deps").stdout
    before = (lock.read_text(), lock.stat().st_mtime_ns)
    # An output changed behind ragops's back: the next run records it again.
    meta = repo / "artifacts" / "index" / "meta.json"
    meta.write_text(meta.read_text() + "\n")
    assert "changed" in sh(repo, "dvc", "status", "index").stdout
    assert stages.record_in_dvc_lock(ws, config)
    assert lock.read_text() != before[0]
    assert "up to date" in sh(repo, "dvc", "status", "index", "--with-deps").stdout


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
