"""Mechanisms several architectures share, written once and tested once.

- `RetrievalCache`: retrieval results on disk keyed by (document, begin, end) token offsets, as
  In-Context RALM precomputes them. The file records the settings that produced it (stride,
  query length, retriever, index, ...); opening it with different settings raises instead of
  silently reusing results computed for other offsets (rag-methods.md §10.10).
- `kl_distill`: the retriever-distillation loss of REPLUG LSR and Atlas with its direction and
  reduction explicit (rag-methods.md §9.1, §10.3-10.4).
- `RefreshSchedule`: Atlas's index-refresh schedule string ("0-1000:500,1000-10000:2000").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ragops.errors import ConfigError, RagopsError
from ragops.io import read_json, write_json
from ragops.retrieval.types import Passage

# ------------------------------------------------------------------------------------------------
# Retrieval cache
# ------------------------------------------------------------------------------------------------


def offsets_key(doc_id: str, begin: int, end: int) -> str:
    return f"{doc_id}|{begin}|{end}"


class RetrievalCache:
    """Retrieval hits per (doc, begin, end), stored with the settings that produced them.

    `meta` must hold every setting the results depend on (e.g. stride, query_length, retriever,
    k, an index fingerprint). An existing file whose meta differs raises `RagopsError` naming the
    differing keys. Each entry also stores its query text; a lookup whose query differs (the
    document or tokenizer changed) is a miss, never a wrong hit.
    """

    VERSION = 1

    def __init__(self, path: str | Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = {"version": self.VERSION, **meta}
        self.passages: dict[str, str] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        self._dirty = False
        if self.path.exists():
            stored = read_json(self.path)
            old = stored.get("meta", {})
            differing = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
            if differing:
                detail = ", ".join(f"{k}: file has {old.get(k)!r}, this run uses {self.meta.get(k)!r}" for k in differing)
                raise RagopsError(
                    f"{self.path}: retrieval cache was built with other settings ({detail}); "
                    "use a cache file made for these settings or delete this one"
                )
            self.passages = dict(stored.get("passages", {}))
            self.entries = dict(stored.get("entries", {}))

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str, query: str) -> list[Passage] | None:
        """The passages cached for `key` if cached for this exact `query`, else None."""
        entry = self.entries.get(key)
        if entry is None or entry.get("query") != query:
            self.misses += 1
            return None
        self.hits += 1
        return [Passage(c, d, float(s), self.passages[c]) for c, d, s in entry["hits"]]

    def put(self, key: str, query: str, hits: Sequence[Passage]) -> None:
        for hit in hits:
            self.passages[hit.chunk_id] = hit.text
        self.entries[key] = {"query": query, "hits": [[h.chunk_id, h.doc_id, float(h.score)] for h in hits]}
        self._dirty = True

    def save(self) -> None:
        if self._dirty:
            write_json(self.path, {"meta": self.meta, "passages": self.passages, "entries": self.entries})
            self._dirty = False


# ------------------------------------------------------------------------------------------------
# KL distillation
# ------------------------------------------------------------------------------------------------

Direction = Literal["teacher_student", "student_teacher"]
Reduction = Literal["batchmean", "mean", "sum", "none"]


def kl_distill(
    student_scores: Any,
    teacher_scores: Any,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    direction: Direction = "teacher_student",
    reduction: Reduction = "batchmean",
    detach_teacher: bool = True,
) -> Any:
    """KL divergence between softmax(student/τ_s) and softmax(teacher/τ_t) over k documents.

    Both inputs are unnormalised scores of shape [batch, k] (retrieval scores for the student;
    e.g. LM log-likelihoods of the gold continuation per document for the teacher).

    direction:
      - "teacher_student": KL(P_teacher ‖ P_student) = Σ_d P_t(d) (log P_t(d) − log P_s(d)).
        This is what the REPLUG LSR code and Atlas compute (`KLDivLoss(log P_s, P_t)`).
      - "student_teacher": KL(P_student ‖ P_teacher), the REPLUG paper's formula.
    reduction:
      - "batchmean": sum over documents, mean over the batch (the true KL per query);
      - "mean": mean over every element, i.e. batchmean / k (torch `KLDivLoss()`'s default, as in
        the REPLUG code);
      - "sum": sum over everything; "none": [batch, k] element terms.
    The result is 0 for identical distributions and positive otherwise; the teacher is detached
    by default so gradients flow only into the student.
    """
    import torch

    student = torch.as_tensor(student_scores, dtype=torch.float32)
    teacher = torch.as_tensor(teacher_scores, dtype=torch.float32)
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"kl_distill: expected two [batch, k] tensors, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if detach_teacher:
        teacher = teacher.detach()
    # A -inf score marks an absent document (fewer than k retrieved): both distributions are over
    # the documents present in both, and absent ones contribute exactly 0 (not inf or NaN).
    present = torch.isfinite(student) & torch.isfinite(teacher)
    if not bool(present.any(dim=-1).all()):
        raise ValueError("kl_distill: a row has no document with finite student and teacher scores")
    neg_inf = torch.tensor(float("-inf"), dtype=student.dtype, device=student.device)
    log_s = torch.log_softmax(torch.where(present, student / student_temperature, neg_inf), dim=-1)
    log_t = torch.log_softmax(torch.where(present, teacher / teacher_temperature, neg_inf), dim=-1)
    zero = torch.zeros((), dtype=student.dtype, device=student.device)
    if direction == "teacher_student":
        terms = torch.where(present, log_t.exp() * (log_t - log_s), zero)
    elif direction == "student_teacher":
        terms = torch.where(present, log_s.exp() * (log_s - log_t), zero)
    else:
        raise ValueError(f"kl_distill: unknown direction '{direction}' (teacher_student | student_teacher)")
    if reduction == "batchmean":
        return terms.sum() / terms.shape[0]
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms
    raise ValueError(f"kl_distill: unknown reduction '{reduction}' (batchmean | mean | sum | none)")


# ------------------------------------------------------------------------------------------------
# Index refresh schedule
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefreshSchedule:
    """Atlas's `--refresh_index` format: "start-end:every,..." (end exclusive); "-1" or "" = never.

    `due(step)` is True at steps where the document embeddings must be recomputed: step 0 of a
    range and every `every` steps after its start, while `start <= step < end`.
    """

    ranges: tuple[tuple[int, int, int], ...]

    @classmethod
    def parse(cls, spec: str) -> RefreshSchedule:
        spec = (spec or "").strip()
        if spec in ("", "-1"):
            return cls(())
        ranges = []
        for part in spec.split(","):
            try:
                span, every = part.split(":")
                start, end = span.split("-")
                item = (int(start), int(end), int(every))
            except ValueError:
                raise ConfigError(f"refresh schedule '{spec}': expected 'start-end:every,...', got '{part}'") from None
            if item[0] < 0 or item[1] <= item[0] or item[2] <= 0:
                raise ConfigError(f"refresh schedule '{spec}': bad range '{part}'")
            ranges.append(item)
        return cls(tuple(ranges))

    def due(self, step: int) -> bool:
        return any(start <= step < end and (step - start) % every == 0 for start, end, every in self.ranges)
