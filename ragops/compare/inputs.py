"""The comparison's inputs: what the evaluate stages wrote, read from the workspace.

For each architecture: `metrics/<name>.json` (quality with CIs, training and inference cost),
`artifacts/eval/<name>/predictions.parquet` (one row per question and held-out document, for
paired comparisons) and the `family`/`finetune` tags recorded in `artifacts/eval/<name>/info.json`
(or, when absent, declared by the architecture's class). All of them are DVC-tracked outputs, so
the comparison is a pure function of files DVC can hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ragops.errors import DataError
from ragops.io import read_json
from ragops.paths import Workspace

PREDICTIONS = "predictions.parquet"
INFO = "info.json"


@dataclass
class ComparisonInputs:
    table: pd.DataFrame  # one row per architecture: architecture, family, finetune, then every metric key
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> per-item rows
    missing_predictions: list[str] = field(default_factory=list)


def with_results(ws: Workspace, names: list[str]) -> tuple[list[str], list[str]]:
    """(names that have evaluation results, names that have none yet), in the order given. The
    comparison covers the first; the second are named in its messages, never silently dropped.
    With no results at all, the first is empty (the compare stage then names the missing file)."""
    present = [n for n in names if ws.metrics_file(n).exists()]
    return present, [n for n in names if n not in present]


def input_files(ws: Workspace, names: list[str]) -> dict[str, Path]:
    """The files the comparison reads (the stage's fingerprint inputs)."""
    files: dict[str, Path] = {}
    for name in names:
        files[f"metrics/{name}"] = ws.metrics_file(name)
        files[f"predictions/{name}"] = ws.eval_dir(name) / PREDICTIONS
    return files


def _tags(ws: Workspace, name: str, options=None) -> dict[str, str]:
    info_file = ws.eval_dir(name) / INFO
    info = read_json(info_file) if info_file.exists() else {}
    if info.get("family") and info.get("finetune"):
        return {"family": str(info["family"]), "finetune": str(info["finetune"])}
    from ragops.architectures import registry

    try:
        cls = registry.resolve(name, options)  # a variant (`base:`) is its base's class under its own name
    except KeyError:
        return {"family": "unknown", "finetune": "unknown"}
    return {"family": cls.family, "finetune": cls.finetune}


def load_inputs(ws: Workspace, names: list[str], options: dict | None = None) -> ComparisonInputs:
    """Metrics, tags and predictions of `names`, in that order. A missing metrics file is an error
    naming it; missing predictions only leave that architecture out of paired comparisons."""
    rows, predictions, missing = [], {}, []
    for name in names:
        metrics_file = ws.metrics_file(name)
        if not metrics_file.exists():
            raise DataError(f"{metrics_file}: no results for architecture '{name}' (run: ragops evaluate {name})")
        metrics = read_json(metrics_file)
        rows.append({"architecture": name, **_tags(ws, name, (options or {}).get(name)), **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        predictions_file = ws.eval_dir(name) / PREDICTIONS
        if predictions_file.exists():
            predictions[name] = pd.read_parquet(predictions_file)
        else:
            missing.append(name)
    return ComparisonInputs(pd.DataFrame(rows), predictions, missing)
