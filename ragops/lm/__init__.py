"""The language-model layer: preparing a model folder, scoring and greedy generation."""

from ragops.lm.model import CausalLM, LMCounters, document_windows
from ragops.lm.prepare import prepare_lm

__all__ = ["CausalLM", "LMCounters", "prepare_lm", "document_windows"]
