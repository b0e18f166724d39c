"""Fan-out on a local Dask cluster (2 single-threaded worker processes on 127.0.0.1, reached by
address as a remote cluster would be): sharded embedding gives exactly the vectors of the
single-process `embed` stage, and the architectures evaluate in the workers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from ragops.paths import Workspace

pytestmark = pytest.mark.slow

N_CHUNKS = 1100  # > one 1024-row block: two shards


@pytest.fixture(scope="module")
def dask_cluster():
    """One cluster for the module (worker start-up imports torch: paid once); closed at the end."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    try:
        yield cluster
    finally:
        cluster.close()


def _workspace(root, shards: int, address: str | None = None) -> Workspace:
    ws = Workspace(root)
    ws.chunks_dir.mkdir(parents=True)
    rows = []
    for i in range(N_CHUNKS):
        doc = f"file:doc{i // 4:04d}.txt"
        text = f"Passage {i} on topic {i % 37}: " + " ".join(f"w{(i * 7 + j) % 101}" for j in range(i % 5 + 1))
        rows.append({"chunk_id": f"{doc}#{i % 4:04d}", "doc_id": doc, "position": i % 4, "title": f"Title {i // 4}", "text": text, "n_tokens": len(text.split())})
    pd.DataFrame(rows).to_parquet(ws.chunks, index=False)
    params = {
        "orchestration": {"task_runner": "dask", "dask_workers": 2, "dask_address": address, "embed_shards": shards},
        "embed": {"batch_size": 128, "threads": 1},
    }
    ws.params.write_text(yaml.safe_dump(params))
    return ws


def test_dask_sharded_embedding_equals_single_process(tmp_path, prefect_api, mlflow_store, dask_cluster):
    import mlflow

    from flows.pipeline import embed_shards
    from ragops import stages
    from ragops.params import load_config
    from ragops.ops.orchestration import make_task_runner
    from ragops.ops.sharding import embed_plan

    # Single process: the plain embed stage.
    single = _workspace(tmp_path / "single", shards=1)
    config = load_config(single.params)
    outcome = stages.embed(single, config, progress=False)
    assert not outcome.skipped and outcome.summary["computed"] == N_CHUNKS

    # Sharded: two block-aligned ranges on a 2-worker local Dask cluster, then the same stage.
    sharded = _workspace(tmp_path / "sharded", shards=2, address=dask_cluster.scheduler_address)
    config = load_config(sharded.params)
    ranges = embed_plan(str(sharded.root), None, None)
    assert ranges == [(0, 1024), (1024, N_CHUNKS)]
    runner = make_task_runner(config)
    assert type(runner).__name__ == "DaskTaskRunner" and runner.address == dask_cluster.scheduler_address
    shard_state = embed_shards.with_options(task_runner=runner)(str(sharded.root), None, None, ranges, None, return_state=True)
    assert shard_state.is_completed(), shard_state
    shard_results = shard_state.result()
    assert [r["computed"] for r in shard_results] == [1024, N_CHUNKS - 1024]
    outcome = stages.embed(sharded, config, progress=False)
    assert outcome.summary["computed"] == 0 and outcome.summary["cached"] == N_CHUNKS  # every vector came from the shards

    a = np.load(single.embeddings_dir / "vectors.npy")
    b = np.load(sharded.embeddings_dir / "vectors.npy")
    assert a.shape == b.shape == (N_CHUNKS, 384)
    assert np.array_equal(a, b), f"max abs difference {np.abs(a - b).max():.3g}"
    # The shards ran in other processes (Dask workers) and metered themselves in MLflow.
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ragops.kind` = 'embed-shard'", output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["embed-shard-0-1024", f"embed-shard-1024-{N_CHUNKS}"]
    assert all(r.data.metrics["stage/cpu_s"] > 0 for r in runs)
    # Up to date now: nothing left to fan out.
    assert embed_plan(str(sharded.root), None, None) == []


def test_evaluate_flow_on_dask(prefect_api, copy_workspace, dask_cluster):
    """The architectures fan out to Dask worker processes with the real stages (tiny LM) and are
    compared under the flow's parent run."""
    import mlflow

    from flows.pipeline import evaluate
    from ragops.params import load_config

    root = copy_workspace()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["orchestration"] = {**params.get("orchestration", {}), "task_runner": "dask", "dask_address": dask_cluster.scheduler_address}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    state = evaluate(workspace=str(root), return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_completed(), result
    labels = {o["label"]: o for o in result["outcomes"]}
    assert not labels["evaluate@closed_book"]["skipped"] and not labels["evaluate@incontext_ralm"]["skipped"]
    names = load_config(root / "params.yaml").enabled_architectures()  # the smoke profile's architectures, trained ones included
    assert labels["compare"]["summary"]["architectures"] == names
    # The workers logged into this test's MLflow store (the flow passes its tracking URI along).
    parent = mlflow.get_run(labels["compare"]["run_id"]).data.tags["mlflow.parentRunId"]
    children = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", output_format="list")
    evaluated = [r.info.run_name for r in children if r.data.tags.get("ragops.kind") == "architecture" or r.info.run_name == "compare"]
    assert sorted(evaluated) == sorted([*names, "compare"])

    # The same architectures trained and evaluated in one process by `ragops run` give the same
    # numbers (quality metrics; costs are measurements), and a second `ragops run` does nothing.
    from typer.testing import CliRunner

    from ragops.cli import app

    single = copy_workspace("single-process")
    first = CliRunner().invoke(app, ["--workspace", str(single), "run"])
    assert first.exit_code == 0, first.output
    for name in names:
        fanned = json.loads((root / "metrics" / f"{name}.json").read_text())
        alone = json.loads((single / "metrics" / f"{name}.json").read_text())
        quality = [k for k in alone if not k.startswith(("train/", "inference/"))]
        assert quality and {k: alone[k] for k in quality} == pytest.approx({k: fanned[k] for k in quality}, nan_ok=True, rel=1e-6), name
    again = CliRunner().invoke(app, ["--workspace", str(single), "run"])
    assert again.exit_code == 0, again.output
    ran = [line for line in again.output.splitlines() if ": done" in line]
    assert not ran, f"a second ragops run re-ran: {ran}"
    assert again.output.count("unchanged, skipped") >= len(names) * 2 + 8  # data stages, train@/evaluate@ each, compare


def test_tls_scheduler_needs_and_uses_client_certificates(monkeypatch):
    """A real TLS scheduler (mutual TLS, in-memory certificates from `Security.temporary`): the
    runner's client security comes from Dask's configuration; without it, one line says what is missing."""
    import dask
    from distributed import Client, LocalCluster, Security

    from ragops.params import resolve
    from ragops.errors import ConfigError
    from ragops.ops.orchestration import make_task_runner

    for key in ("CA_FILE", "CLIENT__CERT", "CLIENT__KEY"):
        monkeypatch.delenv(f"DASK_DISTRIBUTED__COMM__TLS__{key}", raising=False)
    with pytest.raises(ConfigError, match=r"tls://127\.0\.0\.1:1: .*missing: DASK_DISTRIBUTED__COMM__TLS__CA_FILE"):
        make_task_runner(resolve({"orchestration": {"task_runner": "dask", "dask_address": "tls://127.0.0.1:1"}}))

    certificates = Security.temporary()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=certificates, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        with dask.config.set({
            "distributed.comm.tls.ca-file": certificates.tls_ca_file,
            "distributed.comm.tls.client.cert": certificates.tls_client_cert,
            "distributed.comm.tls.client.key": certificates.tls_client_key,
        }):
            runner = make_task_runner(resolve({"orchestration": {"task_runner": "dask", "dask_address": address}}))
            assert runner.address == address
            with Client(address, **{k: v for k, v in runner.client_kwargs.items() if k != "set_as_default"}) as client:
                assert client.submit(lambda x: x * 7, 6).result(timeout=60) == 42
        # A client whose certificate another CA signed is refused by the scheduler.
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=Security.temporary(), timeout=5)
