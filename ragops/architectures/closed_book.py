"""Closed book: the LM alone, no retrieval (the baseline every other architecture is compared to)."""

from ragops.architectures.base import Architecture
from ragops.config import ArchitectureOptions


class ClosedBook(Architecture):
    """QA from the question alone; `lm` perplexity from the document's own prefix (base defaults)."""

    name = "closed_book"
    family = "baseline"
    finetune = "none"
    Options = ArchitectureOptions
