"""Pure comparison analysis over a table with one row per architecture and one column per metric key.

No MLflow, no matplotlib: every function takes and returns plain pandas/Python values, so the
comparison is testable on hand-made tables and is a pure function of its inputs.

- `comparison_table` / `format_table`: quality metrics with their bootstrap CIs, then cost;
- `pareto_front`: which architectures are not beaten on both quality and cost;
- `pick_champion`: the best architecture by one metric;
- `higher_is_better`: a metric's direction from its name.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from typing import Any

import pandas as pd

ID_COLUMNS = ["architecture", "family", "finetune", "run_id", "parent_run_id", "start_time"]
TASKS = ("describe", "identify", "lm")
COST_PREFIXES = ("train/", "inference/", "stage/", "system/")
CI_SUFFIXES = ("_ci_low", "_ci_high")
# Cost columns shown in the comparison table, in this order, when present.
COST_KEYS = [
    "train/wall_s",
    "train/cpu_s",
    "train/gpu_s",
    "train/flops",
    "train/params_trainable",
    "train/cost_usd",
    "inference/wall_s",
    "inference/wall_s_per_1k_questions",
    "inference/flops",
    "inference/tokens_prompt",
    "inference/tokens_retrieved",
    "inference/retrieval_calls",
    "inference/peak_rss_mb",
    "inference/cost_usd",
    "inference/cost_usd_per_1k_questions",
]
_LOWER_IS_BETTER = ("ppl", "perplexity", "loss", "nll", "latency", "wall_s", "cpu_s", "gpu_s", "cost", "flops", "tokens", "rss", "bytes")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric from its name: perplexities, NLLs, latencies and costs go down."""
    name = metric.split("/")[-1].lower()
    return not any(token in name for token in _LOWER_IS_BETTER) and not metric.startswith(("train/", "inference/"))


def is_quality_metric(key: str) -> bool:
    return "/" in key and not key.startswith(COST_PREFIXES) and not key.endswith(CI_SUFFIXES)


def quality_metrics(df: pd.DataFrame) -> list[str]:
    """Quality metric keys present, tasks first in TASKS order, then alphabetical."""
    keys = [c for c in df.columns if c not in ID_COLUMNS and is_quality_metric(c)]
    order = {task: i for i, task in enumerate(TASKS)}
    return sorted(keys, key=lambda k: (order.get(k.split("/")[0], len(TASKS)), k))


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """architecture, family, finetune, then each quality metric followed by its CI bounds (when
    logged), then the training and inference cost columns of COST_KEYS that are present."""
    columns = [c for c in ("architecture", "family", "finetune") if c in df.columns]
    for key in quality_metrics(df):
        columns.append(key)
        columns.extend(f"{key}{suffix}" for suffix in CI_SUFFIXES if f"{key}{suffix}" in df.columns)
    columns.extend(key for key in COST_KEYS if key in df.columns)
    table = df[columns].copy() if not df.empty else pd.DataFrame(columns=columns)
    if "run_id" in df.columns:
        table["run_id"] = df["run_id"].values
    return table.reset_index(drop=True)


def format_value(value: Any, low: Any = None, high: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.3f}"
    if low is not None and high is not None and not (pd.isna(low) or pd.isna(high)):
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def format_table(table: pd.DataFrame) -> list[dict[str, str]]:
    """Rows of display strings: CIs folded into their metric cell ("0.512 [0.401, 0.620]")."""
    rows = []
    for record in table.to_dict(orient="records"):
        row: dict[str, str] = {}
        for key, value in record.items():
            if key.endswith(CI_SUFFIXES) or key == "run_id":
                continue
            row[key] = format_value(value, record.get(f"{key}_ci_low"), record.get(f"{key}_ci_high")) if "/" in key else str(value)
        rows.append(row)
    return rows


def pareto_front(df: pd.DataFrame, quality: str, cost: str, *, maximize: bool | None = None) -> pd.DataFrame:
    """Rows not dominated on (quality, cost): no other row is at least as good on both and strictly
    better on one. Cost is minimised; quality maximised unless its name says otherwise
    (`maximize=None`: see `higher_is_better`). Rows missing either metric are ignored. Sorted by cost.
    """
    if df.empty or quality not in df.columns or cost not in df.columns:
        return df.iloc[0:0]
    maximize = higher_is_better(quality) if maximize is None else maximize
    data = df.dropna(subset=[quality, cost])
    q = data[quality].astype(float) * (1 if maximize else -1)
    c = data[cost].astype(float)
    keep = []
    for i in data.index:
        dominated = ((q >= q[i]) & (c <= c[i]) & ((q > q[i]) | (c < c[i]))).any()
        keep.append(not dominated)
    return data[keep].sort_values(cost).copy()


def pick_champion(df: pd.DataFrame, metric: str, mode: str = "max") -> pd.Series | None:
    """The row with the best `metric` (ties: the first architecture alphabetically), or None."""
    if df.empty or metric not in df.columns:
        return None
    data = df.dropna(subset=[metric]).sort_values("architecture")
    if data.empty:
        return None
    index = data[metric].idxmax() if mode == "max" else data[metric].idxmin()
    return data.loc[index]


def pick_cost(df: pd.DataFrame, candidates: list[str]) -> str | None:
    """The first of `candidates` that some row has a value for."""
    for key in candidates:
        if key in df.columns and df[key].notna().any():
            return key
    return None


def mlflow_compare_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The MLflow UI's compare-runs page for these runs (MLflow 3's hash route
    `/#/compare-runs?runs=[...]&experiments=[...]`, as in its `getCompareRunPageRoute`)."""

    def encode(values: list[str]) -> str:
        return urllib.parse.quote(json.dumps(values, separators=(",", ":")), safe="[],:")

    runs = encode([str(r) for r in run_ids])
    experiments = encode(sorted({str(e) for e in experiment_ids}))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"
