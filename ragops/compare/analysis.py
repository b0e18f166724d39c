"""Pure comparison analysis over a table with one row per architecture and one column per metric key.

No MLflow, no matplotlib: every function takes and returns plain pandas/Python values, so the
comparison is testable on hand-made tables and is a pure function of its inputs.

- `comparison_table` / `format_table`: quality metrics with their bootstrap CIs, then cost;
- `pareto_front`: which architectures are not beaten on both quality and cost;
- `pick_champion` / `decide_champion`: the best architecture by one metric, by point estimate or
  by the paired-interval rule (a lead counts only when it is significant; ties go to the cheaper);
- `higher_is_better`: a metric's direction from its name.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

ID_COLUMNS = ["architecture", "family", "finetune", "run_id", "parent_run_id", "start_time"]
TASKS = ("describe", "identify", "define", "cloze", "qa", "lm")  # = ragops.config.EVAL_TASKS (no import: pure module)
COST_PREFIXES = ("train/", "inference/", "stage/", "system/")
CI_SUFFIXES = ("_ci_low", "_ci_high")
# Cost columns shown in the comparison table, in this order, when present.
COST_KEYS = [
    "train/wall_s",
    "train/cpu_s",
    "train/gpu_s",
    "train/flops",
    "train/cost_usd",
    "train/params_trainable",
    "train/index_refreshes",
    "inference/qa/wall_s_per_1k_questions",
    "inference/qa/cost_usd_per_1k_questions",
    "inference/qa/flops_per_1k_questions",
    "inference/lm/wall_s_per_1k_tokens",
    "inference/lm/cost_usd_per_1k_tokens",
    "inference/lm/flops_per_1k_tokens",
    "inference/wall_s",
    "inference/flops",
    "inference/tokens_prompt",
    "inference/tokens_retrieved",
    "inference/retrieval_calls",
    "inference/peak_rss_mb",
    "inference/cost_usd",
]
# The families of the mission, in the order a reader compares them: (family, finetune) tags ->
# the group an architecture is shown in. New architectures land in their group by their tags.
MISSION_GROUPS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("closed book", ("baseline",), ()),
    ("black-box, no fine-tuning", ("black-box",), ("none",)),
    ("black-box, retriever fine-tuned", ("black-box",), ("retriever",)),
    ("white-box, LM fine-tuned", ("white-box",), ("lm",)),
    ("white-box, co-trained", ("white-box",), ("joint", "both")),
]
OTHER_GROUP = "other"


def mission_group(family: Any, finetune: Any) -> str:
    """The mission family an architecture belongs to, from its `family` and `finetune` tags."""
    for label, families, finetunes in MISSION_GROUPS:
        if family in families and (not finetunes or finetune in finetunes):
            return label
    return OTHER_GROUP


def group_order(label: str) -> int:
    labels = [g[0] for g in MISSION_GROUPS]
    return labels.index(label) if label in labels else len(labels)


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
    columns = [c for c in ("architecture", "family", "finetune", "group") if c in df.columns]
    for key in quality_metrics(df):
        columns.append(key)
        columns.extend(f"{key}{suffix}" for suffix in CI_SUFFIXES if f"{key}{suffix}" in df.columns)
    columns.extend(key for key in COST_KEYS if key in df.columns)
    columns.extend(sorted(c for c in df.columns if c.startswith("inference/") and c.endswith("/retrieval_rate")))
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


# ------------------------------------------------------------------------------------------------
# Paired comparisons and the champion rule
# ------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones (JSON-serialisable, exact)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def paired_lookup(paired: pd.DataFrame | None, a: str, b: str, metric: str) -> dict[str, Any] | None:
    """The paired difference a − b on `metric` (from a row a−b, or a row b−a negated), or None."""
    if paired is None or paired.empty:
        return None
    rows = paired[(paired["metric"] == metric) & (paired["a"] == a) & (paired["b"] == b)]
    if len(rows):
        return {k: _plain(v) for k, v in rows.iloc[0].items()}
    rows = paired[(paired["metric"] == metric) & (paired["a"] == b) & (paired["b"] == a)]
    if not len(rows):
        return None
    row = {k: _plain(v) for k, v in rows.iloc[0].items()}
    return {
        **row, "a": a, "b": b, "a_value": row["b_value"], "b_value": row["a_value"], "diff": -row["diff"],
        "ci_low": -row["ci_high"], "ci_high": -row["ci_low"], "a_better": row["b_better"], "b_better": row["a_better"],
    }


def cost_metric_for(metric: str, columns: Any = ()) -> str:
    """The per-unit inference cost that goes with a quality metric: QA cost per 1,000 questions for a
    QA task, LM cost per 1,000 tokens for `lm/...` (falling back to older keys when absent)."""
    task = metric.split("/")[0]
    if task == "lm":
        candidates = ["inference/lm/cost_usd_per_1k_tokens", "inference/cost_usd"]
    else:
        candidates = ["inference/qa/cost_usd_per_1k_questions", "inference/cost_usd_per_1k_questions", "inference/cost_usd"]
    present = set(columns)
    return next((c for c in candidates if c in present), candidates[0])


def format_difference(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    mark = "" if row.get("significant", row["ci_low"] > 0 or row["ci_high"] < 0) else " (n.s.)"
    diff, low, high = (float(row[k]) + 0.0 for k in ("diff", "ci_low", "ci_high"))  # + 0.0: no "-0"
    return f"{diff:+.3g} [{low:+.3g}, {high:+.3g}]{mark}"


@dataclass
class ChampionDecision:
    """Which architecture is champion, and why (one sentence a person can check)."""

    architecture: str
    metric: str
    value: float
    reason: str
    best: str  # the best point estimate
    contenders: list[str] = field(default_factory=list)  # not significantly worse than `best`
    cost_metric: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_champion(
    df: pd.DataFrame,
    metric: str,
    mode: str = "max",
    *,
    rule: str = "paired",
    paired: pd.DataFrame | None = None,
    cost_metric: str | None = None,
) -> ChampionDecision | None:
    """The champion among the rows of `df` (one per architecture) by `metric`.

    - rule `point`: the best point estimate (ties: the first name alphabetically).
    - rule `paired` (default): the best point estimate wins only when it is *significantly* better
      than every other architecture, i.e. the paired bootstrap interval of (best − other) on the
      same items excludes 0. The architectures whose interval includes 0 are tied with it; of the
      tied ones (best included) the cheapest by `cost_metric` wins (ties: the better point
      estimate, then the name). A pair without paired data (no per-item predictions) is not
      counted as tied: it is decided by the point estimates.
    """
    if df.empty or metric not in df.columns:
        return None
    data = df.dropna(subset=[metric])
    if data.empty:
        return None
    sign = 1 if mode == "max" else -1
    ranked = sorted(data.to_dict(orient="records"), key=lambda r: (-sign * float(r[metric]), str(r["architecture"])))
    best = ranked[0]
    name = str(best["architecture"])
    direction = "highest" if mode == "max" else "lowest"
    if rule == "point" or len(ranked) == 1:
        reason = f"{name} has the {direction} {metric} ({best[metric]:.4g})" + ("" if len(ranked) > 1 else "; it is the only candidate")
        return ChampionDecision(name, metric, float(best[metric]), reason, name, [name], None)
    if rule != "paired":
        raise ValueError(f"champion rule '{rule}': expected 'paired' or 'point'")
    tied, separated = [best], []
    for other in ranked[1:]:
        row = paired_lookup(paired, name, str(other["architecture"]), metric)
        if row is not None and row["ci_low"] <= 0 <= row["ci_high"]:
            tied.append(other)
        else:
            separated.append((other, row))
    runner_up = ranked[1]
    runner_row = paired_lookup(paired, name, str(runner_up["architecture"]), metric)
    if len(tied) == 1:
        if runner_row is None:
            reason = (f"{name} has the {direction} {metric} ({best[metric]:.4g}); there are no per-item predictions to test "
                      f"its lead over {runner_up['architecture']}, so the point estimates decide")
        else:
            reason = (f"{name} has the {direction} {metric} ({best[metric]:.4g}) and its lead over the runner-up "
                      f"{runner_up['architecture']} is significant (paired Δ {format_difference(runner_row)})")
        return ChampionDecision(name, metric, float(best[metric]), reason, name, [name], cost_metric)
    cost_metric = cost_metric or cost_metric_for(metric, df.columns)

    def cost(row: dict[str, Any]) -> float:
        value = row.get(cost_metric)
        return float(value) if value is not None and not pd.isna(value) else math.inf

    winner = min(tied, key=lambda r: (cost(r), -sign * float(r[metric]), str(r["architecture"])))
    others = ", ".join(str(r["architecture"]) for r in tied if r is not best)
    if winner is best:
        reason = (f"{name} has the {direction} {metric} ({best[metric]:.4g}); {others} {'is' if len(tied) == 2 else 'are'} not "
                  f"significantly worse (paired CI includes 0), and {name} is also the cheapest of them by {cost_metric}")
    else:
        diff = paired_lookup(paired, name, str(winner["architecture"]), metric)
        reason = (f"{name} has the {direction} {metric} ({best[metric]:.4g}) but its lead over {winner['architecture']} is not "
                  f"significant (paired Δ {format_difference(diff)}); {winner['architecture']} is cheaper "
                  f"({cost_metric} {cost(winner):.4g} vs {cost(best):.4g})")
    return ChampionDecision(str(winner["architecture"]), metric, float(winner[metric]), reason, name,
                            [str(r["architecture"]) for r in tied], cost_metric)


# ------------------------------------------------------------------------------------------------
# The recommendation for a user's constraints
# ------------------------------------------------------------------------------------------------

TRAIN_WALL = "train/wall_s"
LATENCY = "inference/qa/wall_s_per_1k_questions"  # seconds per 1,000 questions = mean ms per question


@dataclass(frozen=True)
class Constraints:
    """What the user can live with: an LM reachable only through an API (black-box methods only),
    a training budget, a latency budget."""

    black_box_only: bool = False
    max_train_hours: float | None = None
    max_latency_ms: float | None = None

    def describe(self) -> list[str]:
        return [
            f"LM reachable only through an API (black-box methods only): {'yes' if self.black_box_only else 'no'}",
            f"training budget: {'none' if self.max_train_hours is None else f'{self.max_train_hours:g} h'}",
            f"latency budget: {'none' if self.max_latency_ms is None else f'{self.max_latency_ms:g} ms per question'}",
        ]


@dataclass
class Recommendation:
    architecture: str | None
    metric: str
    reason: str
    constraints: Constraints
    excluded: dict[str, str] = field(default_factory=dict)  # architecture -> why the constraints rule it out
    candidates: list[str] = field(default_factory=list)
    decision: ChampionDecision | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture, "metric": self.metric, "reason": self.reason,
            "constraints": asdict(self.constraints), "excluded": dict(self.excluded), "candidates": list(self.candidates),
            "decision": self.decision.as_dict() if self.decision else None,
        }


def _value(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def exclusion(row: dict[str, Any], constraints: Constraints) -> str | None:
    """Why `constraints` rule this architecture out (None: they do not)."""
    if constraints.black_box_only and row.get("family") == "white-box":
        what = {"lm": "fine-tunes the LM", "joint": "trains the LM together with the retriever"}.get(str(row.get("finetune")), "needs the LM's weights")
        return f"white-box: it {what}, which an LM behind an API does not allow"
    if constraints.max_train_hours is not None:
        hours = _value(row, TRAIN_WALL)
        if hours is None and row.get("finetune") not in (None, "none"):
            return "it trains, but no training time was recorded"
        if hours is not None and hours / 3600 > constraints.max_train_hours:
            return f"trains for {hours / 3600:.3g} h, over the {constraints.max_train_hours:g} h budget"
    if constraints.max_latency_ms is not None:
        latency = _value(row, LATENCY)
        if latency is None:
            return "no QA latency was measured"
        if latency > constraints.max_latency_ms:
            return f"answers in {latency:.4g} ms per question, over the {constraints.max_latency_ms:g} ms budget"
    return None


def recommend(
    df: pd.DataFrame,
    constraints: Constraints,
    metric: str,
    mode: str | None = None,
    *,
    rule: str = "paired",
    paired: pd.DataFrame | None = None,
    cost_metric: str | None = None,
) -> Recommendation:
    """The best architecture by the measured numbers among those the constraints allow.

    Architectures the constraints exclude are named with the reason; among the others the
    champion rule decides (`decide_champion`: with `paired`, a lead counts only when its paired
    interval excludes 0, else the cheaper of the tied architectures), and its reason is the
    recommendation's."""
    mode = mode or ("max" if higher_is_better(metric) else "min")
    rows = df.to_dict(orient="records")
    excluded = {str(r["architecture"]): why for r in rows if (why := exclusion(r, constraints))}
    allowed = df[~df["architecture"].isin(list(excluded))] if len(df) else df
    candidates = [str(n) for n in allowed["architecture"]] if len(allowed) else []
    if metric not in df.columns:
        return Recommendation(None, metric, f"no architecture reported {metric}", constraints, excluded, candidates)
    if allowed.empty or allowed[metric].isna().all():
        reason = "no architecture meets the constraints" if excluded else f"no architecture reported {metric}"
        return Recommendation(None, metric, reason, constraints, excluded, candidates)
    decision = decide_champion(allowed, metric, mode, rule=rule, paired=paired, cost_metric=cost_metric)
    reason = decision.reason
    if excluded:
        reason += "; excluded by your constraints: " + "; ".join(f"{name} ({why})" for name, why in excluded.items())
    return Recommendation(decision.architecture, metric, reason, constraints, excluded, candidates, decision)
