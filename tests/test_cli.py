"""The real `ragops` command: bad input gets one clear line, a non-zero exit, and nothing is lost."""

import os
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


@pytest.mark.slow
def test_evaluate_names_each_architecture_and_its_table_fits_100_columns(copy_workspace):
    import json

    ws = copy_workspace()
    result = subprocess.run(
        [*RAGOPS, "-w", str(ws), "evaluate", "closed_book", "incontext_ralm"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("evaluate")] == ["evaluate closed_book", "evaluate incontext_ralm"]
    assert max(len(line) for line in lines) <= 100
    # Every metric name of the table is printed whole, on one line.
    metrics = json.loads((ws / "metrics" / "incontext_ralm.json").read_text())
    shown = [k for k in metrics if k.split("/")[0] in ("describe", "identify", "lm") and not k.endswith(("_ci_low", "_ci_high"))]
    assert shown and all(any(f"│ {key} " in line for line in lines) for key in shown)


def test_links_are_not_hard_wrapped():
    from rich.console import Console

    from ragops import cli_ops

    url = "http://127.0.0.1:5000/#/compare-runs?runs=[%2262b7a0c7e3a94f4bb1f0%22,%22b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8%22]&experiments=[%221%22]"
    narrow = Console(width=60, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    original, cli_ops.console = cli_ops.console, narrow
    try:
        cli_ops._link(f"compare the latest architectures: {url}")
    finally:
        cli_ops.console = original
    assert url in narrow.export_text().splitlines()[0]
