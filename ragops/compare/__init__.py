"""Comparing RAG architectures on quality and cost.

- `ragops.compare.analysis`: pure functions over a table (one row per architecture): the
  comparison table, Pareto fronts, the champion rule. No MLflow, no matplotlib.
- `ragops.compare.plots`: the Pareto plots (matplotlib PNG, offline altair HTML).
- `ragops.ops.mlflow_compare`: the MLflow adapter (read architecture runs, register the champion).

The pure functions are re-exported here.
"""

from ragops.compare.analysis import (
    CI_SUFFIXES,
    COST_KEYS,
    ID_COLUMNS,
    TASKS,
    comparison_table,
    format_table,
    format_value,
    higher_is_better,
    is_quality_metric,
    mlflow_compare_url,
    pareto_front,
    pick_champion,
    pick_cost,
    quality_metrics,
)

__all__ = [
    "CI_SUFFIXES", "COST_KEYS", "ID_COLUMNS", "TASKS", "comparison_table", "format_table", "format_value",
    "higher_is_better", "is_quality_metric", "mlflow_compare_url", "pareto_front", "pick_champion", "pick_cost",
    "quality_metrics",
]
