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


# A writer that is SIGKILLed between the two renames of a directory swap: the target is gone, its
# previous version sits in `.index.old-<pid>`, the new one in `.index.tmp-<pid>-*`.
_KILLED_MID_SWAP = """
import os, sys, time
from pathlib import Path
from ragops.io import atomic_dir
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if ".old-" in str(dst):
        print("mid-swap", flush=True)
        time.sleep(600)
os.replace = replace
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "a.bin").write_bytes(b"v2")
"""


def _kill_mid_swap(target):
    import signal
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", _KILLED_MID_SWAP, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "mid-swap"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    return writer.pid


def test_next_write_restores_and_cleans_after_a_writer_killed_mid_swap(tmp_path):
    target = tmp_path / "index"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"v1")
    pid = _kill_mid_swap(target)
    assert not target.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0] == f".index.old-{pid}" and left[1].startswith(f".index.tmp-{pid}-")

    # The next write fails: the previous version is back in place, the dead writer's files gone.
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            raise RuntimeError("this write fails too")
    assert (target / "a.bin").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]

    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"v3")
    assert (target / "a.bin").read_bytes() == b"v3" and sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_leftovers_of_live_writers_are_left_alone(tmp_path):
    import os

    from ragops.io import clean_leftovers

    target = tmp_path / "meta.json"
    mine = tmp_path / f".meta.json.tmp-{os.getppid()}-abc"  # the test runner's parent: alive
    mine.write_text("being written")
    dead = tmp_path / ".meta.json.tmp-999999999-abc"  # no such pid
    dead.write_text("half")
    other = tmp_path / ".other.json.tmp-999999999-abc"  # another target's
    other.write_text("half")
    assert clean_leftovers(target) == [dead]
    assert mine.exists() and other.exists()
