"""Loading params.yaml: the one configuration source of the CLI, DVC stages and Prefect flows.

params.yaml holds the base configuration, a `profile` key naming the active profile, and a
`profiles` section whose entries are deep-merged over the base (`smoke` for tests, `default`
sized for a 2-core CPU machine, `full` for the whole benchmark). The sections are validated by
the schema in `ragops.config`; each architecture's options by that architecture's own `Options`
model (through the registry), so an unknown or mistyped key fails with one line naming it.

This module sits above both the schema and the architectures: the schema never imports the
architectures, and the architectures never import this loader.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ragops.architectures import registry
from ragops.config import ArchitectureOptions, Config
from ragops.errors import ConfigError


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _format_error(source: str, error: ValidationError, prefix: str = "") -> str:
    """One line naming the full key path (`prefix` is the path of the model that failed, e.g. `architectures.replug.`)."""
    first = error.errors()[0]
    key = prefix + ".".join(str(part) for part in first["loc"])
    key = key.rstrip(".") or "<root>"
    key = key.replace("validate_", "validate")
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: invalid value for '{key}': {message}"


def resolve(raw: dict[str, Any], profile: str | None = None, source: str = "params.yaml") -> Config:
    """Apply the active profile's overrides to the base and validate the result."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: 'profiles' must be a mapping of profile name to overrides")
    active = profile or raw.get("profile", "default")
    if active not in profiles and active != "default":
        known = ", ".join(["default", *sorted(p for p in profiles if p != "default")])
        raise ConfigError(f"{source}: unknown profile '{active}' (known: {known})")
    for name, overrides in profiles.items():  # every profile, not only the active one: a typo shows at once
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(
                f"{source}: 'profiles.{name}' must be a mapping of overrides (e.g. `{name}: {{ingest: {{limit: 300}}}}`),"
                f" got {type(overrides).__name__} {overrides!r}"
            )
    merged = _deep_merge(raw, profiles.get(active) or {})
    merged["profile"] = active
    where = source if active == "default" else f"{source} (profile '{active}')"
    try:
        config = Config.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_format_error(where, error)) from None
    return config.model_copy(update={"architectures": _validate_architectures(config.architectures, where)})


def _validate_architectures(raw: dict[str, Any], where: str) -> dict[str, ArchitectureOptions]:
    validated = {}
    for name, options in raw.items():
        options = options or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: 'architectures.{name}' must be a mapping of options")
        base = options.get("base")
        if base is not None and base not in registry.names():
            raise ConfigError(f"{where}: unknown base architecture 'architectures.{name}.base: {base}' (known: {', '.join(registry.names())})")
        target = base or name
        if target not in registry.names():
            raise ConfigError(
                f"{where}: unknown architecture 'architectures.{name}' (known: {', '.join(registry.names())};"
                " a variant of one of them needs `base: <name>`)"
            )
        try:
            validated[name] = registry.options_model(target).model_validate(options)
        except ValidationError as error:
            raise ConfigError(_format_error(where, error, prefix=f"architectures.{name}.")) from None
    return validated


def load_config(path: str | Path = "params.yaml", profile: str | None = None, *, missing_ok: bool = False) -> Config:
    """The configuration in `path`. A missing file is an error, never a silent run on the code's
    defaults (they are sized differently from the project's params.yaml); only commands that compute
    nothing from it (`ragops server`, `ragops ui`) pass `missing_ok` for a workspace's implicit file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; --params takes a params.yaml file")
    if not path.exists():
        if missing_ok:
            return resolve({}, profile, source=str(path))
        raise ConfigError(
            f"{path}: params file not found (copy the project's params.yaml into the workspace, or give --params FILE)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the params file ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (invalid byte at offset {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    return resolve(raw, profile, source=str(path))
