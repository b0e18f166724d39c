"""Training data, from the train split only, behind a leakage gate.

What a trained architecture may learn from:
- questions of the benchmark's **train** split (every QA task the split built, user questions too);
- the text of **train-split articles** (the gold articles of train questions) and of indexed
  articles that have no question at all.
Never: held-out articles (the `lm` task scores them), dev or test questions, and the text of
dev/test articles (their summaries contain the test answers). `assert_clean_training_data`
checks a training set against all three; every builder here runs it on what it returns.

Sampling is seeded and independent of row order on disk (sorted by id first), so the same
workspace and seed give the same examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ragops.errors import RagopsError
from ragops.paths import Workspace

QA_COLUMNS = ["qid", "task", "split", "question", "answer", "gold_doc_id"]


def _questions(ws: Workspace) -> pd.DataFrame:
    if not ws.questions.exists():
        raise RagopsError(f"{ws.questions}: no benchmark questions (run the split stage first)")
    return pd.read_parquet(ws.questions)


def forbidden_doc_ids(ws: Workspace) -> set[str]:
    """Articles whose text training must never see: held-out ones and gold articles of dev/test questions."""
    heldout = set(pd.read_parquet(ws.heldout, columns=["doc_id"])["doc_id"].astype(str))
    questions = _questions(ws)
    evaluated = set(questions.loc[questions["split"] != "train", "gold_doc_id"].dropna().astype(str))
    return heldout | evaluated


def assert_clean_training_data(ws: Workspace, *, qids: Iterable[str] = (), text_doc_ids: Iterable[str] = ()) -> None:
    """Raise RagopsError (one line) when training would use a dev/test question or the text of a
    held-out or dev/test article."""
    questions = _questions(ws)
    split_of = dict(zip(questions["qid"].astype(str), questions["split"].astype(str), strict=True))
    bad_q = sorted(q for q in set(map(str, qids)) if split_of.get(q, "train") != "train")
    if bad_q:
        raise RagopsError(f"leakage: {len(bad_q)} training example(s) are {split_of[bad_q[0]]} questions ({', '.join(bad_q[:3])})")
    forbidden = forbidden_doc_ids(ws)
    bad_d = sorted(set(map(str, text_doc_ids)) & forbidden)
    if bad_d:
        raise RagopsError(f"leakage: training text from {len(bad_d)} held-out or dev/test article(s) ({', '.join(bad_d[:3])})")


def train_questions(ws: Workspace, per_task: int | None, seed: int, tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Up to `per_task` train-split questions of each QA task (all tasks the split built, or `tasks`),
    sampled with `seed`; sorted by qid within the sample order for stability."""
    questions = _questions(ws)
    train = questions[questions["split"] == "train"].sort_values("qid", kind="stable")
    wanted = list(tasks) if tasks is not None else sorted(train["task"].unique())
    parts = []
    for i, task in enumerate(wanted):
        rows = train[train["task"] == task].reset_index(drop=True)
        if rows.empty:
            continue
        if per_task is not None and len(rows) > per_task:
            pick = np.sort(np.random.default_rng([seed, i]).choice(len(rows), size=per_task, replace=False))
            rows = rows.iloc[pick]
        parts.append(rows)
    if not parts:
        raise RagopsError(f"{ws.questions}: no train-split questions for tasks {', '.join(wanted) or '(none)'} — nothing to train on")
    out = pd.concat(parts, ignore_index=True)[QA_COLUMNS]
    assert_clean_training_data(ws, qids=out["qid"], text_doc_ids=())
    return out


def trainable_articles(ws: Workspace) -> pd.DataFrame:
    """Indexed articles whose text training may read (doc_id, title, text), sorted by doc_id."""
    corpus = pd.read_parquet(ws.corpus, columns=["doc_id", "title", "text"])
    allowed = corpus[~corpus["doc_id"].astype(str).isin(forbidden_doc_ids(ws))]
    return allowed.sort_values("doc_id", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class LMWindow:
    """A language-modelling training pair: x = `prefix` tokens of an article, y = the next `target` tokens."""

    example_id: str
    doc_id: str
    prefix: str
    target: str


def lm_windows(ws: Workspace, n: int, encode, decode, prefix_tokens: int, target_tokens: int, seed: int) -> list[LMWindow]:
    """`n` (prefix, continuation) windows from distinct trainable articles long enough to hold one,
    at a seeded offset in each. `encode`/`decode` are the LM's tokenizer functions."""
    from ragops.architectures.prompts import document_text

    if n <= 0:
        return []
    articles = trainable_articles(ws)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(articles))
    out: list[LMWindow] = []
    need = prefix_tokens + target_tokens
    for row in order:
        doc = articles.iloc[int(row)]
        ids = encode(document_text(doc["title"], doc["text"]))
        if len(ids) < need:
            continue
        start = int(rng.integers(0, len(ids) - need + 1))
        out.append(LMWindow(
            example_id=f"lm:{doc['doc_id']}:{start}", doc_id=str(doc["doc_id"]),
            prefix=decode(ids[start : start + prefix_tokens]), target=decode(ids[start + prefix_tokens : start + need]),
        ))
        if len(out) == n:
            break
    assert_clean_training_data(ws, text_doc_ids=[w.doc_id for w in out])
    return out
