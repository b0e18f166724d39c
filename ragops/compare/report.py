"""The report a user decides from: one self-contained HTML page and a Markdown version.

It puts the mission's families side by side (closed book; black-box without and with retriever
fine-tuning; white-box LM-only; white-box co-training), each architecture's quality on every task
with 95% CIs, training compute, inference compute per 1,000 questions, latency, trainable
parameters and index refreshes; the Pareto fronts of quality against inference and training
cost; paired comparisons on the same items; and the recommendation for the user's constraints,
with the reason. Families are read from each architecture's `family`/`finetune` tags, so a new
architecture appears in its family without any change here.

The HTML opens offline: the Vega runtime is embedded (vl-convert-python), nothing is fetched.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ragops.compare.analysis import (
    CI_SUFFIXES,
    LATENCY,
    MISSION_GROUPS,
    TRAIN_WALL,
    Recommendation,
    format_difference,
    format_value,
    group_order,
    quality_metrics,
)

MARKDOWN = "report.md"
HTML = "report.html"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    value = float(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.{digits}g}"
    return f"{value:,.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def _quality(row: dict[str, Any], key: str) -> str:
    return format_value(row.get(key), row.get(f"{key}{CI_SUFFIXES[0]}"), row.get(f"{key}{CI_SUFFIXES[1]}")) if key in row else "—"


def _hours(row: dict[str, Any]) -> str:
    wall = row.get(TRAIN_WALL)
    if wall is None or pd.isna(wall):
        return "—"
    return "0 (trains nothing)" if float(wall) == 0 else f"{float(wall) / 3600:.3g} h"


def families_rows(df: pd.DataFrame, metric: str) -> list[dict[str, str]]:
    """One row per architecture, grouped by mission family in the mission's order; a family with
    no architecture yet gets one row saying so (the comparison always shows all five)."""
    rows = []
    records = df.to_dict(orient="records")
    for label, _, _ in MISSION_GROUPS + [("other", (), ())]:
        members = [r for r in records if r.get("group") == label]
        if not members and label == "other":
            continue
        if not members:
            rows.append({"family": label, "architecture": "(none evaluated yet)"})
            continue
        for r in members:
            rows.append({
                "family": label,
                "architecture": str(r["architecture"]),
                metric: _quality(r, metric),
                "training (wall)": _hours(r),
                "training FLOPs": _num(r.get("train/flops")),
                "inference USD / 1k questions": _num(r.get("inference/qa/cost_usd_per_1k_questions")),
                "inference FLOPs / 1k questions": _num(r.get("inference/qa/flops_per_1k_questions")),
                "latency (ms / question)": _num(r.get(LATENCY)),
                "trainable params": _num(r.get("train/params_trainable", r.get("inference/params_trainable")), 4),
                "index refreshes": _num(r.get("train/index_refreshes")),
            })
    columns = ["family", "architecture", metric, "training (wall)", "training FLOPs", "inference USD / 1k questions",
               "inference FLOPs / 1k questions", "latency (ms / question)", "trainable params", "index refreshes"]
    return [{c: row.get(c, "") for c in columns} for row in rows]


def quality_rows(df: pd.DataFrame) -> list[dict[str, str]]:
    metrics = quality_metrics(df)
    ordered = sorted(df.to_dict(orient="records"), key=lambda r: (group_order(r.get("group", "")), 0))
    return [{"architecture": str(r["architecture"]), **{m: _quality(r, m) for m in metrics}} for r in ordered]


def paired_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {
            "A": r["a"], "B": r["b"], "metric": r["metric"], "A − B [95% CI]": format_difference(r),
            "items where A is better": f"{r['a_better']} of {r['n']}" + (f" ({r['b_better']} worse)" if r.get("b_better") else ""),
            "significant": "yes" if r.get("significant") else "no",
        }
        for r in rows
    ]


def report_sections(df: pd.DataFrame, summary: dict[str, Any], recommendation: Recommendation) -> dict[str, Any]:
    """Everything the report shows, as plain data (rendered to Markdown and HTML below)."""
    metric = recommendation.metric
    return {
        "title": "Which architecture should I ship?",
        "recommendation": recommendation.as_dict(),
        "constraints": recommendation.constraints.describe(),
        "families": families_rows(df, metric),
        "quality": quality_rows(df),
        "paired_vs_baseline": paired_rows(summary.get("paired_vs_baseline") or []),
        # pairs already shown against the baseline are not repeated
        "paired_neighbours": paired_rows([r for r in summary.get("paired_pareto_neighbours") or []
                                          if not any((r["a"], r["b"], r["metric"]) == (b["a"], b["b"], b["metric"])
                                                     for b in summary.get("paired_vs_baseline") or [])]),
        "pareto": summary.get("pareto") or {},
        "champion": summary.get("champion"),
        "messages": summary.get("messages") or [],
    }


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _md_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    columns = list(rows[0])
    cell = lambda v: str(v).replace("|", "/").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return [*lines, ""]


def render_markdown(sections: dict[str, Any]) -> str:
    rec = sections["recommendation"]
    lines = [f"# {sections['title']}", "", "## Recommendation", ""]
    lines.append(f"**{rec['architecture']}** — {rec['reason']}." if rec["architecture"] else f"**No recommendation**: {rec['reason']}.")
    lines += ["", "Your constraints:", "", *[f"- {c}" for c in sections["constraints"]], ""]
    if rec["excluded"]:
        lines += ["Excluded:", "", *[f"- {name}: {why}" for name, why in rec["excluded"].items()], ""]
    lines += ["## The families side by side", "", f"Quality: {rec['metric']} with its 95% bootstrap CI. Latency is the mean wall-clock "
              "time per question of the batched evaluation; costs are measured on this machine.", ""]
    lines += _md_table(sections["families"])
    lines += ["## Quality on every task (95% CI)", "", *_md_table(sections["quality"])]
    lines += ["## Pareto fronts", ""]
    for phase, spec in sections["pareto"].items():
        lines += [f"Quality vs {phase} cost ({spec['cost_metric']}); on the front: {', '.join(spec['front']) or '—'}.", "",
                  f"![quality vs {phase} cost](pareto-{phase}.png)", ""]
    lines += ["## Paired comparisons", "", "Every architecture answers the same questions and scores the same held-out articles: "
              "differences get a paired bootstrap interval (items resampled, A − B on the same resample).", ""]
    lines += ["Against the closed-book baseline:", "", *_md_table(sections["paired_vs_baseline"])]
    lines += ["Between neighbours on the Pareto front (quality vs inference cost; pairs shown above left out):", "",
              *_md_table(sections["paired_neighbours"])]
    if sections["champion"]:
        lines += [f"Registered champion: **{sections['champion']['architecture']}** — {sections['champion']['reason']}.", ""]
    lines += [f"> {m}" for m in sections["messages"]]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------
# HTML (self-contained)
# ------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td:first-child, td:nth-child(2), th:first-child { text-align: left; }
.recommendation { background: #eef6ee; border-left: 5px solid #2a7a2a; padding: 0.8em 1.2em; }
.none { background: #fbeeee; border-left-color: #a33; }
.note { color: #555; font-size: 0.9em; }
"""


def _html_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p class='note'>(none)</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(sections: dict[str, Any], charts: dict[str, Any]) -> str:
    """The report page; `charts` maps a phase to its altair chart (embedded as a Vega-Lite spec)."""
    from altair.utils._importers import import_vl_convert, vl_version_for_vl_convert

    rec = sections["recommendation"]
    esc = html.escape
    parts = [f"<h1>{esc(sections['title'])}</h1>", "<h2>Recommendation</h2>"]
    if rec["architecture"]:
        parts.append(f"<div class='recommendation'><b>{esc(rec['architecture'])}</b> — {esc(rec['reason'])}.</div>")
    else:
        parts.append(f"<div class='recommendation none'><b>No recommendation</b>: {esc(rec['reason'])}.</div>")
    parts.append("<p>Your constraints:</p><ul>" + "".join(f"<li>{esc(c)}</li>" for c in sections["constraints"]) + "</ul>")
    if rec["excluded"]:
        parts.append("<p>Excluded:</p><ul>" + "".join(f"<li><b>{esc(n)}</b>: {esc(w)}</li>" for n, w in rec["excluded"].items()) + "</ul>")
    parts += ["<h2>The families side by side</h2>",
              f"<p class='note'>Quality: {esc(rec['metric'])} with its 95% bootstrap CI. Latency is the mean wall-clock time per "
              "question of the batched evaluation; costs are measured on this machine.</p>", _html_table(sections["families"])]
    parts += ["<h2>Quality on every task (95% CI)</h2>", _html_table(sections["quality"])]
    parts.append("<h2>Pareto fronts</h2>")
    specs = {}
    for phase, spec in sections["pareto"].items():
        parts.append(f"<p>Quality vs {esc(phase)} cost (<code>{esc(spec['cost_metric'])}</code>); on the front: "
                     f"{esc(', '.join(spec['front']) or '—')}.</p><div id='pareto-{esc(phase)}'></div>")
        if phase in charts:
            specs[f"pareto-{phase}"] = charts[phase].to_dict()
    parts += ["<h2>Paired comparisons</h2>",
              "<p class='note'>Every architecture answers the same questions and scores the same held-out articles: differences "
              "get a paired bootstrap interval (items resampled, A − B on the same resample); n.s. = the interval includes 0.</p>",
              "<p>Against the closed-book baseline:</p>", _html_table(sections["paired_vs_baseline"]),
              "<p>Between neighbours on the Pareto front (quality vs inference cost; pairs shown above left out):</p>",
              _html_table(sections["paired_neighbours"])]
    if sections["champion"]:
        parts.append(f"<p>Registered champion: <b>{esc(sections['champion']['architecture'])}</b> — {esc(sections['champion']['reason'])}.</p>")
    parts += [f"<p class='note'>{esc(m)}</p>" for m in sections["messages"]]
    bundle = import_vl_convert().javascript_bundle(vl_version=vl_version_for_vl_convert()) if specs else ""
    embeds = "".join(f"vegaEmbed('#{name}', {json.dumps(spec, sort_keys=True)}, {{\"actions\": false}}).catch(console.error);\n"
                     for name, spec in specs.items())
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='UTF-8'>\n"
        f"<title>{esc(sections['title'])}</title>\n<style>{_CSS}</style>\n"
        + (f"<script type='text/javascript'>\n{bundle}\n</script>\n" if bundle else "")
        + "</head>\n<body>\n" + "\n".join(parts)
        + (f"\n<script type='text/javascript'>\n{embeds}</script>\n" if embeds else "\n")
        + "</body>\n</html>\n"
    )


def write_report(out_dir: Path, df: pd.DataFrame, summary: dict[str, Any], recommendation: Recommendation) -> dict[str, Path]:
    """report.md and report.html into `out_dir` (beside the pareto-*.png the Markdown links to)."""
    from ragops.compare.analysis import pareto_front
    from ragops.compare.plots import axis_scale, pareto_chart
    from ragops.io import atomic_file

    sections = report_sections(df, summary, recommendation)
    charts = {}
    for phase, spec in sections["pareto"].items():
        quality, cost = recommendation.metric, spec["cost_metric"]
        if quality in df.columns and cost in df.columns:
            data = df.dropna(subset=[quality, cost])
            scale, linthresh = axis_scale(data[cost])
            charts[phase] = pareto_chart(data, pareto_front(data, quality, cost), quality, cost,
                                         title=f"{quality} vs {cost}", scale=scale, linthresh=linthresh)
    paths = {"markdown": out_dir / MARKDOWN, "html": out_dir / HTML}
    with atomic_file(paths["markdown"]) as handle:
        handle.write(render_markdown(sections))
    with atomic_file(paths["html"]) as handle:
        handle.write(render_html(sections, charts))
    return paths
