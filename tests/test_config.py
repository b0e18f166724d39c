"""params.yaml is validated with errors that name the bad key; profiles merge over the base."""

from pathlib import Path

import pytest
import yaml

from ragops.params import load_config, resolve
from ragops.errors import ConfigError

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.mark.parametrize("profile", ["default", "smoke", "full"])
def test_project_params_are_valid_in_every_profile(profile):
    config = load_config(PROJECT_PARAMS, profile)
    assert config.profile == profile
    assert set(config.enabled_architectures()) >= {"closed_book", "incontext_ralm"}


def test_profile_overrides_are_deep_merged():
    config = load_config(PROJECT_PARAMS, "smoke")
    assert config.ingest.limit == 300
    assert config.index.factory == "Flat"
    assert config.index.ef_search == 64  # untouched sibling keys survive the merge
    assert load_config(PROJECT_PARAMS, "default").index.factory == "HNSW32"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"index": {"factroy": "Flat"}}, "unknown key 'index.factroy'"),
        ({"chunkk": {}}, "unknown key 'chunkk'"),
        ({"index": {"bm25": {"k3": 1}}}, "unknown key 'index.bm25.k3'"),
        ({"chunk": {"size": "big"}}, "invalid value for 'chunk.size'"),
        ({"chunk": {"size": 16, "overlap": 16}}, "chunk.overlap (16) must be smaller than chunk.size (16)"),
        ({"validate": {"min_rowz": 3}}, "unknown key 'validate.min_rowz'"),
        ({"architectures": {"incontext_ralm": {"strid": 4}}}, "unknown key 'architectures.incontext_ralm.strid'"),
        ({"architectures": {"retro2": {}}}, "unknown architecture 'architectures.retro2'"),
        ({"profile": "fast"}, "unknown profile 'fast'"),
    ],
)
def test_bad_keys_fail_with_one_line_naming_the_key(raw, expected):
    with pytest.raises(ConfigError) as error:
        resolve(raw)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("params.yaml")


def test_errors_inside_a_profile_name_the_profile(tmp_path):
    params = yaml.safe_load(PROJECT_PARAMS.read_text())
    params["profiles"]["smoke"]["embed"] = {"batchsize": 8}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"profile 'smoke'\): unknown key 'embed.batchsize'"):
        load_config(path, "smoke")
    load_config(path, "default")  # the base is still fine


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nindex:\n  factory: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: not valid YAML"):
        load_config(path)
