"""The comparison's MLflow adapter: read architecture runs, register the champion.

Everything goes through an explicit `MlflowClient(tracking_uri)`: nothing here sets MLflow's
global tracking URI, experiment or active run, so calling it from a stage, a thread or a test
never redirects anyone else's logging.

- `collect_runs`: the architecture child runs (`ragops.kind=architecture`) of one pipeline run,
  as a table with one row per architecture (for the MLflow UI's compare page and `--print-only`);
- `register_champion`: an architecture's card (what it is, how it was configured, its scores)
  becomes a version of a registered model, with an alias (`models:/ragops-rag@champion`).
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from ragops.compare.analysis import ID_COLUMNS
from ragops.errors import RagopsError

CARD_HASH_TAG = "card_hash"


def client_for(tracking_uri: str | None = None):
    """A client on `tracking_uri`, else $MLFLOW_TRACKING_URI (never MLflow's process-global URI)."""
    from mlflow import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RagopsError("no MLflow tracking URI: pass one or set MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            found = client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - not an id either
            found = None
    if found is None:
        raise RagopsError(f"MLflow experiment '{experiment}' does not exist in {client.tracking_uri} (run the pipeline first: ragops run)")
    return found.experiment_id


def _rows(runs) -> pd.DataFrame:
    rows = []
    for run in runs:
        tags = run.data.tags
        rows.append(
            {
                "architecture": tags.get("architecture") or tags.get("ragops.name") or run.info.run_name,
                "family": tags.get("family", "unknown"),
                "finetune": tags.get("finetune", "unknown"),
                # A run that re-logged unchanged results points at the run that computed them.
                "run_id": tags.get("ragops.reused_from") or run.info.run_id,
                "parent_run_id": tags.get("mlflow.parentRunId"),
                "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
                **run.data.metrics,
            }
        )
    return pd.DataFrame(rows, columns=None if rows else ID_COLUMNS)


def collect_runs(
    experiment: str,
    parent_run_id: str | None = None,
    *,
    tracking_uri: str | None = None,
    fallback_latest: bool = True,
) -> pd.DataFrame:
    """One row per architecture: tags `architecture`, `family`, `finetune`, the run ids, and one
    column per logged metric key (`describe/f1`, `describe/f1_ci_low`, `train/wall_s`, ...).

    Runs: the FINISHED `ragops.kind=architecture` children of `parent_run_id`, or of the latest
    pipeline run that has any. An architecture whose stage was skipped (inputs unchanged) has no
    child in that pipeline run; with `fallback_latest`, its latest finished run anywhere in the
    experiment fills in. `df.attrs["parent_run_id"]` and `df.attrs["source"]` say what was used.
    """
    client = client_for(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    base = "tags.`ragops.kind` = 'architecture' and attributes.status = 'FINISHED'"

    def search(extra: str = "", max_results: int = 1000):
        return client.search_runs([experiment_id], f"{base}{extra}", order_by=["attributes.start_time DESC"], max_results=max_results)

    if parent_run_id is None:
        latest = search(max_results=1)
        parent_run_id = latest[0].data.tags.get("mlflow.parentRunId") if latest else None
    children = _rows(search(f" and tags.`mlflow.parentRunId` = '{parent_run_id}'")) if parent_run_id else _rows([])
    source = "parent"
    if fallback_latest:
        everything = _rows(search())
        if not everything.empty:
            latest_each = everything.sort_values("start_time", ascending=False).drop_duplicates("architecture")
            missing = latest_each[~latest_each["architecture"].isin(set(children["architecture"]))]
            if not missing.empty:
                source = "latest-per-architecture" if children.empty else "parent+latest"
                children = pd.concat([children, missing], ignore_index=True) if not children.empty else missing
    df = children.sort_values("start_time", ascending=False).drop_duplicates("architecture") if not children.empty else children
    df = df.sort_values("architecture").reset_index(drop=True)
    df.attrs.update(parent_run_id=parent_run_id, source=source, experiment_id=experiment_id)
    return df


def architecture_card(row: pd.Series | dict[str, Any], config=None) -> dict[str, Any]:
    """What is registered: the architecture, its options, the LM/encoder/index/chunking settings
    it was evaluated with, and its scores."""
    row = dict(row)
    name = str(row["architecture"])
    options = None
    if config is not None and name in getattr(config, "architectures", {}):
        value = config.architectures[name]
        options = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    metrics = {k: float(v) for k, v in row.items() if "/" in str(k) and isinstance(v, (int, float)) and not pd.isna(v)}
    card = {
        "architecture": name,
        "family": row.get("family"),
        "finetune": row.get("finetune"),
        "options": options,
        "source_run_id": row.get("run_id"),
        "metrics": metrics,
    }
    if config is not None:
        card.update(profile=config.profile, lm=config.section("lm"), embed=config.section("embed"), index=config.section("index"), chunk=config.section("chunk"))
    return card


def _card_hash(card: dict[str, Any]) -> str:
    from ragops.io import json_hash

    return json_hash(card)


def register_champion(
    card: dict[str, Any],
    *,
    run_id: str,
    registered_model: str,
    alias: str,
    tracking_uri: str | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register `card` as a new version of `registered_model` (an artifact-only card model linked
    to the run `run_id`, see `ragops.ops.champion.register_card`) and point `alias` at it.

    Idempotent by content: when the alias already points at a version made from an identical card,
    that version is kept. Returns {registered_model, alias, architecture, version, new_version, uri}.
    """
    from ragops.ops.champion import register_card

    client = client_for(tracking_uri)
    card_hash = _card_hash(card)
    result = {"registered_model": registered_model, "alias": alias, "architecture": card["architecture"],
              "uri": f"models:/{registered_model}@{alias}"}
    try:
        current = client.get_model_version_by_alias(registered_model, alias)
    except Exception:  # noqa: BLE001 - no such model or alias yet
        current = None
    if current is not None and current.tags.get(CARD_HASH_TAG) == card_hash:
        return {**result, "version": str(current.version), "new_version": False}
    version_tags = {"architecture": card["architecture"], "family": card.get("family"), CARD_HASH_TAG: card_hash, **(tags or {})}
    version = register_card(card, registered_model=registered_model, source_run_id=run_id,
                            tags={k: v for k, v in version_tags.items() if v is not None}, tracking_uri=client.tracking_uri)
    client.set_registered_model_alias(registered_model, alias, version)
    return {**result, "version": str(version), "new_version": True}
