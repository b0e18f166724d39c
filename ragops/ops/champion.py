"""The registered `champion` model: one architecture's card, stored so that loading it runs no code.

What is registered is the *recipe*: the architecture, its options, the LM, encoder, index and
chunking it was evaluated with, its scores and source run (`card.json`). `ragops evaluate
<architecture>` rebuilds the system itself; the registry says which one to rebuild.

`register_card` stores the card as an MLflow 3 *logged model* holding only `card.json` and an
`MLmodel` file with no flavor, then registers it. Read it back with `load_card("models:/ragops-rag@champion")`:
that downloads and parses JSON, nothing else. The earlier format, a `mlflow.pyfunc` model whose
`PythonModel` was stored with cloudpickle, executed whatever the pickle contained when loaded
(anyone who can write to the artifact store could make every loader run their code); a
"models from code" pyfunc would execute the stored script instead. A card needs no predict
function, so it carries no code at all. `mlflow.pyfunc.load_model` on it fails with "Model does
not have the python_function flavor".

`ragops.ops.mlflow_compare.register_champion` registers the champion through `register_card`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

CARD_FILE = "card.json"
MODEL_TYPE = "ragops-architecture-card"


def register_card(
    card: dict[str, Any],
    *,
    registered_model: str,
    source_run_id: str | None,
    tags: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    name: str = "champion",
) -> str:
    """Log `card` as an artifact-only MLflow logged model (linked to `source_run_id`) and register
    it as a new version of `registered_model`. Returns the version number (a string)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_run(source_run_id).info.experiment_id if source_run_id else None
    string_tags = {k: str(v) for k, v in (tags or {}).items()}
    model = client.create_logged_model(
        experiment_id=experiment_id or "0", name=name, source_run_id=source_run_id, tags=string_tags, model_type=MODEL_TYPE,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="ragops-card-") as tmp:
            (Path(tmp) / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str), encoding="utf-8")
            # A model folder without flavors: MLflow lists and registers it, and loads nothing from it.
            (Path(tmp) / "MLmodel").write_text(
                f"artifact_path: {name}\nflavors: {{}}\nmodel_id: {model.model_id}\nmetadata:\n  format: {MODEL_TYPE}\n",
                encoding="utf-8",
            )
            client.log_model_artifacts(model.model_id, tmp)
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    if not _has_registered_model(client, registered_model):
        client.create_registered_model(registered_model)
    # The source is the logged model's artifact location, not `models:/<model_id>`: MLflow 3.17's
    # SQL registry resolves a models:/ source (and a model_id without a run id) through the
    # process-global tracking URI, so registering into any other store than the global one failed.
    version = client.create_model_version(
        registered_model, source=model.artifact_location, run_id=source_run_id, tags=string_tags,
        model_id=model.model_id if source_run_id else None,
    )
    return str(version.version)


def _has_registered_model(client, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
        return False
    return True


def load_card(model_uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The card of a registered card model (`models:/ragops-rag@champion`), read as JSON."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="ragops-card-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri.rstrip('/')}/{CARD_FILE}", dst_path=tmp, tracking_uri=tracking_uri
        )
        return json.loads(Path(path).read_text(encoding="utf-8"))

