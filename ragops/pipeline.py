"""The pipeline, defined once: the stage order, the code each stage depends on, and dvc.yaml.

`ragops run`, the Prefect flows and `dvc repro` run the same stages. Their order lives here
(`DATA_STAGES`), and so does what invalidates each one: a stage re-runs when its inputs, its
parameters or *the source files it depends on* change (`STAGE_CODE`; an architecture's train and
evaluate stages use `Architecture.code_paths()`). The stage fingerprints that `ragops run` and the
flows check hash exactly these files, and dvc.yaml is generated from the same lists
(`ragops pipeline --write`), so the three cannot drift apart: a code change re-runs exactly the
stages it affects, whichever of the three runs them. `tests/test_pipeline_definition.py` fails when
the committed dvc.yaml is not the generated one.

Orchestration code (`stages.py`, `io.py`, the CLI, the flows) is deliberately not a dependency:
changing how a stage is run or logged does not change what it computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragops.config import Config

PACKAGE_ROOT = Path(__file__).resolve().parent

#: The data plane in order; `ragops run` and the `refresh`/`pipeline` flows follow it.
DATA_STAGES = ("ingest", "validate", "split", "chunk", "embed", "index", "eval_retrieval", "prepare_lm")
#: The stages the nightly `refresh` flow runs (everything that depends on the corpus).
REFRESH_STAGES = DATA_STAGES[:-1]

#: Package-relative sources whose change re-runs a stage (files, or folders meaning their .py files).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "ingest": ("data/ingest.py",),
    "validate": ("data/validate.py",),
    "split": ("data/benchmark.py", "data/questions.py"),
    "chunk": ("data/chunk.py",),
    "embed": ("retrieval/embed.py",),
    "index": ("retrieval/index.py",),
    "eval_retrieval": ("retrieval/retriever.py", "retrieval/evaluate.py", "retrieval/metrics.py", "retrieval/types.py", "retrieval/embed.py"),
    "prepare_lm": ("lm/prepare.py",),
    "compare": ("compare", "evaluation/paired.py"),
}
#: Besides an architecture's `code_paths()`, its evaluation depends on the harness.
EVALUATION_CODE = ("evaluation",)


def code_fingerprint(paths: tuple[str, ...] | list[str]) -> dict[str, str]:
    """{package-relative path: content hash} of source files or folders (their .py files)."""
    from ragops.io import file_hash, json_hash

    out = {}
    for rel in paths:
        path = PACKAGE_ROOT / rel
        if path.is_dir():
            files = sorted(f for f in path.rglob("*.py") if "__pycache__" not in f.parts)
            out[rel] = json_hash({str(f.relative_to(PACKAGE_ROOT)): file_hash(f) for f in files})
        elif path.exists():
            out[rel] = file_hash(path)
        else:
            out[rel] = "missing"
    return out


def architecture_code(config: Config, name: str) -> dict[str, list[str]]:
    """The package-relative sources of architecture `name`'s train and evaluate stages."""
    from ragops.architectures import registry

    cls = registry.resolve(name, config.architecture_options(name))
    train = list(cls.code_paths())
    return {"train": train, "evaluate": sorted({*train, *EVALUATION_CODE})}


def trains_after(config: Config, name: str) -> str | None:
    """The architecture whose training `name` waits for: a variant's base (an entry with `base:`),
    whose trained weights it may reuse (e.g. `retro_random` evaluates retro's weights), when enabled."""
    if name not in config.architectures:
        return None  # an unknown name fails in its own train stage, with one line naming the known ones
    base = getattr(config.architecture_options(name), "base", None)
    return base if base and base != name and base in config.enabled_architectures() else None


def training_order(config: Config, names: list[str]) -> list[str]:
    """`names` with every variant after the base it trains after (otherwise in the given order)."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        after = trains_after(config, name)
        if after in names:
            visit(after)
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def _deps(paths: list[str] | tuple[str, ...]) -> list[str]:
    return [f"ragops/{p}" for p in paths]


def dvc_stages(config: Config) -> dict[str, Any]:
    """The `stages:` of dvc.yaml for the enabled architectures of `config` (the default profile)."""
    enabled = training_order(config, config.enabled_architectures())
    code = {name: architecture_code(config, name) for name in enabled}
    def slots(kind: str) -> int:
        return max((len(c[kind]) for c in code.values()), default=1)

    def items(kind: str) -> dict[str, dict[str, str]]:
        # DVC's foreach cannot splice a list into `deps`, so each architecture's code is spread over
        # numbered slots (a shorter list repeats its last path; DVC accepts duplicate deps).
        out = {}
        for name, c in code.items():
            paths = _deps(c[kind])
            paths += [paths[-1]] * (slots(kind) - len(paths))
            base = getattr(config.architecture_options(name), "base", None) or name
            after = trains_after(config, name)
            # `after`: the base's trained model for a variant that reuses it, else a harmless repeat.
            out[name] = {"base": base, "after": f"artifacts/models/{after}" if after else "artifacts/index",
                         **{f"c{i}": p for i, p in enumerate(paths)}}
        return out

    def slot_deps(kind: str) -> list[str]:
        return [f"${{item.c{i}}}" for i in range(slots(kind))]

    arch_params = ["profile", "profiles", "seed", "lm", "architectures.${key}", "architectures.${item.base}"]
    common = ["profile", "profiles"]
    return {
        "validate": {
            "cmd": "ragops validate", "deps": ["data/corpus.parquet", *_deps(STAGE_CODE["validate"])],
            "params": [*common, "validate", "ingest.min_chars", "ingest.max_chars"], "outs": ["artifacts/validation"],
        },
        "split": {
            "cmd": "ragops split",
            "deps": ["data/corpus.parquet", "artifacts/validation", *([str(config.benchmark.questions)] if config.benchmark.questions else []),
                     *_deps(STAGE_CODE["split"])],
            "params": [*common, "seed", "benchmark"], "outs": ["artifacts/benchmark"],
        },
        "chunk": {
            "cmd": "ragops chunk", "deps": ["data/corpus.parquet", "artifacts/benchmark/heldout.parquet", *_deps(STAGE_CODE["chunk"])],
            "params": [*common, "chunk", "embed.model", "validate"], "outs": ["artifacts/chunks"],
        },
        "embed": {
            "cmd": "ragops embed", "deps": ["artifacts/chunks", *_deps(STAGE_CODE["embed"])],
            "params": [*common, "embed"], "outs": ["artifacts/embeddings"],
        },
        "index": {
            "cmd": "ragops index", "deps": ["artifacts/embeddings", "artifacts/chunks", "data/corpus.parquet", *_deps(STAGE_CODE["index"])],
            "params": [*common, "index"], "outs": ["artifacts/index"],
        },
        "eval_retrieval": {
            "cmd": "ragops eval-retrieval",
            "deps": ["artifacts/index", "artifacts/benchmark", "artifacts/chunks", *_deps(STAGE_CODE["eval_retrieval"])],
            "params": [*common, "retrieval_eval", "embed.model"], "outs": ["artifacts/retrieval_eval"],
            "metrics": [{"metrics/retrieval.json": {"cache": False}}],
        },
        "prepare_lm": {
            "cmd": "ragops prepare-lm", "deps": _deps(STAGE_CODE["prepare_lm"]), "params": ["lm.model"],
            "outs": ["artifacts/models/lm"],
        },
        "train": {
            "foreach": items("train"),
            "do": {
                "cmd": "ragops train ${key}",
                "deps": ["artifacts/index", "artifacts/benchmark", "artifacts/models/lm", "${item.after}", *slot_deps("train")],
                "params": [*arch_params, "train"],
                "outs": ["artifacts/models/${key}"],
            },
        },
        "evaluate": {
            "foreach": items("evaluate"),
            "do": {
                "cmd": "ragops evaluate ${key}",
                "deps": ["artifacts/index", "artifacts/benchmark", "artifacts/chunks", "artifacts/models/lm", "artifacts/models/${key}", *slot_deps("evaluate")],
                "params": [*arch_params, "eval"],
                "outs": ["artifacts/eval/${key}"],
                "metrics": [{"metrics/${key}.json": {"cache": False}}],
            },
        },
        "compare": {
            # A pure function of the evaluate stages' outputs and params: a second `dvc repro` has
            # nothing to do. MLflow logging and the champion's registration are side effects.
            "cmd": "ragops compare",
            "deps": [*(f"metrics/{n}.json" for n in enabled), *(f"artifacts/eval/{n}" for n in enabled), *_deps(STAGE_CODE["compare"])],
            "params": [*common, "seed", "architectures", "champion", "report", "eval.bootstrap_samples", "eval.confidence"],
            "outs": ["artifacts/compare"],
        },
    }


HEADER = """\
# GENERATED by `ragops pipeline --write` from ragops/pipeline.py and params.yaml: do not edit by hand.
# The same stages as `ragops run` and the Prefect flows, each calling the ragops CLI, with the same
# invalidation rules (inputs, parameters and the source files each stage depends on). Architectures:
# the ones enabled in params.yaml (default profile); regenerate after enabling or adding one.
# The corpus (data/) is versioned by data.dvc: produce it with `ragops ingest` (or `dvc pull`).
# Run with the project's virtualenv active (`source .venv/bin/activate`).
"""

PLOTS = [{"artifacts/compare/comparison.csv": {
    "template": "scatter", "x": "inference/qa/cost_usd_per_1k_questions", "y": "describe/f1",
    "title": "Quality vs inference cost (USD per 1,000 questions)",
}}]


def dvc_yaml(config: Config) -> str:
    import yaml

    body = yaml.safe_dump({"stages": dvc_stages(config), "plots": PLOTS}, sort_keys=False, width=140, allow_unicode=True)
    return HEADER + body


def stale_dvc_yaml(root: Path, config: Config) -> str | None:
    """A one-line warning when `root`/dvc.yaml is not what `ragops pipeline --write` would write, else None."""
    path = root / "dvc.yaml"
    if not path.exists():
        return None
    if path.read_text() != dvc_yaml(config):
        return f"{path}: not the pipeline ragops defines (architectures or stage code changed): run `ragops pipeline --write`"
    return None
