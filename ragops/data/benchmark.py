"""The benchmark split: held-out articles and question sets, deterministic from the seed.

1. A fraction of the articles is *held out*: never indexed, never trained on (language-model
   perplexity is measured on them).
2. From the remaining *indexed* articles that have a description, two QA tasks are made:
   - `describe`: "What is {title}?" -> the description;
   - `identify`: 'Which subject is described as "{description}"?' -> the title, only where the
     description is unique in the whole corpus (case-insensitive), so the answer is unambiguous.
   The gold document of both is the article itself.
3. Articles (not questions) are assigned to train/dev/test, so an article's describe and identify
   questions always share a split.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from ragops.config import BenchmarkConfig
from ragops.errors import RagopsError

QUESTION_COLUMNS = ["qid", "task", "split", "question", "answer", "gold_doc_id"]
TASKS = ("describe", "identify")
SPLITS = ("train", "dev", "test")


def _description_key(value: Any) -> str | None:
    if value is None or pd.isna(value):
        return None
    key = " ".join(str(value).split()).casefold()
    return key or None


def split_benchmark(corpus: pd.DataFrame, cfg: BenchmarkConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(heldout, questions): held-out articles (corpus columns, sorted by doc_id) and the question
    table (QUESTION_COLUMNS, sorted by qid). Same corpus and seed -> identical tables."""
    if corpus.empty:
        raise RagopsError("cannot build a benchmark from an empty corpus")
    if not corpus["doc_id"].is_unique:
        raise RagopsError("cannot build a benchmark: corpus doc_id values are not unique")
    corpus = corpus.sort_values("doc_id", kind="stable").reset_index(drop=True)
    n = len(corpus)
    rng = np.random.default_rng(seed)

    n_heldout = int(round(cfg.heldout_fraction * n))
    if n >= 2:
        n_heldout = min(max(n_heldout, 1), n - 1)  # at least one held out, at least one indexed
    heldout_rows = np.sort(rng.permutation(n)[:n_heldout])
    is_heldout = np.zeros(n, dtype=bool)
    is_heldout[heldout_rows] = True
    heldout = corpus[is_heldout].reset_index(drop=True)

    keys = [_description_key(v) for v in corpus["description"]]
    key_counts = pd.Series([k for k in keys if k is not None], dtype=object).value_counts().to_dict()
    eligible = [i for i in range(n) if not is_heldout[i] and keys[i] is not None]

    # Split per article: a permutation of the eligible articles, cut by the configured fractions.
    m = len(eligible)
    order = rng.permutation(m)
    n_train = int(round(cfg.train_fraction * m))
    n_dev = min(int(round(cfg.dev_fraction * m)), m - n_train)
    split_of: dict[int, str] = {}
    for rank, j in enumerate(order):
        split_of[eligible[j]] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"

    rows = []
    for i in eligible:
        doc_id = corpus.at[i, "doc_id"]
        title = corpus.at[i, "title"]
        description = " ".join(str(corpus.at[i, "description"]).split())
        split = split_of[i]
        rows.append(("describe:" + doc_id, "describe", split, f"What is {title}?", description, doc_id))
        if key_counts.get(keys[i]) == 1:
            rows.append(
                ("identify:" + doc_id, "identify", split, f'Which subject is described as "{description}"?', title, doc_id)
            )
    questions = pd.DataFrame(rows, columns=QUESTION_COLUMNS).sort_values("qid", kind="stable").reset_index(drop=True)
    return heldout, questions


def benchmark_summary(corpus: pd.DataFrame, heldout: pd.DataFrame, questions: pd.DataFrame) -> dict[str, Any]:
    """Counts for split.json and MLflow: articles held out / indexed, questions per task and split."""
    counts = questions.groupby(["task", "split"]).size()
    return {
        "articles": int(len(corpus)),
        "heldout": int(len(heldout)),
        "indexed": int(len(corpus) - len(heldout)),
        "questions": {
            task: {split: int(counts.get((task, split), 0)) for split in SPLITS} for task in TASKS
        },
    }


def indexed_corpus(corpus: pd.DataFrame, heldout: pd.DataFrame) -> pd.DataFrame:
    """The corpus without its held-out articles (what may be chunked, indexed and trained on)."""
    return corpus[~corpus["doc_id"].isin(set(heldout["doc_id"]))].reset_index(drop=True)


def assert_no_leakage(heldout_ids: Iterable[str], used_doc_ids: Iterable[str], where: str = "the index or training data") -> None:
    """Raise RagopsError if any held-out article is among `used_doc_ids` (what was indexed or trained on)."""
    leaked = sorted(set(heldout_ids) & set(used_doc_ids))
    if leaked:
        examples = ", ".join(leaked[:3]) + (", ..." if len(leaked) > 3 else "")
        raise RagopsError(
            f"leakage: {len(leaked):,} held-out document{'s' if len(leaked) != 1 else ''} in {where} "
            f"({examples}); rebuild the chunks and index from the current split"
        )
