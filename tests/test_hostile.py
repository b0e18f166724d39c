"""Real corpora and hostile input (issue 10 §5): each unusable input is one line and a non-zero exit,
nothing is lost or silently replaced; usable folders (a dictionary-like folder with one too-short
file, an HTML documentation set) pass the gate.

The `ragops` command runs in process (its real `main`: the same error handling as the console
script, without paying the import time per case); stderr is what a user would see.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from ragops.config import IngestConfig
from ragops.data.ingest import load_corpus
from ragops.errors import RagopsError

# A documentation page as Sphinx and similar generators write it: banner, navigation sidebar,
# permalink marks, a related-topics aside, a footer, and a code example that shows HTML.
DOC_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Templates &mdash; Widget 2.1 documentation</title>
<style>body {{ color: red }}</style><script>var tracking = "do not index";</script></head>
<body>
<header class="site-header"><a href="/">Widget docs home</a> <span>Version 2.1 banner</span></header>
<nav class="sidebar"><ul><li><a href="install.html">Installation guide</a></li>
<li><a href="templates.html">Templates chapter</a></li><li><a href="api.html">API reference index</a></li></ul></nav>
<div class="document"><main role="main">
<h1>{title}<a class="headerlink" href="#t" title="Permalink to this headline">¶</a></h1>
<p>Widget renders pages from templates. {body} A template is a plain text file with placeholders that
the renderer fills from a context dictionary at request time.</p>
<h2>A first template<a class="headerlink" href="#first" title="Permalink">¶</a></h2>
<p>The following example shows a minimal template that greets the current user by name.</p>
<pre><code>&lt;div class="greeting"&gt;
  &lt;p&gt;Hello, {{{{ user.name }}}}!&lt;/p&gt;
&lt;/div&gt;</code></pre>
<p>Save it next to your application module and render it to produce the final page.</p>
</main></div>
<aside class="related"><h3>Related topics</h3><p>See also the filters chapter and the caching guide.</p></aside>
<footer>&copy; 2026 Widget authors. Built with Sphinx using a theme provided by Read the Docs.</footer>
</body></html>
"""
FURNITURE = ("Widget docs home", "banner", "Installation guide", "API reference index", "Related topics",
             "caching guide", "Widget authors", "Read the Docs", "¶", "do not index", "color: red")


@pytest.fixture
def workspace(tmp_path, monkeypatch, migrated_mlflow_db):
    """A bare workspace (no corpus yet) with its own MLflow store; the environment is restored after."""
    ws = tmp_path / "ws"
    (ws / "mlruns").mkdir(parents=True)
    shutil.copy(migrated_mlflow_db, ws / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
    saved = dict(os.environ)
    yield ws
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def ragops(capsys, monkeypatch, caplog):
    """`ragops(workspace, *args)` -> (exit code, stdout, stderr plus the log lines of the run)."""
    from ragops.cli import main

    def run(workspace: Path, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        caplog.clear()
        caplog.set_level(logging.INFO, logger="ragops")
        monkeypatch.setattr(sys, "argv", ["ragops", "-w", str(workspace), *args])
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        out, err = capsys.readouterr()
        logged = "\n".join(record.getMessage() for record in caplog.records)
        return code, out, err + ("\n" + logged if logged else "")

    return run


def one_error_line(err: str) -> str:
    """The one `error:` line of stderr (progress lines may precede it); never a traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def write_folder(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def dictionary_folder(root: Path, n: int = 6) -> Path:
    """Term + definition files (no descriptions, no questions), and one 15-character file."""
    files = {f"terms/term{i:02d}.txt": f"Term {i}\nThe definition of term number {i}, a word used in examples." for i in range(n)}
    files["terms/short.txt"] = "Too short here."  # 15 characters
    return write_folder(root, files)


# --- params.yaml: missing, mistyped, wrongly typed -----------------------------------------------
def test_missing_params_file_is_an_error_not_the_code_defaults(workspace, ragops):
    code, _, err = ragops(workspace, "config")
    assert code == 1
    line = one_error_line(err)
    assert f"{workspace / 'params.yaml'}: params file not found" in line and "--params" in line

    write_params(workspace)
    code, _, err = ragops(workspace, "--params", str(workspace / "nope.yaml"), "config")
    assert code == 1 and "nope.yaml: params file not found" in one_error_line(err)

    code, _, err = ragops(workspace, "--params", str(workspace), "config")
    assert code == 1 and one_error_line(err).endswith(f"{workspace}: is a folder; --params takes a params.yaml file")

    code, out, _ = ragops(workspace, "config")  # the real file: fine
    assert code == 0 and yaml.safe_load(out)["profile"] == "smoke"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"embed": {"batch_size": True}}, "invalid value for 'embed.batch_size': expected a number, got the boolean true"),
        ({"profiles": {"smoke": 5}}, "'profiles.smoke' must be a mapping of overrides"),
        ({"profiles": {"full": [1]}}, "'profiles.full' must be a mapping of overrides"),  # not the active one
        ({"tracking": {"experiment": ""}}, "invalid value for 'tracking.experiment': the MLflow experiment needs a name"),
        ({"ingest": {"source": " "}}, "invalid value for 'ingest.source'"),
        ({"validate": {"min_chars": 20}}, "'validate.min_chars' moved to 'ingest.min_chars'"),
        # An option under the smoke profile is named by its own key path, the profile beside the file.
        ({"profiles": {"smoke": {"architectures": {"incontext_ralm": {"k": "many"}}}}},
         "(profile 'smoke'): invalid value for 'architectures.incontext_ralm.k'"),
        ({"profiles": {"smoke": {"architectures": {"replug_lsr": {"train": {"steps": True}}}}}},
         "(profile 'smoke'): invalid value for 'architectures.replug_lsr.train.steps': expected a number"),
    ],
    ids=["bool-for-int", "profile-not-a-mapping", "inactive-profile-not-a-mapping", "empty-experiment", "blank-source", "moved-key",
         "profile-option-path", "profile-nested-bool"],
)
def test_bad_params_are_one_line_naming_the_key(workspace, ragops, overrides, expected):
    write_params(workspace, **overrides)
    code, _, err = ragops(workspace, "config")
    assert code == 1
    line = one_error_line(err)
    assert expected in line, line
    assert "profile 'architectures" not in line


# --- the command line -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_unknown_architecture_is_a_usage_error(workspace, ragops, command):
    write_params(workspace)
    code, _, err = ragops(workspace, command, "bogus_arch")
    assert code == 2
    line = one_error_line(err)
    assert f"ragops {command} bogus_arch: unknown architecture (configured: closed_book, incontext_ralm, replug" in line
    assert not (workspace / "artifacts").exists()


def test_empty_source_never_falls_back_to_the_default_corpus(workspace, ragops):
    write_params(workspace)
    for command in ("ingest", "run"):
        code, _, err = ragops(workspace, command, "--source", "")
        assert code == 2 and "--source is empty" in one_error_line(err)
    assert not (workspace / "data").exists()  # nothing was ingested


def test_missing_model_folders_are_one_line(tmp_path):
    from ragops.data.chunk import load_tokenizer
    from ragops.lm.prepare import prepare_lm

    missing = tmp_path / "models" / "nope"
    with pytest.raises(RagopsError, match=rf"^embed.model '{missing}': no such folder .*'default'$"):
        load_tokenizer(str(missing))
    with pytest.raises(RagopsError, match=r"^embed.model 'nobody/no-such-encoder': cannot load its tokenizer \("):
        load_tokenizer("nobody/no-such-encoder")  # offline, not in the cache
    with pytest.raises(RagopsError, match=r"^lm.model '\./models/nope': no such folder"):
        prepare_lm("./models/nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- real corpora through the gate ------------------------------------------------------------
def test_dictionary_folder_with_a_short_file_passes_the_gate(workspace, tmp_path, ragops):
    source = dictionary_folder(tmp_path / "dictionary")
    write_params(workspace, profiles={"smoke": {"validate": {"min_rows": 5}}})
    code, _, err = ragops(workspace, "ingest", "--source", str(source))
    assert code == 0, err
    # The 15-character file is skipped at ingest with one line; the other six are kept.
    skipped = [line for line in err.splitlines() if "short.txt" in line]
    assert len(skipped) == 1 and "text is 15 characters (minimum 20)" in skipped[0]
    report = json.loads((workspace / "data" / "ingest_report.json").read_text())
    assert report["documents"] == 6 and [s["path"] for s in report["skipped"]] == ["terms/short.txt"]

    code, _, err = ragops(workspace, "validate")
    assert code == 0, err
    assert json.loads((workspace / "artifacts" / "validation" / "status.json").read_text())["success"] is True

    # No descriptions: the split derives the tasks this corpus allows and says which, instead of a silent questions=0.
    code, _, err = ragops(workspace, "split")
    assert code == 0, err
    assert "split: task define built: 5 indexed documents have a heading title" in " ".join(err.split())


def test_gate_failure_names_the_files_the_limit_and_the_key(workspace, tmp_path, ragops):
    files = {f"d{i}.txt": f"Entry {i}\n<body>The definition of entry {i}, kept inside markup.</body>" for i in range(5)}
    files["plain.txt"] = "Plain entry\nA definition without any markup at all in it."
    source = write_folder(tmp_path / "marked", files)
    write_params(workspace, profiles={"smoke": {"validate": {"min_rows": 5, "examples": 2}}})
    assert ragops(workspace, "ingest", "--source", str(source))[0] == 0
    code, _, err = ragops(workspace, "validate")
    assert code == 1
    line = one_error_line(err)
    assert ("expect_column_values_to_not_match_regex(text) on 5 rows: file:d0.txt, file:d1.txt, ... "
            "[wanted: no HTML tags (<div>, <p>, <body>, ...) in the text of files other than .html/.md]") in line
    assert "set validate.leftover_html: false" in line
    status = json.loads((workspace / "artifacts" / "validation" / "status.json").read_text())
    assert status["success"] is False  # downstream stages refuse this corpus

    write_params(workspace, profiles={"smoke": {"validate": {"min_rows": 5, "leftover_html": False}}})  # the key the message names
    code, _, err = ragops(workspace, "validate")
    assert code == 0, err


def test_html_documentation_keeps_main_content_only(workspace, tmp_path, ragops):
    pages = {f"docs/page{i}.html": DOC_PAGE.format(title=f"Templates {i}", body=f"Page {i} of the guide.") for i in range(5)}
    source = write_folder(tmp_path / "site", pages)
    write_params(workspace, profiles={"smoke": {"validate": {"min_rows": 5}}})
    assert ragops(workspace, "ingest", "--source", str(source))[0] == 0
    code, _, err = ragops(workspace, "validate")
    assert code == 0, err  # the code example's tags are page text, not leftover markup

    import pandas as pd

    corpus = pd.read_parquet(workspace / "data" / "corpus.parquet").set_index("doc_id")
    page = corpus.loc["file:docs/page0.html"]
    assert page["title"] == "Templates — Widget 2.1 documentation"
    text = page["text"]
    assert text.startswith("Templates 0\nWidget renders pages from templates. Page 0 of the guide.")
    assert '<div class="greeting">\n<p>Hello, {{ user.name }}!</p>\n</div>' in text  # the example, as text
    assert text.endswith("render it to produce the final page.")
    for furniture in FURNITURE:
        assert furniture not in text, furniture


def test_markdown_raw_html_goes_but_code_examples_stay(tmp_path):
    page = (
        "# Widgets <small>v2</small>\n\n"
        "<div align=\"center\">A centred banner line of the readme.</div>\n\n"
        "Call `<br>` in prose; <!-- a hidden note --> a line break.<br>\n\n"
        "```html\n<div class=\"greeting\">Hello!</div>\n```\n"
        "See <https://example.org/docs> for more.\n"
    )
    write_folder(tmp_path / "md", {"readme.md": page})
    corpus, _ = load_corpus(str(tmp_path / "md"), IngestConfig())
    assert corpus.loc[0, "text"] == (
        "Widgets v2\nA centred banner line of the readme.\nCall <br> in prose; a line break.\n"
        '<div class="greeting">Hello!</div>\nSee https://example.org/docs for more.'
    )


def test_non_utf8_file_name_is_skipped_with_one_line(workspace, tmp_path, ragops):
    source = dictionary_folder(tmp_path / "names")
    os.rename(source / "terms" / "term00.txt", os.fsencode(source / "terms") + b"/caf\xe9.txt")
    write_params(workspace, profiles={"smoke": {"validate": {"min_rows": 5}}})
    code, _, err = ragops(workspace, "ingest", "--source", str(source))
    assert code == 0, err
    assert "Traceback" not in err
    report = json.loads((workspace / "data" / "ingest_report.json").read_text(encoding="utf-8"))
    assert {"path": "terms/caf\\xe9.txt", "line": None, "reason": "file name is not valid UTF-8 (rename it)"} in report["skipped"]
    assert report["documents"] == 5

    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    with open(os.fsencode(only_bad) + b"/\xff.txt", "w", encoding="utf-8") as handle:
        handle.write("A document whose name is a single invalid byte.")
    code, _, err = ragops(workspace, "ingest", "--source", str(only_bad))
    assert code == 1
    assert "no usable documents; 1 skipped, the first: \\xff.txt: file name is not valid UTF-8" in one_error_line(err)
    assert json.loads((workspace / "data" / "ingest_report.json").read_text())["documents"] == 5  # previous corpus kept


def test_stale_metrics_are_removed_when_the_corpus_changes(workspace, tmp_path, ragops):
    first = dictionary_folder(tmp_path / "first")
    write_params(workspace, profiles={"smoke": {"validate": {"min_rows": 5}}})
    assert ragops(workspace, "ingest", "--source", str(first))[0] == 0
    metrics = workspace / "metrics"
    metrics.mkdir()
    (metrics / "old_arch.json").write_text('{"describe/f1": 0.5}')
    assert ragops(workspace, "ingest", "--source", str(first), "--force")[0] == 0
    assert (metrics / "old_arch.json").exists()  # same corpus: its metrics still describe it

    second = dictionary_folder(tmp_path / "second", n=7)
    code, _, err = ragops(workspace, "ingest", "--source", str(second))
    assert code == 0, err
    assert not (metrics / "old_arch.json").exists()
    assert "removed 1 metrics files of the previous one (old_arch.json)" in " ".join(err.split())


# --- memory: sizes are checked before reading, plain text is streamed -------------------------
def test_huge_text_file_is_skipped_without_being_read_whole(tmp_path):
    root = dictionary_folder(tmp_path / "big")
    huge = root / "huge.txt"
    line = "a short line of a very long file\n"  # 33 bytes
    with open(huge, "w", encoding="utf-8") as handle:
        for _ in range(2_000):
            handle.write(line * 50)  # 3.3 MB in all
    size = huge.stat().st_size
    assert size == 33 * 50 * 2_000

    tracemalloc.start()
    try:
        corpus, report = load_corpus(str(root), IngestConfig(max_file_bytes=1_000_000))
        _, by_size_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # Under the file-size limit, the text is streamed: nothing past ingest.max_chars is kept.
        corpus2, report2 = load_corpus(str(root), IngestConfig(max_chars=20_000))
        _, streamed_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s for s in report["skipped"] if s["path"] == "huge.txt"] == [
        {"path": "huge.txt", "line": None, "reason": f"file is {size:,} bytes (limit ingest.max_file_bytes = 1,000,000)"}
    ]
    chars = 32 * 50 * 2_000 + (50 * 2_000 - 1)  # lines without their newline, joined by one newline each
    assert [s for s in report2["skipped"] if s["path"] == "huge.txt"] == [
        {"path": "huge.txt", "line": None, "reason": f"text is {chars:,} characters long (limit 20,000)"}
    ]
    assert len(corpus) == len(corpus2) == 6  # the other documents are kept
    assert by_size_peak < size / 4 and streamed_peak < size / 4  # reading it whole takes more than the size
