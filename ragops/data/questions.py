"""The user's own questions (`benchmark.questions`): a JSONL file -> the `qa` task's question table.

One JSON object per line:

    {"question": "What does ANSI stand for?", "answer": "American National Standards Institute"}
    {"question": "...", "answers": ["two", "2"], "doc_id": "file:ansi.txt"}
    {"question": "...", "answer": "...", "title": "ANSI"}

`answer` (a string) or `answers` (a non-empty list of strings: any of them counts as correct; the
first is the reference the gold-answer NLL scores) is required; `doc_id` or `title` optionally names
the gold document (which must then be in the corpus; a title must name exactly one document). Blank
lines are ignored. A line that is not such an object (bad JSON, a missing or empty field, an unknown
gold document, a question asked twice) is skipped and reported with its file:line and the reason, one
line each; every other line is kept. A file without any valid question is an error.

qids are `qa:` + a hash of the normalised question, so they do not move when lines are reordered.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ragops.errors import DataError

USER_QUESTION_COLUMNS = ["qid", "question", "answer", "answers", "gold_doc_id", "line"]
MAX_LINE_BYTES = 1 << 20  # a longer line is not a question


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value or None


def _parse(record: Any, by_id: set[str], by_title: dict[str, list[str]]) -> tuple[dict[str, Any] | None, str | None]:
    """(row, None) or (None, the reason the line is unusable)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    question = _text(record.get("question"))
    if question is None:
        return None, "'question' is missing or not a non-empty string"
    answers: list[str] = []
    if "answer" in record:
        answer = _text(record["answer"])
        if answer is None:
            return None, "'answer' is not a non-empty string"
        answers.append(answer)
    if "answers" in record:
        raw = record["answers"]
        if not isinstance(raw, list) or not raw or any(_text(a) is None for a in raw):
            return None, "'answers' is not a non-empty list of non-empty strings"
        answers += [_text(a) for a in raw]
    if not answers:
        return None, "no 'answer' or 'answers'"
    answers = list(dict.fromkeys(answers))
    gold = None
    if record.get("doc_id") is not None:
        gold = record["doc_id"] if isinstance(record["doc_id"], str) else None
        if gold not in by_id:
            return None, f"doc_id {record['doc_id']!r} is not in the corpus"
    elif record.get("title") is not None:
        title = _text(record["title"])
        matches = by_title.get(title.casefold(), []) if title else []
        if len(matches) != 1:
            found = "no document" if not matches else f"{len(matches)} documents ({', '.join(matches[:3])})"
            return None, f"title {record['title']!r} names {found}; give its doc_id"
        gold = matches[0]
    return {"question": question, "answer": answers[0], "answers": answers, "gold_doc_id": gold}, None


def read_user_questions(path: Path, corpus: pd.DataFrame, *, label: str | None = None) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """(questions, skipped): the valid questions (USER_QUESTION_COLUMNS, in file order) and one
    `{"path", "line", "reason"}` per unusable line. `label` is how the file is named in reports
    (default: `path`). Raises DataError (one line) when the file cannot be read or has no valid line."""
    label = label or str(path)
    if not path.is_file():
        raise DataError(f"{label}: benchmark.questions file not found" if not path.exists() else f"{label}: not a file")
    by_id = set(corpus["doc_id"].astype(str))
    by_title: dict[str, list[str]] = {}
    for doc_id, title in zip(corpus["doc_id"], corpus["title"], strict=True):
        by_title.setdefault(" ".join(str(title).split()).casefold(), []).append(str(doc_id))
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            def skip(reason: str) -> None:
                skipped.append({"path": label, "line": number, "reason": reason})

            if len(raw) > MAX_LINE_BYTES:
                skip(f"line is {len(raw):,} bytes (limit {MAX_LINE_BYTES:,})")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                skip(f"not UTF-8 ({error.reason} at byte {error.start})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                skip(f"invalid JSON ({error.msg} at column {error.colno})")
                continue
            row, reason = _parse(record, by_id, by_title)
            if row is None:
                skip(reason)
                continue
            key = row["question"].casefold()
            if key in seen:
                skip(f"the same question as line {seen[key]}")
                continue
            seen[key] = number
            row["qid"] = "qa:" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
            row["line"] = number
            rows.append(row)
    if not rows:
        first = f"; the first: line {skipped[0]['line']}: {skipped[0]['reason']}" if skipped else ""
        raise DataError(f"{label}: no valid question ({len(skipped):,} line{'s' if len(skipped) != 1 else ''} skipped{first})")
    frame = pd.DataFrame(rows, columns=USER_QUESTION_COLUMNS)
    frame["gold_doc_id"] = pd.Series([r["gold_doc_id"] for r in rows], dtype=object)  # None, not NaN, where none is named
    return frame, skipped
