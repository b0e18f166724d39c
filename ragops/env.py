"""The tool environment ragops runs in, set once before Prefect, MLflow, GX or DVC are imported.

Why: Prefect would otherwise write to ~/.prefect and time out starting its ephemeral server on a
loaded 2-core machine; MLflow 3.x refuses a plain ./mlruns file store and would drop mlflow.db in
whatever directory it is started from; every tool phones home by default; Hugging Face libraries
would try the hub. Values already set by the user win (setdefault).

Prefect sends flow-run logs to its API (the UI shows them), `ragops` loggers included; lines
logged outside a flow run (plain `ragops run`) are not sent anywhere but the terminal. MLflow's
system metrics are sampled every 15 s: ragops' long runs last minutes.
"""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{(Path(root).resolve() / 'mlruns' / 'mlflow.db')}"


def configure_environment(root: str | Path = ".") -> None:
    root = Path(root).resolve()
    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    defaults = {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "ragops",
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "MLFLOW_TRACKING_URI": tracking_uri(root),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "15",
        "DO_NOT_TRACK": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # transformers' "Loading weights" bar (per model load) drowns ragops' own progress bars.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # MLFLOW_RUN_ID would silently override the parent run we pass explicitly (mlflow#15713).
    os.environ.pop("MLFLOW_RUN_ID", None)
