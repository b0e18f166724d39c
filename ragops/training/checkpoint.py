"""Resumable checkpoints: one file, written atomically, that knows the settings it was made with.

A checkpoint holds whatever the loop and the architecture put in it (model and optimizer state,
scheduler, step, RNG states, the current index version, ...) plus a flat `settings` dict: the
options, data and code fingerprints the training depends on. Loading it with other settings is
refused with one line naming the settings that differ, so a run never silently continues from a
model trained under other conditions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ragops.errors import RagopsError
from ragops.io import atomic_path

FILE_SUFFIX = ".ckpt"


def flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": 1, ...} from nested dicts, so a difference can be named by its dotted key."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key in sorted(value):
            flat.update(flat_settings(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, (list, tuple)):
        return {prefix: [flat_settings(v) if isinstance(v, dict) else v for v in value]}
    return {prefix: value}


def settings_difference(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two settings dicts ("lr: 1e-4 (checkpoint) vs 2e-5 (now)")."""
    a, b = flat_settings(stored), flat_settings(wanted)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} (checkpoint) vs {b.get(key, '<absent>')!r} (now)")
    return out


def save_checkpoint(path: str | Path, state: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write `state` (+ `settings`) to `path` atomically: a reader sees the old file or the new one."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"settings": settings, "state": state}, tmp)
    return path


def load_checkpoint(path: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The `state` stored at `path`; RagopsError (one line) when it was written with other settings."""
    import torch

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file
        raise RagopsError(f"{path}: not a readable ragops checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict) or "settings" not in payload or "state" not in payload:
        raise RagopsError(f"{path}: not a ragops checkpoint")
    differences = settings_difference(payload["settings"], settings)
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise RagopsError(f"{path}: checkpoint was written with other settings ({shown}); not resuming from it")
    return payload["state"]


def remove_checkpoint(path: str | Path) -> None:
    path = Path(path)
    path.unlink(missing_ok=True)
    try:
        os.rmdir(path.parent)  # only when empty
    except OSError:
        pass
