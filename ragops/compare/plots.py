"""Plots of the comparison: quality against cost, one point per architecture, Pareto front.

Writes a matplotlib PNG and an altair HTML page that embeds the Vega runtime (vl-convert-python),
so both open on an offline machine. The mission's families (closed book; black-box without and
with retriever fine-tuning; white-box LM-only; white-box co-training) are told apart by colour
and by marker (readable in greyscale too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ragops.compare.analysis import MISSION_GROUPS, OTHER_GROUP, group_order, higher_is_better, mission_group, pareto_front

GROUP_STYLE = {
    "closed book": {"color": "#7f7f7f", "marker": "s", "shape": "square"},
    "black-box, no fine-tuning": {"color": "#1f77b4", "marker": "o", "shape": "circle"},
    "black-box, retriever fine-tuned": {"color": "#17becf", "marker": "D", "shape": "diamond"},
    "white-box, LM fine-tuned": {"color": "#d62728", "marker": "^", "shape": "triangle-up"},
    "white-box, co-trained": {"color": "#9467bd", "marker": "v", "shape": "triangle-down"},
    OTHER_GROUP: {"color": "#2ca02c", "marker": "P", "shape": "cross"},
}
assert set(GROUP_STYLE) == {g[0] for g in MISSION_GROUPS} | {OTHER_GROUP}


def style(group: str) -> dict[str, str]:
    return GROUP_STYLE.get(group, GROUP_STYLE[OTHER_GROUP])


def axis_scale(values: pd.Series | list[float]) -> tuple[str, float | None]:
    """("linear" | "log" | "symlog", linear threshold) for a cost axis.

    Log when the positive costs span more than two decades. With exact zeros among them (training
    cost of methods that train nothing next to ones that train for hours), log(0) would drop those
    from the plot: symlog instead (linear up to the smallest positive cost, log beyond) as soon as
    the positive costs span more than one decade.
    """
    data = pd.Series(values, dtype=float).dropna()
    positive = data[data > 0]
    span = positive.max() / positive.min() if len(positive) >= 2 else 1.0
    if (data <= 0).any():
        return ("symlog", float(positive.min())) if span > 10 else ("linear", None)
    return ("log", None) if span > 100 else ("linear", None)


def plot_pareto(df: pd.DataFrame, quality_metric: str, cost_metric: str, png: str | Path, html: str | Path, *, title: str | None = None) -> dict[str, Any]:
    """Quality against cost, one point per architecture (error bar = bootstrap CI when logged),
    families by colour and marker, the Pareto front as a step line. Writes a matplotlib PNG and an
    altair HTML (tooltips with every number). Returns {"front": [names], "png", "html", "scale"}."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import altair as alt
    import matplotlib.pyplot as plt

    png, html = Path(png), Path(html)
    png.parent.mkdir(parents=True, exist_ok=True)
    html.parent.mkdir(parents=True, exist_ok=True)
    data = df.dropna(subset=[quality_metric, cost_metric]).copy() if {quality_metric, cost_metric} <= set(df.columns) else df.iloc[0:0].copy()
    if "group" not in data.columns:
        data["group"] = [mission_group(f, t) for f, t in zip(data.get("family", []), data.get("finetune", []), strict=False)] if len(data) else []
    front = pareto_front(data, quality_metric, cost_metric)
    low, high = f"{quality_metric}_ci_low", f"{quality_metric}_ci_high"
    has_ci = low in data.columns and high in data.columns
    direction = "higher is better" if higher_is_better(quality_metric) else "lower is better"
    title = title or f"{quality_metric} ({direction}) vs {cost_metric}"
    scale, linthresh = axis_scale(data[cost_metric]) if not data.empty else ("linear", None)
    groups = sorted(data["group"].unique(), key=group_order) if not data.empty else []

    # --- matplotlib PNG ---
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for group in groups:
        rows = data[data["group"] == group]
        look = style(group)
        yerr = None
        if has_ci and rows[[low, high]].notna().all().all():
            yerr = [(rows[quality_metric] - rows[low]).clip(lower=0), (rows[high] - rows[quality_metric]).clip(lower=0)]
        ax.errorbar(
            rows[cost_metric], rows[quality_metric], yerr=yerr, fmt=look["marker"], color=look["color"],
            markersize=9, capsize=4, linestyle="none", label=group,
        )
        for _, row in rows.iterrows():
            ax.annotate(row["architecture"], (row[cost_metric], row[quality_metric]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if len(front) >= 1:
        ax.step(front[cost_metric], front[quality_metric], where="post", color="black", linestyle="--", linewidth=1, label="Pareto front")
    if scale == "log":
        ax.set_xscale("log")
    elif scale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh)
    ax.margins(x=0.22, y=0.1)  # room for the labels
    ax.set_xlabel(f"{cost_metric} (lower is better)")
    ax.set_ylabel(f"{quality_metric} ({direction})")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if not data.empty:
        ax.legend(title="family", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no architecture has both metrics", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png, metadata={"Software": None})  # no version string: identical inputs, identical bytes
    plt.close(fig)

    # --- altair HTML ---
    chart = pareto_chart(data, front, quality_metric, cost_metric, title=title, scale=scale, linthresh=linthresh)
    # inline=True embeds the Vega JavaScript (from vl-convert-python) instead of linking a CDN:
    # the page must open on an offline machine.
    chart.save(str(html), inline=True)
    return {"front": list(front["architecture"]), "png": str(png), "html": str(html), "scale": scale}


def pareto_chart(data: pd.DataFrame, front: pd.DataFrame, quality_metric: str, cost_metric: str, *, title: str,
                 scale: str = "linear", linthresh: float | None = None):
    """The interactive altair chart of `plot_pareto` (also embedded in the report page)."""
    import altair as alt

    low, high = f"{quality_metric}_ci_low", f"{quality_metric}_ci_high"
    has_ci = low in data.columns and high in data.columns
    direction = "higher is better" if higher_is_better(quality_metric) else "lower is better"
    groups = sorted(data["group"].unique(), key=group_order) if not data.empty else [g[0] for g in MISSION_GROUPS]
    color = alt.Color("group:N", title="family", scale=alt.Scale(domain=groups, range=[style(g)["color"] for g in groups]))
    shape = alt.Shape("group:N", title="family", scale=alt.Scale(domain=groups, range=[style(g)["shape"] for g in groups]))
    plot_data = data.rename(columns={quality_metric: "quality", cost_metric: "cost", low: "ci_low", high: "ci_high"})
    plot_data["pareto"] = plot_data["architecture"].isin(set(front["architecture"])) if not front.empty else False
    keep = ["architecture", "group", "family", "finetune", "quality", "cost", "pareto", *(["ci_low", "ci_high"] if has_ci else [])]
    plot_data = plot_data[[c for c in keep if c in plot_data.columns]]
    scale_kwargs: dict[str, Any] = {"type": scale, "zero": False, "padding": 60}  # room for labels
    if scale == "symlog" and linthresh:
        scale_kwargs["constant"] = linthresh
    x = alt.X("cost:Q", title=f"{cost_metric} (lower is better)", scale=alt.Scale(**scale_kwargs))
    y = alt.Y("quality:Q", title=f"{quality_metric} ({direction})", scale=alt.Scale(zero=False, padding=20))
    base = alt.Chart(plot_data)
    tooltip = list(plot_data.columns)
    layers = [
        base.mark_point(size=140, filled=True).encode(x=x, y=y, color=color, shape=shape, tooltip=tooltip),
        base.mark_text(dx=8, dy=-8, align="left").encode(x=x, y=y, text="architecture:N"),
    ]
    if has_ci:
        layers.insert(0, base.mark_rule().encode(x=x, y="ci_low:Q", y2="ci_high:Q", color=color))
    if not front.empty:
        front_data = front.rename(columns={quality_metric: "quality", cost_metric: "cost"})[["architecture", "quality", "cost"]]
        layers.append(alt.Chart(front_data).mark_line(interpolate="step-after", strokeDash=[6, 4], color="black").encode(x=x, y=y))
    return alt.layer(*layers).properties(title=title, width=560, height=360).interactive()
