"""The pipeline is defined once (ragops/pipeline.py): dvc.yaml is generated from it, and a source
change re-runs exactly the stages that depend on it, whether `ragops run`, the flows or DVC run them."""

import shutil

import pytest
import yaml

from ragops import pipeline
from ragops.params import load_config
from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def config():
    return load_config(PROJECT_ROOT / "params.yaml", "default")


def test_committed_dvc_yaml_is_the_generated_one(config):
    assert (PROJECT_ROOT / "dvc.yaml").read_text() == pipeline.dvc_yaml(config), "run `ragops pipeline --write` and commit dvc.yaml"


def test_dvc_yaml_stage_order_deps_and_architectures(config):
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    # ingest is data.dvc (a user's source folder is outside the repo); the rest in the order `ragops run` uses.
    assert list(stages) == ["validate", "split", "chunk", "embed", "index", "eval_retrieval", "prepare_lm", "train", "evaluate", "compare"]
    assert set(stages["train"]["foreach"]) == set(stages["evaluate"]["foreach"]) == set(config.enabled_architectures())
    # Every source dependency exists (a variant such as atlas_reader_only has no module of its own).
    for name, item in {**stages["train"]["foreach"], **stages["evaluate"]["foreach"]}.items():
        for key, path in item.items():
            if key.startswith("c"):  # source slots (base and after name an architecture and an output)
                assert (PROJECT_ROOT / path).exists(), f"{name}: {path}"
    for stage in list(stages)[:7]:
        for dep in stages[stage]["deps"]:
            if dep.startswith("ragops/"):
                assert (PROJECT_ROOT / dep).exists(), f"{stage}: {dep}"


def _fingerprints(config) -> dict[str, dict]:
    out = {stage: pipeline.code_fingerprint(paths) for stage, paths in pipeline.STAGE_CODE.items()}
    for name in config.enabled_architectures():
        code = pipeline.architecture_code(config, name)
        out[f"train@{name}"] = pipeline.code_fingerprint(code["train"])
        out[f"evaluate@{name}"] = pipeline.code_fingerprint(code["evaluate"])
    return out


@pytest.mark.parametrize(
    ("edited", "expected"),
    [
        # REPLUG's module: REPLUG and REPLUG LSR (built on it), nothing else.
        ("architectures/replug.py", {"train@replug", "evaluate@replug", "train@replug_lsr", "evaluate@replug_lsr"}),
        # The training loop: only architectures that train.
        ("training/loop.py", {f"{kind}@{name}" for name in ("replug_lsr", "aar", "atlas") for kind in ("train", "evaluate")}),
        # The LM layer: every architecture, no data stage.
        ("lm/model.py", {f"{kind}@{name}" for name in ("closed_book", "incontext_ralm", "replug", "replug_lsr", "aar", "atlas")
                         for kind in ("train", "evaluate")}),
        # The harness: every evaluation, no training.
        ("evaluation/metrics.py", {f"evaluate@{name}" for name in ("closed_book", "incontext_ralm", "replug", "replug_lsr", "aar", "atlas")}),
        # Chunking: the chunk stage only (downstream stages re-run because their inputs change).
        ("data/chunk.py", {"chunk"}),
        # Orchestration is not a dependency.
        ("stages.py", set()),
    ],
)
def test_a_source_change_reruns_exactly_what_depends_on_it(config, tmp_path, monkeypatch, edited, expected):
    copy = tmp_path / "ragops"
    shutil.copytree(pipeline.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "PACKAGE_ROOT", copy)
    wanted = {"closed_book", "incontext_ralm", "replug", "replug_lsr", "aar", "atlas"}
    assert wanted <= set(config.enabled_architectures())
    before = _fingerprints(config)
    with open(copy / edited, "a") as handle:
        handle.write("\n# edited\n")
    after = _fingerprints(config)
    changed = {stage for stage in before if before[stage] != after[stage]}
    assert {s for s in changed if s.split("@")[-1] in wanted or "@" not in s} == expected
