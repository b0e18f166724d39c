"""The Architecture interface (see issue 3); fleshed out with the evaluation harness."""

from __future__ import annotations

from typing import ClassVar, Literal

from ragops.config import ArchitectureOptions

Family = Literal["baseline", "black-box", "white-box"]
FineTune = Literal["none", "retriever", "lm", "joint"]


class Architecture:
    name: ClassVar[str]
    family: ClassVar[Family]
    finetune: ClassVar[FineTune]
    Options: ClassVar[type[ArchitectureOptions]] = ArchitectureOptions
