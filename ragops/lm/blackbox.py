"""The black-box view of a language model: what an LM behind an API offers, and nothing more.

Retriever-training code of the black-box methods (REPLUG LSR; AAR's *target* LM at evaluation)
receives a `BlackBoxLM`: "log-probabilities of this continuation given this prompt", "generate
from this prompt" and a token count, never weights, hidden states or gradients. `LocalBlackBox`
serves it from a local `CausalLM`; an HTTP client with the same three methods can replace it
without touching the training code.

Every call charges the meter it was given (tokens scored/generated, FLOPs): the one place where
black-box LM use is metered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ragops.cost import CostMeter
    from ragops.lm.model import CausalLM


@runtime_checkable
class BlackBoxLM(Protocol):
    name: str

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str], meter: CostMeter | None = None) -> list[np.ndarray]:
        """Per-token natural-log probabilities of each continuation given its prompt."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, stop: Sequence[str] = ("\n",), meter: CostMeter | None = None) -> list[str]:
        """Greedy continuations of each prompt, cut at the first stop string."""

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the LM's tokenizer (APIs report these)."""


class LocalBlackBox:
    """A `BlackBoxLM` over a local CausalLM. It keeps the model private (no `model`, `tokenizer` or
    `lm` attribute): code written against it cannot reach weights or gradients."""

    __slots__ = ("_lm", "name")

    def __init__(self, lm: CausalLM) -> None:
        object.__setattr__(self, "_lm", lm)
        object.__setattr__(self, "name", lm.name)

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str], meter: CostMeter | None = None) -> list[np.ndarray]:
        with self._lm.charged_to(meter):
            return self._lm.score(list(prompts), list(continuations))

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, stop: Sequence[str] = ("\n",), meter: CostMeter | None = None) -> list[str]:
        with self._lm.charged_to(meter):
            return self._lm.generate(list(prompts), max_new_tokens=max_new_tokens, stop=stop)

    def count_tokens(self, text: str) -> int:
        return self._lm.count_tokens(text)

    def __repr__(self) -> str:
        return f"LocalBlackBox({self.name!r})"
