"""Teacher signals for retriever training, and the cache that makes a frozen teacher pay once.

- `PairScoreCache`: scores of (example, passage) pairs on disk, in a file that records what they
  depend on (the LM, the prompt format, the score definition). REPLUG LSR's teacher LM is frozen,
  so its scores are reused across epochs, after index refreshes (only new candidates are scored)
  and across re-runs with other temperatures. Opening the file with other settings raises.
- `likelihood_scores`: the LM-likelihood teacher — mean token log P_LM(y | d ∘ x) per pair — through
  the black-box view only (`ragops.lm.blackbox.BlackBoxLM`), so it also runs against an API.
- `attention_mass`: a white-box proxy LM's attention from one position onto token spans (AAR).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragops.errors import RagopsError
from ragops.io import read_json, write_json

if TYPE_CHECKING:
    from ragops.cost import CostMeter
    from ragops.lm.blackbox import BlackBoxLM


class PairScoreCache:
    VERSION = 1

    def __init__(self, path: str | Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = {"version": self.VERSION, **meta}
        self.scores: dict[str, float] = {}
        self.hits = self.misses = 0
        self._dirty = False
        if self.path.exists():
            stored = read_json(self.path)
            old = stored.get("meta", {})
            differing = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
            if differing:
                raise RagopsError(f"{self.path}: teacher-score cache made with other settings ({', '.join(differing)}); delete it or use another file")
            self.scores = {k: float(v) for k, v in stored.get("scores", {}).items()}

    @staticmethod
    def key(example: str, passage: str) -> str:
        return f"{example}||{passage}"

    def lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores with NaN where missing, found mask)."""
        found = np.array([k in self.scores for k in keys], dtype=bool)
        self.hits += int(found.sum())
        self.misses += int((~found).sum())
        return np.array([self.scores.get(k, np.nan) for k in keys], dtype=np.float64), found

    def store(self, keys: Sequence[str], values: Sequence[float]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.scores[key] = float(value)
        self._dirty = True

    def save(self) -> None:
        if self._dirty:
            write_json(self.path, {"meta": self.meta, "scores": self.scores})
            self._dirty = False

    def __len__(self) -> int:
        return len(self.scores)


def likelihood_scores(
    lm: BlackBoxLM,
    prompts: Sequence[str],
    continuations: Sequence[str],
    keys: Sequence[str],
    cache: PairScoreCache | None = None,
    meter: CostMeter | None = None,
) -> np.ndarray:
    """Mean token log-probability of `continuations[i]` given `prompts[i]`, cached under `keys[i]`.
    Only pairs the cache lacks reach the LM."""
    keys = list(keys)
    if cache is not None:
        scores, found = cache.lookup(keys)
    else:
        scores, found = np.full(len(keys), np.nan), np.zeros(len(keys), dtype=bool)
    todo = [i for i in range(len(keys)) if not found[i]]
    if todo:
        logprobs = lm.logprobs([prompts[i] for i in todo], [continuations[i] for i in todo], meter=meter)
        values = [float(np.mean(lp)) if len(lp) else 0.0 for lp in logprobs]
        scores[todo] = values
        if cache is not None:
            cache.store([keys[i] for i in todo], values)
    return scores


def attention_mass(weights: np.ndarray, spans: Sequence[tuple[int, int]], *, value_norms: np.ndarray | None = None, score: str = "mass") -> np.ndarray:
    """Per-span attention score from `weights` [layers, heads, n_query, seq] (post-softmax).

    - "mass": Σ_{j in span} α_j, averaged over layers, heads and query positions;
    - "norms": Σ_{j in span} α_j · ‖v_j‖ (Atlas ADist), averaged likewise (`value_norms`: [layers, heads, seq]);
    A span is [start, end) in key positions.
    """
    if weights.ndim != 4:
        raise ValueError(f"attention weights must be [layers, heads, n_query, seq], got {weights.shape}")
    if score == "norms":
        if value_norms is None:
            raise ValueError("score 'norms' needs value_norms")
        weighted = weights * value_norms[:, :, None, :]
    elif score == "mass":
        weighted = weights
    else:
        raise ValueError(f"unknown attention score '{score}' (mass | norms)")
    per_key = weighted.mean(axis=(0, 1, 2))  # [seq]
    return np.array([float(per_key[a:b].sum()) for a, b in spans], dtype=np.float64)
