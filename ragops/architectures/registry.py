"""The architecture registry: name -> "module:Class".

Adding an architecture is one module under ragops/architectures/ and one line here. Modules are
imported on first use; their top level must stay light (no torch/transformers import) so that
validating params.yaml stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragops.architectures.base import Architecture
    from ragops.config import ArchitectureOptions

ARCHITECTURES: dict[str, str] = {
    "closed_book": "ragops.architectures.closed_book:ClosedBook",
    "incontext_ralm": "ragops.architectures.incontext_ralm:InContextRALM",
    "replug": "ragops.architectures.replug:REPLUG",
    "replug_lsr": "ragops.architectures.replug_lsr:REPLUGLSR",
    "aar": "ragops.architectures.aar:AAR",
    "atlas": "ragops.architectures.atlas:Atlas",
    "retro": "ragops.architectures.retro:Retro",
    "self_rag": "ragops.architectures.self_rag:SelfRAG",
}


def names() -> list[str]:
    return list(ARCHITECTURES)


def get(name: str) -> type[Architecture]:
    try:
        target = ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture '{name}' (known: {', '.join(ARCHITECTURES)})") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def options_model(name: str) -> type[ArchitectureOptions]:
    return get(name).Options


_variants: dict[tuple[str, str], type] = {}


def resolve(name: str, options: ArchitectureOptions | None = None) -> type[Architecture]:
    """The class for the configured entry `name`: the registered one, or — for a variant (an entry
    with `base:`) — a subclass of the base named `name`, so its runs, artifacts and metrics are its own."""
    base = getattr(options, "base", None)
    if base is None or base == name:
        return get(name)
    key = (name, base)
    if key not in _variants:
        parent = get(base)
        _variants[key] = type(f"{parent.__name__}_{name}", (parent,), {"name": name, "__module__": parent.__module__})
    return _variants[key]
