"""The comparison the `compare` stage writes: a pure function of the evaluate stages' outputs.

Inputs (see `ragops.compare.inputs`): `metrics/<name>.json`, `artifacts/eval/<name>/predictions.parquet`
and the family tags of the enabled architectures, plus params.yaml. Outputs, in `out_dir`:

- `comparison.csv` / `comparison.json`: one row per architecture, quality with 95% CIs, cost;
- `paired.csv`: paired bootstrap differences A − B for every pair of architectures and metric;
- `pareto-inference.png/.html`, `pareto-train.png/.html`: quality vs inference / training cost;
- `summary.json`: Pareto fronts, paired differences vs the baseline and between Pareto
  neighbours, and the champion decision with its reason.

Identical inputs give byte-identical outputs (no timestamps, run ids or absolute paths), so DVC
sees an unchanged comparison as unchanged. MLflow logging and the model registry are the stage's
side effects (`ragops.stages.compare`), not part of this.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ragops.compare.analysis import (
    Constraints,
    comparison_table,
    cost_metric_for,
    decide_champion,
    format_table,
    higher_is_better,
    mission_group,
    paired_lookup,
    pareto_front,
    quality_metrics,
    recommend,
)
from ragops.compare.inputs import ComparisonInputs, load_inputs, with_results
from ragops.errors import ConfigError
from ragops.evaluation.paired import paired_table
from ragops.io import write_json

TRAIN_COST = "train/cost_usd"


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def baseline_names(table: pd.DataFrame) -> list[str]:
    """Architectures of the `baseline` family (closed book): every other one is compared with them."""
    return [str(n) for n in table.loc[table["family"] == "baseline", "architecture"]] if "family" in table.columns else []


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(names, 2))


def constraints_from(config, **overrides: Any) -> Constraints:
    """The recommendation's constraints: params.yaml's `report:` section, overridden by the
    options given (None = not given)."""
    values = {k: getattr(config.report, k) for k in ("black_box_only", "max_train_hours", "max_latency_ms")}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Constraints(**values)


def analyse(inputs: ComparisonInputs, config, constraints: Constraints | None = None, target_metric: str | None = None) -> dict[str, Any]:
    """Everything the comparison says, as plain data (no files written). The recommendation
    optimises `target_metric` (default: `report.metric`, else `champion.metric`)."""
    df = inputs.table.copy()
    df["group"] = [mission_group(f, t) for f, t in zip(df["family"], df["finetune"], strict=True)]
    quality = config.champion.metric
    eval_config = config.eval
    paired = paired_table(inputs.predictions, comparison_pairs(list(df["architecture"])),
                          n_samples=eval_config.bootstrap_samples, confidence=eval_config.confidence, seed=config.seed)
    metrics = list(dict.fromkeys(paired["metric"])) if not paired.empty else []
    summary: dict[str, Any] = {
        "architectures": list(df["architecture"]),
        "quality_metric": quality,
        "quality_metrics": quality_metrics(df),
        "confidence": eval_config.confidence,
        "pareto": {},
        "paired_vs_baseline": [],
        "paired_pareto_neighbours": [],
        "champion": None,
        "messages": [],
    }
    if inputs.missing_predictions:
        summary["messages"].append(f"no per-item predictions for {', '.join(inputs.missing_predictions)}: left out of paired comparisons")
    unpaired = paired[paired["unpaired"] > 0] if not paired.empty else paired
    if len(unpaired):
        pairs = sorted({f"{a}/{b}" for a, b in zip(unpaired["a"], unpaired["b"], strict=True)})
        summary["messages"].append(f"evaluated on different items (only shared items are paired): {', '.join(pairs)}")
    if quality not in df.columns:
        summary["messages"].append(f"champion.metric '{quality}' was not reported by any architecture (reported: {', '.join(quality_metrics(df)) or 'none'})")

    for base in baseline_names(df):
        for name in df["architecture"]:
            if name == base:
                continue
            for metric in metrics:
                row = paired_lookup(paired, str(name), base, metric)
                if row is not None:
                    summary["paired_vs_baseline"].append(row)

    costs = {"inference": cost_metric_for(quality, df.columns), "train": TRAIN_COST}
    if quality in df.columns:
        for phase, cost in costs.items():
            if cost not in df.columns:
                continue
            front = pareto_front(df, quality, cost)
            summary["pareto"][phase] = {"cost_metric": cost, "front": list(front["architecture"])}
        front = summary["pareto"].get("inference", {}).get("front", [])
        for cheaper, dearer in zip(front, front[1:], strict=False):
            for metric in metrics:
                row = paired_lookup(paired, dearer, cheaper, metric)
                if row is not None:
                    summary["paired_pareto_neighbours"].append(row)
        cost_metric = None if config.champion.cost_metric == "auto" else config.champion.cost_metric
        decision = decide_champion(df, quality, config.champion.mode, rule=config.champion.rule, paired=paired, cost_metric=cost_metric)
        summary["champion"] = decision.as_dict() if decision else None
    target = target_metric or config.report.metric or quality
    mode = config.champion.mode if target == quality else ("max" if higher_is_better(target) else "min")
    cost_metric = None if config.champion.cost_metric == "auto" else config.champion.cost_metric
    recommendation = recommend(df, constraints or constraints_from(config), target, mode, rule=config.champion.rule, paired=paired,
                               cost_metric=cost_metric)
    summary["recommendation"] = recommendation.as_dict()
    return {"table": comparison_table(df), "paired": paired, "summary": summary, "frame": df, "recommendation": recommendation}


def build_comparison(ws, config, out_dir: Path) -> dict[str, Any]:
    """Read the enabled architectures' results and write the comparison into `out_dir` (which must
    exist and be empty or be a temporary folder), the report for params.yaml's `report:`
    constraints included. Returns the summary (with display rows)."""
    from ragops.compare.plots import plot_pareto
    from ragops.compare.report import write_report

    names, missing = with_results(ws, config.enabled_architectures())
    result = analyse(load_inputs(ws, names, config.architectures), config)
    if missing:
        result["summary"]["messages"].insert(0, f"no evaluation results for {', '.join(missing)}: not compared (run: ragops evaluate {' '.join(missing)})")
        result["summary"]["not_evaluated"] = missing
    table, paired, summary, df = result["table"], result["paired"], result["summary"], result["frame"]
    table.to_csv(out_dir / "comparison.csv", index=False)
    write_json(out_dir / "comparison.json", _records(table))
    paired.to_csv(out_dir / "paired.csv", index=False)
    for phase, spec in summary["pareto"].items():
        plot_pareto(df, summary["quality_metric"], spec["cost_metric"], out_dir / f"pareto-{phase}.png", out_dir / f"pareto-{phase}.html")
    write_report(out_dir, df, summary, result["recommendation"])
    write_json(out_dir / "summary.json", summary)
    return {**summary, "table": _records(table), "display": format_table(table)}


def build_report(ws, config, out_dir: Path, constraints: Constraints, metric: str | None = None) -> dict[str, Any]:
    """The report alone, for other constraints or another metric than params.yaml's: report.md,
    report.html and the Pareto PNGs it links to, written into `out_dir` (replaced whole)."""
    from ragops.compare.plots import plot_pareto
    from ragops.compare.report import write_report
    from ragops.io import atomic_dir

    names, missing = with_results(ws, config.enabled_architectures())
    result = analyse(load_inputs(ws, names or missing, config.architectures), config, constraints, metric)
    if missing:
        result["summary"]["messages"].insert(0, f"no evaluation results for {', '.join(missing)}: not compared (run: ragops evaluate {' '.join(missing)})")
    summary, df = result["summary"], result["frame"]
    target = result["recommendation"].metric
    if target not in df.columns:
        raise ConfigError(f"report metric '{target}': not reported by any architecture (reported: {', '.join(quality_metrics(df)) or 'none'})")
    with atomic_dir(out_dir) as tmp:
        if target in df.columns:
            for phase, cost in (("inference", cost_metric_for(target, df.columns)), ("train", TRAIN_COST)):
                if cost in df.columns:
                    summary["pareto"][phase] = {"cost_metric": cost, "front": list(pareto_front(df, target, cost)["architecture"])}
                    plot_pareto(df, target, cost, tmp / f"pareto-{phase}.png", tmp / f"pareto-{phase}.html")
        paths = write_report(tmp, df, summary, result["recommendation"])
    return {**summary, "files": sorted(str(out_dir / p.name) for p in paths.values())}
