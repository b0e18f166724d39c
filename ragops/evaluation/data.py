"""Evaluation inputs: questions and held-out documents per `EvalConfig`, and the leakage gate."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ragops.config import BENCHMARK_TASKS, EvalConfig
from ragops.data.benchmark import assert_no_leakage, heldout_split
from ragops.errors import DataError, RagopsError
from ragops.paths import Workspace

log = logging.getLogger("ragops.evaluation")

QA_TASKS = BENCHMARK_TASKS
QUESTION_COLUMNS = ["qid", "task", "split", "question", "answer", "gold_doc_id", "answers"]

__all__ = ["QA_TASKS", "check_workspace_leakage", "eval_tasks", "heldout_split", "load_heldout", "load_questions"]


def _read(path: Path, what: str, columns: Iterable[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: {what} not found (run the earlier pipeline stages first)")
    frame = pd.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def eval_tasks(ws: Workspace, eval_config: EvalConfig) -> list[str]:
    """The tasks to evaluate: `eval.tasks` (auto: every QA task the split built, then lm), without
    those that have no question in `eval.split` (each skipped with a one-line warning) and without
    lm when there is no held-out document in the split's half. Raises when nothing is left."""
    lm_only = eval_config.tasks != "auto" and set(eval_config.tasks) == {"lm"}
    if lm_only and not ws.questions.exists():  # perplexity alone needs no question table
        frame = pd.DataFrame(columns=["task", "split"])
    else:
        frame = _read(ws.questions, "questions", ["task", "split"])
    split = eval_config.split
    in_split = frame.loc[frame["split"] == split, "task"].value_counts().to_dict()
    built = [t for t in QA_TASKS if t in set(frame["task"])]
    wanted = [*built, "lm"] if eval_config.tasks == "auto" else list(dict.fromkeys(eval_config.tasks))
    tasks: list[str] = []
    for task in wanted:
        if task == "lm":
            heldout = _read(ws.heldout, "held-out documents", ["doc_id"])
            halves = heldout["split"] if "split" in heldout.columns else heldout["doc_id"].map(heldout_split)
            if split in ("dev", "test") and halves.eq(split).any():
                tasks.append(task)
            else:
                log.warning("eval: task lm skipped: no held-out document in the '%s' half", split)
        elif task not in built:
            log.warning("eval: task %s skipped: the benchmark split did not build it (see %s)", task, ws.benchmark_dir / "split.json")
        elif not in_split.get(task):
            log.warning("eval: task %s skipped: 0 questions in split '%s'", task, split)
        else:
            tasks.append(task)
    if not tasks:
        raise DataError(f"{ws.questions}: nothing to evaluate: none of the tasks {', '.join(wanted) or '(none)'} has "
                        f"questions or held-out documents in split '{split}' (see {ws.benchmark_dir / 'split.json'})")
    return tasks


def load_questions(ws: Workspace, tasks: Iterable[str], split: str, max_questions: int | None) -> pd.DataFrame:
    """Questions of `split` for each QA task in `tasks`, the first `max_questions` per task by qid.
    `answers` (every accepted answer) is [answer] in a split made before it existed."""
    tasks = [t for t in tasks if t in QA_TASKS]
    if not tasks:
        return pd.DataFrame(columns=QUESTION_COLUMNS)
    frame = _read(ws.questions, "questions", QUESTION_COLUMNS[:-1])
    if "answers" not in frame.columns:
        frame["answers"] = [[a] for a in frame["answer"]]
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
