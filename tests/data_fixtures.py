"""Helpers that build tiny source folders and corpora for the data-plane tests."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

GOOD_TXT = "Plain Title\n\nThe first paragraph of the plain text file.\nIt has   two lines.\n"
GOOD_MD = (
    "# Markdown *Heading*\n\n"
    "Some **bold** and _italic_ text with a [link text](https://example.org) and `code`.\n\n"
    "- first bullet\n"
    "- second bullet\n\n"
    "```python\nprint('kept as text')\n```\n"
)
GOOD_HTML = (
    "<!DOCTYPE html><html><head><title>Page &amp; Title</title>"
    "<style>body { color: red; }</style><script>var hidden = 1;</script></head>"
    "<body><h1>Heading One</h1><p>First paragraph with &lt;escaped&gt; text &eacute;.</p>"
    "<div>Second<br>line</div><!-- a comment --></body></html>"
)
GOOD_JSONL_RECORDS = [
    {"id": "a1", "title": "JSON One", "text": "The first JSON document.", "description": "A test record", "topic": "Tests"},
    {"text": "The second JSON document has no id and no title."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_source_folder(root: Path) -> Path:
    """A folder with one good file of every supported type (the markdown one in a subfolder)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "plain.txt").write_text(GOOD_TXT, encoding="utf-8")
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "page.md").write_text(GOOD_MD, encoding="utf-8")
    (root / "page.html").write_text(GOOD_HTML, encoding="utf-8")
    write_jsonl(root / "records.jsonl", GOOD_JSONL_RECORDS)
    return root


def tiny_corpus(n: int = 20, prefix: str = "doc") -> pd.DataFrame:
    """A synthetic corpus table with the contract's columns (used where no real text is needed)."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "doc_id": f"{prefix}:{i:04d}",
                "title": f"Subject {i}",
                "text": f"Subject {i} is a thing. It has property number {i}. Nothing else is known about it.",
                "source": "synthetic",
                "description": f"Thing number {i}" if i % 5 else None,
                "topic": "Tests",
            }
        )
    return pd.DataFrame(rows)
