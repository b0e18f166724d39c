"""Answer and language-modelling metrics, and percentile-bootstrap confidence intervals.

Answer metrics follow the SQuAD evaluation script: lowercase, drop punctuation, drop the articles
a/an/the, collapse whitespace; exact match compares the normalised strings, F1 the bags of
normalised tokens. Perplexity is reported per token (of the LM's tokenizer) and per whitespace
word (total NLL / words, as In-Context RALM does): the two differ by the tokenizer's
tokens-per-word ratio, so they must never be mixed (rag-methods.md §9.6).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}


def normalize_answer(text: str) -> str:
    text = (text or "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)




def perplexities(nll_sum: float, n_tokens: int, n_words: int) -> tuple[float, float]:
    """(token perplexity, word perplexity) of a total NLL over `n_tokens` tokens and `n_words` words."""
    return math.exp(nll_sum / max(n_tokens, 1)), math.exp(nll_sum / max(n_words, 1))


def _resample_indices(n: int, n_samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_samples, n))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (or `statistic`, applied row-wise to [samples, n])."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    samples = values[_resample_indices(values.size, n_samples, seed)]
    stats = statistic(samples) if statistic is not None else samples.mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_ratio_ci(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x,
) -> tuple[float, float]:
    """Percentile bootstrap of transform(sum(num)/sum(den)), resampling (num, den) pairs together.

    For perplexity: numerators are per-document NLL sums, denominators token (or word) counts,
    transform is exp.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.size == 0:
        return float("nan"), float("nan")
    index = _resample_indices(num.size, n_samples, seed)
    stats = transform(num[index].sum(axis=1) / np.maximum(den[index].sum(axis=1), 1e-12))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def with_ci(
    prefix: str,
    per_example: dict[str, Sequence[float]],
    n_samples: int,
    confidence: float,
    seed: int,
) -> dict[str, float]:
    """`{prefix}/{metric}` (the mean) plus `_ci_low` / `_ci_high` for each per-example metric."""
    out: dict[str, float] = {}
    for name, values in per_example.items():
        arr = np.asarray(values, dtype=np.float64)
        low, high = bootstrap_ci(arr, n_samples, confidence, seed)
        out[f"{prefix}/{name}"] = float(arr.mean()) if arr.size else float("nan")
        out[f"{prefix}/{name}_ci_low"] = low
        out[f"{prefix}/{name}_ci_high"] = high
    return out


def perplexity_metrics(
    nll_sums: Sequence[float],
    n_tokens: Sequence[int],
    n_words: Sequence[int],
    n_samples: int,
    confidence: float,
    seed: int,
    prefix: str = "lm",
) -> dict[str, float]:
    """`lm/token_ppl`, `lm/word_ppl` (corpus level: total NLL / total count) with bootstrap CIs over documents."""
    total = float(np.sum(nll_sums))
    token_ppl, word_ppl = perplexities(total, int(np.sum(n_tokens)), int(np.sum(n_words)))
    out = {f"{prefix}/token_ppl": token_ppl, f"{prefix}/word_ppl": word_ppl}
    for name, den in (("token_ppl", n_tokens), ("word_ppl", n_words)):
        low, high = bootstrap_ratio_ci(nll_sums, den, n_samples, confidence, seed, transform=np.exp)
        out[f"{prefix}/{name}_ci_low"], out[f"{prefix}/{name}_ci_high"] = low, high
    return out
