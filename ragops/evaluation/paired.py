"""Paired comparisons of two architectures evaluated on the same items.

Every architecture answers the same questions and scores the same held-out articles, so the
uncertainty of a *difference* is much smaller than the two separate intervals suggest: item-level
noise (an easy question, a hard article) is shared and cancels. The paired bootstrap resamples
items, and on each resample computes A's statistic minus B's on the *same* items:

- QA metrics (em, f1, gold_nll): the mean of the per-item differences A_i − B_i;
- perplexity: the ratio-of-sums statistic of each, exp(Σ nll / Σ tokens), on the same resampled
  documents, then A − B (the difference of the two corpus-level perplexities).

The interval is the percentile interval of the resampled differences; `significant` means it
excludes 0. Counts of items where A is better, worse or tied come with it ("61 of 80 articles
improve"), using the metric's direction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ragops.evaluation.metrics import _resample_indices

QA_PAIRED_METRICS = ("em", "f1", "gold_nll")
LM_PAIRED_METRICS = {"token_ppl": "n_tokens", "word_ppl": "n_words"}
LOWER_IS_BETTER = {"gold_nll", "token_ppl", "word_ppl"}


@dataclass(frozen=True)
class PairedDifference:
    """A − B on `metric` over `n` shared items, with its paired bootstrap interval."""

    a: str
    b: str
    metric: str  # e.g. describe/f1, lm/token_ppl
    n: int  # items evaluated by both
    a_value: float
    b_value: float
    diff: float  # a_value − b_value
    ci_low: float
    ci_high: float
    a_better: int  # items on which A is better (by the metric's direction)
    b_better: int
    ties: int
    unpaired: int = 0  # items only one of the two evaluated (left out of the comparison)

    @property
    def significant(self) -> bool:
        return bool(self.ci_low > 0 or self.ci_high < 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_mean_difference(
    a: Iterable[float], b: Iterable[float], n_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean(A − B), ci_low, ci_high): percentile bootstrap over items, A_i and B_i resampled together."""
    a, b = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same items: {a.size} vs {b.size}")
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    diff = a - b
    stats = diff[_resample_indices(diff.size, n_samples, seed)].mean(axis=1)
    return (float(diff.mean()), *_percentiles(stats, confidence))


def paired_ratio_difference(
    num_a: Iterable[float],
    den_a: Iterable[float],
    num_b: Iterable[float],
    den_b: Iterable[float],
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    transform=np.exp,
) -> tuple[float, float, float]:
    """(f(A) − f(B), ci_low, ci_high) with f(X) = transform(Σ num_X / Σ den_X), documents resampled together."""
    arrays = [np.asarray(list(x), dtype=np.float64) for x in (num_a, den_a, num_b, den_b)]
    if len({x.size for x in arrays}) != 1:
        raise ValueError("paired ratios need the same documents for A and B")
    na, da, nb, db = arrays
    if na.size == 0:
        return float("nan"), float("nan"), float("nan")

    def stat(index) -> np.ndarray:
        sa = transform(na[index].sum(axis=-1) / np.maximum(da[index].sum(axis=-1), 1e-12))
        sb = transform(nb[index].sum(axis=-1) / np.maximum(db[index].sum(axis=-1), 1e-12))
        return sa - sb

    point = float(stat(np.arange(na.size)))
    stats = stat(_resample_indices(na.size, n_samples, seed))
    return (point, *_percentiles(stats, confidence))


def _counts(a: np.ndarray, b: np.ndarray, lower_is_better: bool) -> tuple[int, int, int]:
    better = a < b if lower_is_better else a > b
    worse = a > b if lower_is_better else a < b
    return int(better.sum()), int(worse.sum()), int(len(a) - better.sum() - worse.sum())


def _item_key(frame: pd.DataFrame) -> pd.Series:
    ids = frame["qid"].where(frame["task"] != "lm", frame["doc_id"])
    return frame["task"].astype(str) + "|" + ids.astype(str)


def compare_predictions(
    a_name: str,
    a: pd.DataFrame,
    b_name: str,
    b: pd.DataFrame,
    *,
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[PairedDifference]:
    """Paired differences A − B for every task both evaluated (predictions.parquet rows, see
    `ragops.evaluation.harness.PREDICTION_COLUMNS`): QA `em`, `f1`, `gold_nll` per question,
    `lm/token_ppl` and `lm/word_ppl` per held-out document. Items are matched by (task, qid) or
    (task, doc_id); items only one of them evaluated are left out and counted in `unpaired`."""
    out: list[PairedDifference] = []
    a, b = a.assign(_key=_item_key(a)), b.assign(_key=_item_key(b))
    for task in sorted(set(a["task"]) & set(b["task"]), key=lambda t: (t == "lm", t)):
        ta, tb = a[a["task"] == task], b[b["task"] == task]
        merged = ta.merge(tb, on="_key", suffixes=("_a", "_b"), validate="one_to_one")
        unpaired = len(ta) + len(tb) - 2 * len(merged)
        if task == "lm":
            for name, den in LM_PAIRED_METRICS.items():
                num_a, num_b = merged["nll_sum_a"].to_numpy(float), merged["nll_sum_b"].to_numpy(float)
                den_a, den_b = merged[f"{den}_a"].to_numpy(float), merged[f"{den}_b"].to_numpy(float)
                diff, low, high = paired_ratio_difference(num_a, den_a, num_b, den_b, n_samples, confidence, seed)
                per_a, per_b = num_a / np.maximum(den_a, 1), num_b / np.maximum(den_b, 1)  # per-document log-perplexity
                counts = _counts(per_a, per_b, lower_is_better=True)
                value_a = float(np.exp(num_a.sum() / max(den_a.sum(), 1e-12))) if len(merged) else float("nan")
                value_b = float(np.exp(num_b.sum() / max(den_b.sum(), 1e-12))) if len(merged) else float("nan")
                out.append(PairedDifference(a_name, b_name, f"lm/{name}", len(merged), value_a, value_b, diff, low, high, *counts, unpaired))
            continue
        for name in QA_PAIRED_METRICS:
            both = merged[[f"{name}_a", f"{name}_b"]].dropna()
            va, vb = both[f"{name}_a"].to_numpy(float), both[f"{name}_b"].to_numpy(float)
            diff, low, high = paired_mean_difference(va, vb, n_samples, confidence, seed)
            counts = _counts(va, vb, lower_is_better=name in LOWER_IS_BETTER)
            mean_a = float(va.mean()) if va.size else float("nan")
            mean_b = float(vb.mean()) if vb.size else float("nan")
            out.append(PairedDifference(a_name, b_name, f"{task}/{name}", len(both), mean_a, mean_b, diff, low, high, *counts, unpaired))
    return out


def paired_table(
    predictions: dict[str, pd.DataFrame],
    pairs: Iterable[tuple[str, str]],
    *,
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (a, b, metric) for each pair whose predictions are both available."""
    rows = []
    for a, b in pairs:
        if a in predictions and b in predictions:
            rows += [d.as_dict() for d in compare_predictions(a, predictions[a], b, predictions[b], n_samples=n_samples,
                                                               confidence=confidence, seed=seed)]
    columns = [*PairedDifference.__dataclass_fields__, "significant"]
    return pd.DataFrame(rows, columns=columns)
