"""The MLflow UI compares the architectures: a real `mlflow server` on 127.0.0.1 and real headless
Chromium rendering the compare-runs page of a pipeline run's two architecture child runs.

Needs a Chromium binary (CI: `apt-get update && apt-get install -y chromium`); skipped without one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse

import pytest

from ragops.params import resolve
from ragops.paths import Workspace

pytestmark = pytest.mark.slow

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable") if (path := shutil.which(name))), None)


def _chromium(tmp_path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000", *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary on PATH (install: apt-get install -y chromium)")
def test_mlflow_compare_page_shows_both_architectures(tmp_path, mlflow_store, mlflow_server_factory):
    from ragops.compare import mlflow_compare_url
    from tests.server_fixtures import FAKE_ARCHITECTURES, log_fake_pipeline

    ws = Workspace(tmp_path)
    config = resolve({"tracking": {"experiment": "ui-test"}})
    logged = log_fake_pipeline(ws, config)
    server = mlflow_server_factory(ws)  # the same SQLite store (mlruns/mlflow.db), served on 127.0.0.1

    import mlflow

    experiment_id = mlflow.get_experiment_by_name("ui-test").experiment_id
    url = mlflow_compare_url(server.url, list(logged["children"].values()), [experiment_id])
    assert "/#/compare-runs?runs=" in url

    dom = _chromium(tmp_path, "--virtual-time-budget=30000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    (tmp_path / "compare.html").write_text(html)
    for name in FAKE_ARCHITECTURES:
        assert name in html, f"{name} not rendered on the compare page ({len(html)} bytes of DOM)"
    assert "Comparing 2 Runs" in html
    assert "describe/f1" in html  # the shared metric keys line up in the comparison

    shot = tmp_path / "compare.png"
    result = _chromium(tmp_path, "--virtual-time-budget=30000", f"--screenshot={shot}", url)
    assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]


def test_compare_url_format():
    from ragops.compare import mlflow_compare_url

    url = mlflow_compare_url("http://127.0.0.1:5000/", ["a1", "b2"], ["7"])
    fragment = url.split("#", 1)[1]
    assert fragment.startswith("/compare-runs?")
    query = urllib.parse.parse_qs(fragment.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == ["a1", "b2"] and json.loads(query["experiments"][0]) == ["7"]
