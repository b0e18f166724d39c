"""Evaluation inputs: questions and held-out documents per `EvalConfig`, and the leakage gate."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ragops.errors import DataError, RagopsError
from ragops.paths import Workspace

QA_TASKS = ("describe", "identify")


def _read(path: Path, what: str, columns: Iterable[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: {what} not found (run the earlier pipeline stages first)")
    frame = pd.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def load_questions(ws: Workspace, tasks: Iterable[str], split: str, max_questions: int | None) -> pd.DataFrame:
    """Questions of `split` for each QA task in `tasks`, the first `max_questions` per task by qid."""
    tasks = [t for t in tasks if t in QA_TASKS]
    if not tasks:
        return pd.DataFrame(columns=["qid", "task", "split", "question", "answer", "gold_doc_id"])
    frame = _read(ws.questions, "questions", ["qid", "task", "split", "question", "answer", "gold_doc_id"])
    parts = []
    for task in tasks:
        rows = frame[(frame["task"] == task) & (frame["split"] == split)].sort_values("qid", kind="stable")
        if rows.empty:
            raise DataError(f"{ws.questions}: no '{task}' questions in split '{split}'")
        parts.append(rows.head(max_questions) if max_questions else rows)
    return pd.concat(parts, ignore_index=True)


def heldout_split(doc_id: str) -> str:
    """Held-out articles are halved, stably by id, into a `dev` half (sweeps) and a `test` half."""
    return "dev" if hashlib.sha1(doc_id.encode("utf-8")).digest()[0] % 2 == 0 else "test"


def load_heldout(ws: Workspace, split: str, max_docs: int | None) -> pd.DataFrame:
    """Held-out documents of `split` (a `split` column when present, else `heldout_split`)."""
    frame = _read(ws.heldout, "held-out documents", ["doc_id", "title", "text"])
    if split not in ("dev", "test"):
        raise RagopsError(f"held-out documents are split into dev and test halves only; got split '{split}' for the lm task")
    splits = frame["split"] if "split" in frame.columns else frame["doc_id"].map(heldout_split)
    rows = frame[splits == split].sort_values("doc_id", kind="stable")
    if rows.empty:
        raise DataError(f"{ws.heldout}: no held-out documents in the '{split}' half")
    return (rows.head(max_docs) if max_docs else rows).reset_index(drop=True)


def document_text(title: str, text: str) -> str:
    """The text scored for a held-out document: the same `{title}\\n{text}` form as indexed chunks."""
    return f"{(title or '').strip()}\n{(text or '').strip()}" if title else (text or "").strip()


def check_no_leakage(heldout_doc_ids: Iterable[str], indexed_doc_ids: Iterable[str], where: str = "the index") -> None:
    """Raise RagopsError when any held-out document is also indexed (it would be retrieved verbatim)."""
    leaked = sorted(set(heldout_doc_ids) & set(indexed_doc_ids))
    if leaked:
        shown = ", ".join(leaked[:3]) + (" ..." if len(leaked) > 3 else "")
        raise RagopsError(f"leakage: {len(leaked)} held-out document(s) are in {where} ({shown}); rebuild the chunks and index")


def check_workspace_leakage(ws: Workspace) -> None:
    """`check_no_leakage` of every held-out document against the chunk table the index was built from
    (skipped when there is no chunk table: then nothing can be retrieved from it either)."""
    if ws.chunks.exists():
        heldout = pd.read_parquet(ws.heldout, columns=["doc_id"])["doc_id"]
        indexed = pd.read_parquet(ws.chunks, columns=["doc_id"])["doc_id"]
        check_no_leakage(heldout, indexed, where=str(ws.chunks))
