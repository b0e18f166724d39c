"""Plots of the comparison: quality against cost, one point per architecture, Pareto front.

Writes a matplotlib PNG and an altair HTML page that embeds the Vega runtime (vl-convert-python),
so both open on an offline machine. Families are told apart by colour and by marker (readable in
greyscale too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ragops.compare.analysis import higher_is_better, pareto_front

FAMILY_STYLE = {
    "baseline": {"color": "#7f7f7f", "marker": "s", "shape": "square"},
    "black-box": {"color": "#1f77b4", "marker": "o", "shape": "circle"},
    "white-box": {"color": "#d62728", "marker": "^", "shape": "triangle-up"},
}
_OTHER_STYLE = {"color": "#2ca02c", "marker": "D", "shape": "diamond"}


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

