from typing import Literal

from pydantic import Field

from ragops.architectures.base import Architecture
from ragops.config import ArchitectureOptions


class InContextRALMOptions(ArchitectureOptions):
    retriever: Literal["bm25", "dense", "hybrid"] = "bm25"
    k: int = Field(default=2, ge=1)
    stride: int = Field(default=16, ge=1)
    query_length: int = Field(default=32, ge=1)
    ranking: Literal["first", "logprob"] = "first"


class InContextRALM(Architecture):
    name = "incontext_ralm"
    family = "black-box"
    finetune = "none"
    Options = InContextRALMOptions
