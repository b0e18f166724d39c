"""Compare RAG architectures across quality and cost, from the runs MLflow recorded.

Pure functions over a DataFrame (one row per architecture, one column per metric key), plus one
MLflow reader (`collect_runs`) and one MLflow writer (`register_champion`):

- `collect_runs`: the architecture child runs (`ragops.kind=architecture`) of one pipeline run;
- `comparison_table`: quality metrics with their bootstrap CIs, training and inference cost;
- `pareto_front` / `plot_pareto`: which architectures are not beaten on both quality and cost,
  as a matplotlib PNG and an interactive altair HTML (families by colour and marker);
- `register_champion`: the best architecture by `config.champion` becomes a registered model
  version (a small pyfunc carrying the architecture's configuration) with the `champion` alias;
- `run_compare`: all of the above into `ws.compare_dir` (the `compare` stage calls it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import pandas as pd

from ragops.errors import RagopsError

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
# Families are told apart by colour and by marker (readable in greyscale too).
FAMILY_STYLE = {
    "baseline": {"color": "#7f7f7f", "marker": "s", "shape": "square"},
    "black-box": {"color": "#1f77b4", "marker": "o", "shape": "circle"},
    "white-box": {"color": "#d62728", "marker": "^", "shape": "triangle-up"},
}
_OTHER_STYLE = {"color": "#2ca02c", "marker": "D", "shape": "diamond"}
_LOWER_IS_BETTER = ("ppl", "perplexity", "loss", "latency", "wall_s", "cpu_s", "gpu_s", "cost", "flops", "tokens", "rss", "bytes")


def _mlflow():
    import mlflow

    return mlflow


def higher_is_better(metric: str) -> bool:
    """Direction of a metric from its name: perplexities, latencies and costs go down."""
    name = metric.split("/")[-1].lower()
    return not any(token in name for token in _LOWER_IS_BETTER) and not metric.startswith(("train/", "inference/"))


def is_quality_metric(key: str) -> bool:
    return "/" in key and not key.startswith(COST_PREFIXES) and not key.endswith(CI_SUFFIXES)


# ------------------------------------------------------------------------------------------------
# MLflow reader
# ------------------------------------------------------------------------------------------------


def _client(tracking_uri: str | None = None):
    mlflow = _mlflow()
    return mlflow.MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri())


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
    client = _client(tracking_uri)
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


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------


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


def _style(family: str) -> dict[str, str]:
    return FAMILY_STYLE.get(family, _OTHER_STYLE)


def plot_pareto(df: pd.DataFrame, quality_metric: str, cost_metric: str, png: str | Path, html: str | Path, *, title: str | None = None) -> dict[str, Any]:
    """Quality against cost, one point per architecture (error bar = bootstrap CI when logged),
    families by colour and marker, the Pareto front as a step line. Writes a matplotlib PNG and an
    altair HTML (tooltips with every number). Returns {"front": [names], "png", "html"}."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import altair as alt
    import matplotlib.pyplot as plt

    png, html = Path(png), Path(html)
    png.parent.mkdir(parents=True, exist_ok=True)
    html.parent.mkdir(parents=True, exist_ok=True)
    data = df.dropna(subset=[quality_metric, cost_metric]).copy() if {quality_metric, cost_metric} <= set(df.columns) else df.iloc[0:0].copy()
    front = pareto_front(data, quality_metric, cost_metric)
    low, high = f"{quality_metric}_ci_low", f"{quality_metric}_ci_high"
    has_ci = low in data.columns and high in data.columns
    direction = "higher is better" if higher_is_better(quality_metric) else "lower is better"
    title = title or f"{quality_metric} ({direction}) vs {cost_metric}"
    positive = not data.empty and (data[cost_metric] > 0).all()
    log_x = bool(positive and data[cost_metric].max() / max(data[cost_metric].min(), 1e-300) > 100)

    # --- matplotlib PNG ---
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for family, group in data.groupby("family", sort=True):
        style = _style(family)
        yerr = None
        if has_ci and group[[low, high]].notna().all().all():
            yerr = [(group[quality_metric] - group[low]).clip(lower=0), (group[high] - group[quality_metric]).clip(lower=0)]
        ax.errorbar(
            group[cost_metric], group[quality_metric], yerr=yerr, fmt=style["marker"], color=style["color"],
            markersize=9, capsize=4, linestyle="none", label=family,
        )
        for _, row in group.iterrows():
            ax.annotate(row["architecture"], (row[cost_metric], row[quality_metric]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if len(front) >= 1:
        ax.step(front[cost_metric], front[quality_metric], where="post", color="black", linestyle="--", linewidth=1, label="Pareto front")
    if log_x:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set_xlabel(f"{cost_metric} (lower is better)")
    ax.set_ylabel(f"{quality_metric} ({direction})")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if not data.empty:
        ax.legend(title="family", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no architecture has both metrics", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

    # --- altair HTML ---
    families = sorted(data["family"].unique()) if not data.empty else list(FAMILY_STYLE)
    color = alt.Color("family:N", scale=alt.Scale(domain=families, range=[_style(f)["color"] for f in families]))
    shape = alt.Shape("family:N", scale=alt.Scale(domain=families, range=[_style(f)["shape"] for f in families]))
    plot_data = data.rename(columns={quality_metric: "quality", cost_metric: "cost", low: "ci_low", high: "ci_high"})
    plot_data["pareto"] = plot_data["architecture"].isin(set(front["architecture"])) if not front.empty else False
    keep = ["architecture", "family", "finetune", "quality", "cost", "pareto", *(["ci_low", "ci_high"] if has_ci else [])]
    plot_data = plot_data[[c for c in keep if c in plot_data.columns]]
    x = alt.X("cost:Q", title=f"{cost_metric} (lower is better)", scale=alt.Scale(type="log" if log_x else "linear", zero=False, padding=60))  # room for labels
    y = alt.Y("quality:Q", title=f"{quality_metric} ({direction})", scale=alt.Scale(zero=False, padding=20))
    base = alt.Chart(plot_data)
    tooltip = [c for c in plot_data.columns]
    layers = [
        base.mark_point(size=140, filled=True).encode(x=x, y=y, color=color, shape=shape, tooltip=tooltip),
        base.mark_text(dx=8, dy=-8, align="left").encode(x=x, y=y, text="architecture:N"),
    ]
    if has_ci:
        layers.insert(0, base.mark_rule().encode(x=x, y="ci_low:Q", y2="ci_high:Q", color=color))
    if not front.empty:
        front_data = front.rename(columns={quality_metric: "quality", cost_metric: "cost"})[["architecture", "quality", "cost"]]
        layers.append(alt.Chart(front_data).mark_line(interpolate="step-after", strokeDash=[6, 4], color="black").encode(x=x, y=y))
    chart = alt.layer(*layers).properties(title=title, width=560, height=360).interactive()
    # inline=True embeds the Vega JavaScript (from vl-convert-python) instead of linking a CDN:
    # the page must open on an offline machine.
    chart.save(str(html), inline=True)
    return {"front": list(front["architecture"]), "png": str(png), "html": str(html)}


def pick_champion(df: pd.DataFrame, metric: str, mode: str = "max") -> pd.Series | None:
    """The row with the best `metric` (ties: the first architecture alphabetically), or None."""
    if df.empty or metric not in df.columns:
        return None
    data = df.dropna(subset=[metric]).sort_values("architecture")
    if data.empty:
        return None
    index = data[metric].idxmax() if mode == "max" else data[metric].idxmin()
    return data.loc[index]


# ------------------------------------------------------------------------------------------------
# Model registry
# ------------------------------------------------------------------------------------------------

def architecture_card(row: pd.Series, config=None) -> dict[str, Any]:
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
        "parent_run_id": row.get("parent_run_id"),
        "metrics": metrics,
    }
    if config is not None:
        card.update(profile=config.profile, lm=config.section("lm"), embed=config.section("embed"), index=config.section("index"), chunk=config.section("chunk"))
    return card


def register_champion(
    row: pd.Series,
    *,
    registered_model: str,
    alias: str,
    metric: str,
    config=None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Register `row`'s architecture as a new version of `registered_model` and point `alias` at it.

    Idempotent: when the alias already points at a version made from the same source run, that
    version is kept. Returns {name, version, alias, architecture, metric, value, uri}.
    """
    from ragops.ops.champion import ArchitectureCard

    mlflow = _mlflow()
    client = _client(tracking_uri)
    source_run = str(row["run_id"])
    value = float(row[metric])
    result = {"registered_model": registered_model, "alias": alias, "architecture": str(row["architecture"]), "family": row.get("family"),
              "metric": metric, "value": value, "source_run_id": source_run, "uri": f"models:/{registered_model}@{alias}"}
    try:
        current = client.get_model_version_by_alias(registered_model, alias)
    except Exception:  # noqa: BLE001 - no such model or alias yet
        current = None
    if current is not None and current.tags.get("source_run_id") == source_run:
        return {**result, "version": str(current.version), "new_version": False}

    card = architecture_card(row, config)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        # Quiet: the card is pickled on purpose (a class of this package), has no signature on
        # purpose (it takes any input), and its tiny artifact needs no progress bar.
        _quiet = [logging.getLogger(n) for n in ("mlflow.pyfunc", "mlflow.models.model", "mlflow.models.signature")]
        _levels = [logger.level for logger in _quiet]
        for logger in _quiet:
            logger.setLevel(logging.ERROR)
        _bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        with tempfile.TemporaryDirectory(prefix="ragops-card-") as tmp:
            path = Path(tmp) / "card.json"
            path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str), encoding="utf-8")
            info = mlflow.pyfunc.log_model(
                name="champion",
                python_model=ArchitectureCard(),  # carries card.json; see ragops.ops.champion
                artifacts={"card": str(path)},
                pip_requirements=[f"mlflow=={mlflow.__version__}", "pandas"],
                registered_model_name=registered_model,
                tags={"architecture": card["architecture"], "source_run_id": source_run},
            )
    finally:
        mlflow.set_tracking_uri(previous_uri)
        for logger, level in zip(_quiet, _levels, strict=True):
            logger.setLevel(level)
        if _bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = _bar
    version = str(info.registered_model_version)
    for key, tag in {"architecture": card["architecture"], "family": card["family"], "source_run_id": source_run, "metric": metric, "value": value}.items():
        client.set_model_version_tag(registered_model, version, key, str(tag))
    client.set_registered_model_alias(registered_model, alias, version)
    return {**result, "version": version, "new_version": True}


# ------------------------------------------------------------------------------------------------
# The compare stage's body
# ------------------------------------------------------------------------------------------------


def _pick_cost(df: pd.DataFrame, candidates: list[str]) -> str | None:
    for key in candidates:
        if key in df.columns and df[key].notna().any():
            return key
    return None


def run_compare(ws, config, parent_run_id: str | None = None, *, register: bool = True) -> dict[str, Any]:
    """collect → table → Pareto plots (quality vs inference cost, quality vs training cost) into
    `ws.compare_dir` → champion registration. Returns a JSON-able summary (the table included)."""
    from ragops.env import tracking_uri as default_uri
    from ragops.io import atomic_dir, write_json

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri(ws.root)
    df = collect_runs(config.tracking.experiment, parent_run_id, tracking_uri=uri)
    quality = config.champion.metric
    summary: dict[str, Any] = {
        "parent_run_id": df.attrs.get("parent_run_id"), "source": df.attrs.get("source"),
        "architectures": len(df), "quality_metric": quality, "files": [], "pareto": {}, "champion": None, "table": [],
    }
    if df.empty:
        summary["message"] = f"no finished architecture runs in experiment '{config.tracking.experiment}' (run: ragops evaluate)"
        return summary
    if quality not in df.columns:
        available = ", ".join(quality_metrics(df)) or "none"
        summary["message"] = f"champion.metric '{quality}' was not logged by any architecture (logged: {available})"
    table = comparison_table(df)
    summary["table"] = json.loads(table.to_json(orient="records"))
    summary["display"] = format_table(table)
    plots = {
        "inference": _pick_cost(df, ["inference/cost_usd_per_1k_questions", "inference/wall_s_per_1k_questions", "inference/cost_usd", "inference/wall_s"]),
        "train": _pick_cost(df, ["train/cost_usd", "train/wall_s", "train/flops"]),
    }
    with atomic_dir(ws.compare_dir) as tmp:
        table.to_csv(tmp / "comparison.csv", index=False)
        write_json(tmp / "comparison.json", summary["table"])
        for phase, cost in plots.items():
            if cost is None or quality not in df.columns:
                continue
            out = plot_pareto(df, quality, cost, tmp / f"pareto-{phase}.png", tmp / f"pareto-{phase}.html")
            summary["pareto"][phase] = {"cost_metric": cost, "front": out["front"]}
        champion = pick_champion(df, quality, config.champion.mode)
        if champion is not None:
            summary["champion"] = {"architecture": str(champion["architecture"]), "family": champion.get("family"),
                                   "metric": quality, "value": float(champion[quality]), "run_id": str(champion["run_id"])}
            if register:
                summary["champion"].update(register_champion(
                    champion, registered_model=config.champion.registered_model, alias=config.champion.alias,
                    metric=quality, config=config, tracking_uri=uri,
                ))
        write_json(tmp / "summary.json", {k: v for k, v in summary.items() if k not in ("table", "display")})
        summary["files"] = sorted(str(ws.compare_dir / p.name) for p in tmp.iterdir())
    return summary


def mlflow_compare_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The MLflow UI's compare-runs page for these runs (MLflow 3's hash route
    `/#/compare-runs?runs=[...]&experiments=[...]`, as in its `getCompareRunPageRoute`)."""
    def encode(values: list[str]) -> str:
        return urllib.parse.quote(json.dumps(values, separators=(",", ":")), safe="[],:")

    runs = encode([str(r) for r in run_ids])
    experiments = encode(sorted({str(e) for e in experiment_ids}))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"
