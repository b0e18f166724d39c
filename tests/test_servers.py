"""Real servers on 127.0.0.1: a Prefect server whose scheduler fires a served deployment, and an
MLflow tracking server logged to over HTTP. Each test stops what it starts (process groups) and
checks that nothing is left running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ragops.ops.servers import free_port, port_in_use, running_server, start_mlflow_server, start_prefect_server, start_process, stop_all
from ragops.paths import Workspace

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parents[1]

TINY_FLOW = textwrap.dedent(
    '''
    import sys
    from pathlib import Path

    from prefect import flow

    from flows.deploy import serve_deployments
    from ragops.params import resolve


    @flow(name="tiny")
    def tiny(n: int = 1) -> int:
        with open(Path(__file__).with_name("ran.txt"), "a") as out:
            out.write(f"{n}\\n")
        return n + 1


    if __name__ == "__main__":
        # The two ragops deployments from params.yaml defaults, plus a tiny one every 3 seconds.
        serve_deployments(resolve({}), sys.argv[1], extra=[tiny.to_deployment(name="tiny-every-3s", interval=3)])
    '''
)


def _assert_gone(server, pids_before):
    assert not server.pids(), f"{server.name} left processes {server.pids()}"
    alive = [p for p in pids_before if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"{server.name}: processes {alive} still alive"


def test_prefect_schedule_fires_then_everything_stops(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.server_fixtures import FAST_SCHEDULER_ENV

    ws = Workspace(tmp_path / "project")
    ws.root.mkdir()
    server = serving = None
    try:
        server = start_prefect_server(ws, prefect_home=tmp_path / "server-home", log_dir=tmp_path / "logs", extra_env=FAST_SCHEDULER_ENV)
        assert server.url.startswith("http://127.0.0.1:") and server.healthy()
        assert running_server(ws, "prefect") == server.url  # discoverable by other ragops commands
        (tmp_path / "tiny_flow.py").write_text(TINY_FLOW)
        serving = start_process(
            "serve", [sys.executable, "tiny_flow.py", str(ws.root)], cwd=tmp_path, log_path=tmp_path / "logs" / "serve.log",
            env={
                "PREFECT_API_URL": f"{server.url}/api",
                "PREFECT_HOME": str(tmp_path / "client-home"),
                "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                "PYTHONPATH": str(PROJECT_ROOT),
            },
        )
        with temporary_settings(updates={PREFECT_API_URL: f"{server.url}/api"}), get_client(sync_client=True) as client:
            deadline, tiny, completed = time.monotonic() + 150, None, []
            while time.monotonic() < deadline and not completed:
                assert serving.process.poll() is None, f"serve exited:\n{serving.log_tail()}"
                time.sleep(2)
                try:
                    tiny = tiny or client.read_deployment_by_name("tiny/tiny-every-3s")
                except Exception:  # noqa: BLE001 - not registered yet
                    continue
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[tiny.id])))
                completed = [r for r in runs if r.state and r.state.is_completed()]
            assert completed, f"no scheduled run completed; serve log:\n{serving.log_tail()}\nserver log:\n{server.log_tail()}"
            assert completed[0].auto_scheduled, "the run must come from the schedule, not a manual trigger"
            assert (tmp_path / "ran.txt").exists()

            # The ragops deployments were registered from the configuration.
            refresh = client.read_deployment_by_name("refresh/ragops-refresh")
            evaluate = client.read_deployment_by_name("evaluate/ragops-evaluate")
            assert refresh.schedules[0].schedule.cron == "0 3 * * *" and refresh.schedules[0].schedule.timezone == "UTC"
            assert evaluate.schedules[0].schedule.cron == "0 4 * * 0"
            assert refresh.parameters["workspace"] == str(ws.root)
            # The MLflow parent run id is internal: not a parameter a deployment run could be given.
            assert set(refresh.parameter_openapi_schema["properties"]) == {"workspace", "params", "profile", "source"}
            assert set(evaluate.parameter_openapi_schema["properties"]) == {"workspace", "params", "profile", "architectures"}
            assert refresh.entrypoint == "ragops.ops.flows.refresh"  # served from the package, not the top-level flows/ shim
            assert refresh.global_concurrency_limit.limit == 1
            assert refresh.concurrency_options.collision_strategy == "CANCEL_NEW"
            limit = client.read_global_concurrency_limit_by_name("ragops-workspace")
            assert limit.limit == 1 and limit.active

            serve_pids = serving.pids()
            serving.stop()  # SIGINT to the serve process group
            _assert_gone(serving, serve_pids)
            # pause_on_shutdown=False: the nightly schedule survives the serve process.
            assert not client.read_deployment_by_name("refresh/ragops-refresh").paused
    finally:
        stop_all(serving, server)  # even on failure
    pids = server.pids()
    assert not pids
    assert not port_in_use(server.port), "the Prefect port is still bound"
    assert running_server(ws, "prefect") is None


def test_mlflow_server_logs_over_http_and_leaves_no_orphans(tmp_path, migrated_mlflow_db):
    import mlflow

    ws = Workspace(tmp_path)
    ws.mlruns.mkdir()
    shutil.copy(migrated_mlflow_db, ws.mlruns / "mlflow.db")
    server = start_mlflow_server(ws, log_dir=tmp_path / "logs")
    try:
        before = server.pids()
        assert before and server.healthy()
        client = mlflow.MlflowClient(tracking_uri=server.url)
        experiment_id = client.create_experiment("through-http")
        run = client.create_run(experiment_id, run_name="over-http")
        client.log_metric(run.info.run_id, "describe/f1", 0.5)
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")  # proxied to --artifacts-destination
        client.set_terminated(run.info.run_id)
    finally:
        server.stop()
    _assert_gone(server, before)
    assert not port_in_use(server.port)
    # No MLflow helper (uvicorn worker, huey_consumer) survived, whatever its process group.
    store = str(ws.mlruns / "mlflow.db")
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if any(store in part for part in (p.info["cmdline"] or []))]
    assert not leftovers, f"orphaned MLflow processes: {leftovers}"
    # The run is in the project's SQLite store, its artifact under mlruns/artifacts.
    stored = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}").get_run(run.info.run_id)
    assert stored.data.metrics["describe/f1"] == 0.5 and stored.info.status == "FINISHED"
    assert list((ws.mlruns / "artifacts").rglob("hello.txt"))


def test_prefect_server_answers_only_its_own_origin_and_host(prefect_server):
    """What a web page the user visits could try against the local server (the session's real one)."""
    import httpx

    own = prefect_server.url
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    hostile = httpx.options(f"{own}/api/deployments/filter", headers={"Origin": "http://evil.example", **preflight})
    assert hostile.status_code == 400 and "access-control-allow-origin" not in hostile.headers
    friendly = httpx.options(f"{own}/api/deployments/filter", headers={"Origin": own, **preflight})
    assert friendly.status_code == 200 and friendly.headers["access-control-allow-origin"] == own
    # DNS rebinding: the page's own name resolving to 127.0.0.1 makes it same-origin; the Host gives it away.
    rebound = httpx.get(f"{own}/api/health", headers={"Host": "evil.example"})
    assert rebound.status_code == 400
    assert httpx.get(f"{own}/api/health").status_code == 200
    # A state-changing request without Prefect's CSRF token (a form post, a no-cors fetch) is refused.
    forged = httpx.post(f"{own}/api/flow_runs/filter", json={})
    assert forged.status_code == 403 and "CSRF" in forged.text


def test_prefect_server_refuses_a_public_bind_without_auth(tmp_path):
    from ragops.ops.servers import ServerError

    with pytest.raises(ServerError, match="refusing to serve Prefect on 0.0.0.0: .*PREFECT_SERVER_API_AUTH_STRING"):
        start_prefect_server(Workspace(tmp_path), host="0.0.0.0", port=free_port(), log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()  # nothing was started
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ragops")), "-w", str(tmp_path), "server", "--host", "0.0.0.0", "--no-serve"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PREFECT_SERVER_API_AUTH_STRING": ""},
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "refusing to serve Prefect on 0.0.0.0" in result.stderr


def test_prefect_server_with_auth_string_refuses_anonymous_clients(tmp_path):
    import httpx

    server = start_prefect_server(Workspace(tmp_path), host="0.0.0.0", auth_string="ragops:s3cret", log_dir=tmp_path / "logs",
                                  prefect_home=tmp_path / "home")
    try:
        assert httpx.get(f"{server.url}/api/health").status_code == 200  # health stays open for probes
        assert httpx.get(f"{server.url}/api/admin/version").status_code == 401
        assert httpx.get(f"{server.url}/api/admin/version", auth=("ragops", "s3cret")).status_code == 200
    finally:
        server.stop()
