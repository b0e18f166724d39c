from ragops.architectures.base import Architecture
from ragops.config import ArchitectureOptions


class ClosedBook(Architecture):
    name = "closed_book"
    family = "baseline"
    finetune = "none"
    Options = ArchitectureOptions
