"""The real `ragops` command: bad input gets one clear line, a non-zero exit, and nothing is lost."""

import subprocess
import sys
from pathlib import Path

import pytest

from ragops.io import path_hash

RAGOPS = [str(Path(sys.executable).with_name("ragops"))]


def ragops(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RAGOPS, "-w", str(workspace), *args], capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines, result.stdout
    return lines[-1]


def test_help_lists_every_stage():
    result = subprocess.run([*RAGOPS, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("ingest", "validate", "split", "chunk", "embed", "index", "eval-retrieval", "prepare-lm", "evaluate", "run"):
        assert command in result.stdout


def test_mistyped_params_key_is_one_line_and_exit_1(copy_workspace):
    ws = copy_workspace()
    params = ws / "params.yaml"
    params.write_text(params.read_text().replace("ef_search:", "ef_serch:"))
    result = ragops(ws, "index")
    assert result.returncode == 1
    assert "unknown key 'index.ef_serch'" in error_line(result)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("make_source", "expected"),
    [
        (lambda p: p.mkdir(), "no .txt, .md, .html or .jsonl documents found"),
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("a file, not a folder"), "must be a folder"),
    ],
    ids=["empty-folder", "missing", "not-a-folder"],
)
def test_unusable_source_fails_without_touching_the_corpus(copy_workspace, make_source, expected):
    ws = copy_workspace()
    before = path_hash(ws / "data")
    source = ws.parent / "source"
    make_source(source)
    result = ragops(ws, "ingest", "--source", str(source))
    assert result.returncode == 1
    line = error_line(result)
    assert expected in line and "source" in line
    assert "Traceback" not in result.stderr
    assert path_hash(ws / "data") == before


def test_folder_with_one_bad_file_is_ingested_and_the_bad_file_reported(copy_workspace):
    ws = copy_workspace()
    source = ws.parent / "docs"
    source.mkdir()
    for i in range(3):
        (source / f"note{i}.md").write_text(f"# Note {i}\n\nThis is note number {i} about the river Thames and its bridges.\n")
    (source / "broken.txt").write_bytes(b"valid start \xff\xfe then invalid utf-8")
    result = ragops(ws, "--profile", "default", "ingest", "--source", str(source))
    assert result.returncode == 0, result.stderr
    assert "broken.txt" in result.stderr and "UTF-8" in result.stderr
    import pandas as pd

    corpus = pd.read_parquet(ws / "data" / "corpus.parquet")
    assert sorted(corpus["title"]) == ["Note 0", "Note 1", "Note 2"]
