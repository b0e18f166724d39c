"""Atomic writes: a failure never leaves a half-written output, and never loses the previous one."""

import pytest

from ragops.io import atomic_dir, atomic_file, path_hash


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "index"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"v1")
    assert (target / "a.bin").read_bytes() == b"v1"

    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.bin").write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert (target / "a.bin").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp leftovers

    with atomic_dir(target) as tmp:
        (tmp / "b.bin").write_bytes(b"v2")
    assert sorted(p.name for p in target.iterdir()) == ["b.bin"]


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "meta.json"
    with atomic_file(target) as handle:
        handle.write("old")
    with pytest.raises(ValueError):
        with atomic_file(target) as handle:
            handle.write("new, partial")
            raise ValueError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_path_hash_tracks_content_and_names(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("one")
    first = path_hash(tmp_path / "d")
    (tmp_path / "d" / "x.txt").write_text("two")
    second = path_hash(tmp_path / "d")
    (tmp_path / "d" / "x.txt").rename(tmp_path / "d" / "y.txt")
    assert len({first, second, path_hash(tmp_path / "d")}) == 3
