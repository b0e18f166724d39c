"""Evaluation inputs: questions and held-out documents per `EvalConfig`, and the leakage gate."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ragops.data.benchmark import assert_no_leakage
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


def load_train_answers(ws: Workspace) -> frozenset[str]:
    """Every train-split answer (all QA tasks), normalised as EM normalises: the answers a method
    that trains on the train split may have memorised."""
    from ragops.evaluation.metrics import normalize_answer

    frame = _read(ws.questions, "questions", ["split", "answer"])
    return frozenset(normalize_answer(a) for a in frame.loc[frame["split"] == "train", "answer"])


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


def check_workspace_leakage(ws: Workspace) -> None:
    """`assert_no_leakage` of every held-out document against the chunk table the index was built from
    (skipped when there is no chunk table: then nothing can be retrieved from it either)."""
    if ws.chunks.exists():
        heldout = pd.read_parquet(ws.heldout, columns=["doc_id"])["doc_id"]
        indexed = pd.read_parquet(ws.chunks, columns=["doc_id"])["doc_id"]
        assert_no_leakage(heldout, indexed, where=str(ws.chunks))
