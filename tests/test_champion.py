"""The champion card is registered as an artifact-only MLflow model: reading it back parses JSON
and runs no code (no pickle, no Python file in the model)."""

from __future__ import annotations

import pytest

from ragops.params import resolve
from ragops.paths import Workspace


def test_card_round_trips_through_the_registry_without_code(tmp_path, mlflow_store):
    import mlflow

    from ragops.ops.champion import load_card, register_card
    from ragops.tracking import tracked_run

    with tracked_run(Workspace(tmp_path), resolve({}), "incontext_ralm", kind="architecture", system_metrics=False) as run:
        pass
    card = {"architecture": "incontext_ralm", "options": {"k": 2, "stride": 16}, "metrics": {"describe/f1": 0.264}}
    first = register_card(card, registered_model="ragops-rag", source_run_id=run.run_id, tags={"architecture": "incontext_ralm"})
    second = register_card({**card, "options": {"k": 4}}, registered_model="ragops-rag", source_run_id=run.run_id)
    assert (first, second) == ("1", "2")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("ragops-rag", "champion", first)

    assert load_card("models:/ragops-rag@champion") == card
    assert load_card("models:/ragops-rag/2")["options"] == {"k": 4}
    version = client.get_model_version("ragops-rag", first)
    assert version.run_id == run.run_id and version.tags["architecture"] == "incontext_ralm"
    files = {a.path.rsplit("/", 1)[-1] for a in mlflow.artifacts.list_artifacts(artifact_uri=version.source)}
    assert {"card.json", "MLmodel"} <= files and not [f for f in files if f.endswith((".pkl", ".py", ".cloudpickle"))]
    with pytest.raises(mlflow.exceptions.MlflowException, match="python_function"):
        mlflow.pyfunc.load_model("models:/ragops-rag@champion")
