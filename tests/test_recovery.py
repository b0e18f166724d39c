"""After kill -9, and while another run holds the workspace: real processes, real stages.

- A stage process SIGKILLed in the middle of swapping its output directory leaves a RUNNING MLflow
  run and temporary folders; the next run marks the run KILLED and cleans (or restores) the folders.
- Single-stage commands (what DVC stages run) take the workspace lock: one refuses to rewrite
  outputs while another process holds it, and one started *by* the holder (a `dvc repro` under a
  locked run) works under its parent's lock instead of deadlocking.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ragops.io import path_hash
from ragops.paths import Workspace

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# `ragops validate --force` in process, with os.replace slowed down at the swap of the output folder.
_VALIDATE_KILLED_MID_SWAP = """
import os, sys, time
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if ".validation.old-" in str(dst):
        print("mid-swap", flush=True)
        time.sleep(600)
os.replace = replace
from ragops import stages
from ragops.params import load_config
from ragops.paths import Workspace
ws = Workspace(sys.argv[1])
stages.validate(ws, load_config(ws.params), force=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def test_killed_stage_is_marked_killed_and_its_leftovers_cleaned_by_the_next_run(copy_workspace):
    import mlflow

    from ragops import stages
    from ragops.params import load_config
    from ragops.tracking import KILLED_TAG

    root = copy_workspace()
    ws = Workspace(root)
    store = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    killed = subprocess.Popen(
        [sys.executable, "-c", _VALIDATE_KILLED_MID_SWAP, str(root)], stdout=subprocess.PIPE, text=True,
        env=_env(MLFLOW_TRACKING_URI=store), cwd=root,
    )
    try:
        line = killed.stdout.readline().strip()
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert line == "mid-swap"
    artifacts = ws.validation_dir.parent
    assert not ws.validation_dir.exists()
    assert (artifacts / f".validation.old-{killed.pid}").is_dir() and list(artifacts.glob(f".validation.tmp-{killed.pid}-*"))
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("ragops").experiment_id
    [orphan] = client.search_runs([experiment], f"tags.`ragops.pid` = '{killed.pid}'")
    assert orphan.info.status == "RUNNING"  # what MLflow alone would show forever

    outcome = stages.validate(ws, load_config(ws.params), force=True)

    orphan = client.get_run(orphan.info.run_id)
    assert orphan.info.status == "KILLED"
    assert f"process {killed.pid} on " in orphan.data.tags[KILLED_TAG]
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert sorted(p.name for p in artifacts.iterdir() if p.name.startswith(".validation")) == []
    assert (ws.validation_dir / "status.json").is_file()


def _ragops(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    ragops = Path(sys.executable).with_name("ragops")
    return subprocess.run([str(ragops), "-w", str(root), *args], capture_output=True, text=True, timeout=timeout, env=_env())


def test_single_stage_command_refuses_a_held_workspace_and_works_under_its_parents_lock(copy_workspace):
    from ragops.ops.lock import workspace_lock

    root = copy_workspace()
    ws = Workspace(root)
    before = path_hash(ws.benchmark_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from ragops.ops.lock import workspace_lock; from ragops.paths import Workspace\n"
            f"with workspace_lock(Workspace({str(root)!r}), 0, what='ragops run'):\n"
            "    print('held', flush=True); time.sleep(120)"
        )],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _ragops(root, "split", "--force")
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 1
    message = refused.stderr.strip()
    assert "\n" not in message and "busy" in message and "'ragops run'" in message and f"pid {holder.pid}" in message
    assert path_hash(ws.benchmark_dir) == before  # nothing rewritten

    # This process holds the lock and starts the command (as `dvc repro` run by a locked pipeline
    # would): the command works under its ancestor's lock instead of waiting for it or failing.
    with workspace_lock(ws, 0, what="pipeline running dvc repro"):
        inherited = _ragops(root, "split", "--force")
    assert inherited.returncode == 0, inherited.stderr[-2000:]
    assert "split: done" in inherited.stdout
