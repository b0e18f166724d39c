"""The benchmark split: held-out documents and question sets, deterministic from the seed.

1. A fraction of the documents is *held out*: never indexed, never trained on (language-model
   perplexity and the cloze task are measured on them). Gold documents of the user's questions are
   never held out. A held-out document whose near-duplicate would be indexed (the same body under
   another title, a copied page: word 8-gram containment, as RETRO filters 8-gram overlap) is not
   evaluated: it moves to the indexed side, and the summary says how many did.
2. QA tasks (`BenchmarkConfig.tasks`, auto by default; `split.json` says which were built and why):
   - `describe`: "What is {title}?" -> the description (documents that have one: the packaged
     Wikipedia corpus, whose descriptions come from Wikidata);
   - `identify`: 'Which subject is described as "{description}"?' -> the title, only where the
     description is unique in the whole corpus (case-insensitive), so the answer is unambiguous;
   - `qa`: the user's own questions (`benchmark.questions`, a JSONL file; `ragops.data.questions`);
   - `define` (derived from any corpus whose titles are headings: a dictionary's term, an HTML
     page's <title>): "What is {title}?" -> the first sentence of the text under the title;
   - `cloze` (derived from any corpus): a sentence of a held-out document with one content word
     blanked -> that word. Its source is held out, so the answer's sentence is never indexed nor
     trained on; retrieval can only help through related documents (no gold document).
   The gold document of describe, identify and define is the document itself (indexed).
3. Documents (not questions) are assigned to train/dev/test, so a document's questions always share a
   split (user questions are grouped by their gold document). Cloze questions take the dev/test half
   of their held-out document (`heldout_split`), like the `lm` task: there is no train cloze.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ragops.config import BENCHMARK_TASKS, BenchmarkConfig
from ragops.errors import RagopsError

QUESTION_COLUMNS = ["qid", "task", "split", "question", "answer", "gold_doc_id", "answers"]
TASKS = BENCHMARK_TASKS
SPLITS = ("train", "dev", "test")
MAX_TITLE_WORDS = 12  # a longer "title" is a sentence, not a heading
MAX_DEFINITION_WORDS = 40  # define answers longer than this are not short answers: skipped
CLOZE_WORDS = (6, 40)  # cloze sentences have this many words
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_BLANKABLE = re.compile(r"[^\W\d_]{4,}")  # a word of at least 4 letters
BLANK = "____"
# Function words never blanked (a cloze answer should be content, not grammar).
_STOPWORDS = frozenset(
    "about above after again also among another because been before being below between both could does doing down during "
    "each either every from further have having here into itself just many more most much must neither none only other "
    "over same should since some such than that their them themselves then there these they this those through under "
    "until upon very were what when where which while whom whose will with within without would your".split()
)


def _description_key(value: Any) -> str | None:
    if value is None or pd.isna(value):
        return None
    key = " ".join(str(value).split()).casefold()
    return key or None


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def heldout_split(doc_id: str) -> str:
    """Held-out documents are halved, stably by id, into a `dev` half (sweeps) and a `test` half."""
    return "dev" if hashlib.sha1(doc_id.encode("utf-8")).digest()[0] % 2 == 0 else "test"


def heading_body(title: str, text: str) -> str | None:
    """The text under `title` when the title is a heading distinct from the text's start: the text
    after a first line equal to the title (a .txt/.md file's first line), or the whole text when it
    does not begin with the title (an HTML <title>, a JSONL title). None when the title is just the
    start of the first sentence (Wikipedia: "Albert Einstein was ...") or nothing follows it."""
    title_key = " ".join(str(title).split()).casefold()
    if not title_key or len(title_key.split()) > MAX_TITLE_WORDS:
        return None
    first, _, rest = str(text).partition("\n")
    if " ".join(first.split()).casefold() == title_key:
        body = rest.strip()
        return body or None
    if " ".join(str(text).split()).casefold().startswith(title_key):
        return None
    return str(text).strip() or None


def sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in _SENTENCE_END.split(text) if s.strip()]


# ------------------------------------------------------------------------------------------------
# Near-duplicate leakage
# ------------------------------------------------------------------------------------------------


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams of `text` (casefolded); a text shorter than n words is one shingle."""
    words = _words(text)
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _shingle_text(title: str, text: str) -> str:
    """What is compared: the body under a heading title (the same body under another headword is a
    duplicate), else the whole text."""
    return heading_body(title, text) or str(text)


def near_duplicates(candidates: pd.DataFrame, reference: pd.DataFrame, n: int, overlap: float) -> pd.DataFrame:
    """Documents of `candidates` of which at least `overlap` of the word n-grams occur in one single
    document of `reference`: columns doc_id, duplicate_of (that reference document; the smallest
    doc_id among equals), overlap (the fraction), sorted by doc_id. Exact set containment over an
    inverted index of the candidates' n-grams (one pass over `reference`)."""
    own: dict[str, set[str]] = {}
    owners: dict[str, list[str]] = {}
    for doc_id, title, text in zip(candidates["doc_id"], candidates["title"], candidates["text"], strict=True):
        grams = shingles(_shingle_text(title, text), n)
        if grams:
            own[doc_id] = grams
            for gram in grams:
                owners.setdefault(gram, []).append(doc_id)
    best: dict[str, tuple[int, str]] = {}
    ordered = reference.sort_values("doc_id", kind="stable")
    for ref_id, title, text in zip(ordered["doc_id"], ordered["title"], ordered["text"], strict=True):
        shared = Counter(owner for gram in shingles(_shingle_text(title, text), n) & owners.keys() for owner in owners[gram])
        for doc_id, count in shared.items():
            if doc_id != ref_id and count > best.get(doc_id, (0, ""))[0]:
                best[doc_id] = (count, ref_id)
    rows = [
        (doc_id, twin, round(count / len(own[doc_id]), 4))
        for doc_id, (count, twin) in sorted(best.items())
        if count / len(own[doc_id]) >= overlap
    ]
    return pd.DataFrame(rows, columns=["doc_id", "duplicate_of", "overlap"])


# ------------------------------------------------------------------------------------------------
# The split
# ------------------------------------------------------------------------------------------------


@dataclass
class Benchmark:
    heldout: pd.DataFrame  # corpus columns, sorted by doc_id
    questions: pd.DataFrame  # QUESTION_COLUMNS, sorted by qid
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {built, reason}
    near_duplicates: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["doc_id", "duplicate_of", "overlap"]))


def _assign_splits(keys: list[str], cfg: BenchmarkConfig, rng: np.random.Generator) -> dict[str, str]:
    """A seeded permutation of `keys` (sorted first), cut by the configured fractions."""
    keys = sorted(keys)
    m = len(keys)
    order = rng.permutation(m)
    n_train = int(round(cfg.train_fraction * m))
    n_dev = min(int(round(cfg.dev_fraction * m)), m - n_train)
    return {keys[j]: "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test" for rank, j in enumerate(order)}


def _wanted_tasks(cfg: BenchmarkConfig, has_descriptions: bool, has_user_questions: bool) -> tuple[list[str], dict[str, str]]:
    """Tasks to try and, for those not tried, why."""
    if cfg.tasks != "auto":
        listed = list(dict.fromkeys(cfg.tasks))
        return listed, {t: "not listed in benchmark.tasks" for t in TASKS if t not in listed}
    wanted = (["describe", "identify"] if has_descriptions else []) + (["qa"] if has_user_questions else [])
    if not wanted:
        wanted = ["define", "cloze"]
    why: dict[str, str] = {}
    for task in TASKS:
        if task in wanted:
            continue
        if task in ("describe", "identify"):
            why[task] = "no document has a description (only the packaged Wikipedia corpus has them)"
        elif task == "qa":
            why[task] = "no questions file (benchmark.questions)"
        else:
            why[task] = "auto builds derived tasks only without built-in or user questions; list it in benchmark.tasks"
    return wanted, why


def build_benchmark(
    corpus: pd.DataFrame, cfg: BenchmarkConfig, seed: int, user_questions: pd.DataFrame | None = None
) -> Benchmark:
    """Held-out documents and every wanted QA task. Same corpus, questions and seed -> identical tables.

    `user_questions` (from `ragops.data.questions.read_user_questions`): qid, question, answer,
    answers, gold_doc_id (may be None); required when `qa` is wanted."""
    if corpus.empty:
        raise RagopsError("cannot build a benchmark from an empty corpus")
    if not corpus["doc_id"].is_unique:
        raise RagopsError("cannot build a benchmark: corpus doc_id values are not unique")
    corpus = corpus.sort_values("doc_id", kind="stable").reset_index(drop=True)
    n = len(corpus)
    rng = np.random.default_rng(seed)
    has_user = user_questions is not None and len(user_questions) > 0
    protected = set(user_questions["gold_doc_id"].dropna()) if has_user else set()

    n_heldout = int(round(cfg.heldout_fraction * n))
    if n >= 2:
        n_heldout = min(max(n_heldout, 1), n - 1)  # at least one held out, at least one indexed
    permutation = rng.permutation(n)
    if protected:  # the gold documents of the user's questions must stay retrievable
        permutation = np.array([i for i in permutation if corpus.at[int(i), "doc_id"] not in protected], dtype=np.int64)
        n_heldout = min(n_heldout, len(permutation))
    is_heldout = np.zeros(n, dtype=bool)
    is_heldout[np.sort(permutation[:n_heldout])] = True

    duplicates = pd.DataFrame(columns=["doc_id", "duplicate_of", "overlap"])
    if cfg.near_duplicate_overlap is not None and is_heldout.any():
        duplicates = near_duplicates(corpus[is_heldout], corpus[~is_heldout], cfg.near_duplicate_ngram, cfg.near_duplicate_overlap)
        is_heldout &= ~corpus["doc_id"].isin(set(duplicates["doc_id"])).to_numpy()
    heldout = corpus[is_heldout].reset_index(drop=True)

    keys = [_description_key(v) for v in corpus["description"]]
    has_descriptions = any(k is not None for i, k in enumerate(keys) if not is_heldout[i])
    wanted, tasks = _wanted_tasks(cfg, has_descriptions, has_user)
    status: dict[str, dict[str, Any]] = {t: {"built": False, "reason": why} for t, why in tasks.items()}
    rows: list[tuple] = []

    def built(task: str, new_rows: list[tuple], reason: str, missing: str) -> None:
        status[task] = {"built": bool(new_rows), "reason": reason if new_rows else missing}
        rows.extend(new_rows)

    # describe / identify (the rng draws below are unchanged from the original split: same questions).
    key_counts = pd.Series([k for k in keys if k is not None], dtype=object).value_counts().to_dict()
    eligible = [i for i in range(n) if not is_heldout[i] and keys[i] is not None]
    m = len(eligible)
    order = rng.permutation(m)
    n_train = int(round(cfg.train_fraction * m))
    n_dev = min(int(round(cfg.dev_fraction * m)), m - n_train)
    split_of: dict[int, str] = {}
    for rank, j in enumerate(order):
        split_of[eligible[j]] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"
    if "describe" in wanted or "identify" in wanted:
        describe, identify = [], []
        for i in eligible:
            doc_id, title = corpus.at[i, "doc_id"], corpus.at[i, "title"]
            description = " ".join(str(corpus.at[i, "description"]).split())
            describe.append(("describe:" + doc_id, "describe", split_of[i], f"What is {title}?", description, doc_id, [description]))
            if key_counts.get(keys[i]) == 1:
                question = f'Which subject is described as "{description}"?'
                identify.append(("identify:" + doc_id, "identify", split_of[i], question, title, doc_id, [title]))
        if "describe" in wanted:
            built("describe", describe, f"{len(eligible):,} indexed documents have a description",
                  "no indexed document has a description (only the packaged Wikipedia corpus has them)")
        if "identify" in wanted:
            built("identify", identify, "indexed documents whose description is unique in the corpus",
                  "no indexed document has a description unique in the corpus")

    if "qa" in wanted:
        if not has_user:
            status["qa"] = {"built": False, "reason": "no questions file (benchmark.questions)" if user_questions is None
                            else "the questions file has no valid question"}
        else:
            group = [g if isinstance(g, str) else q for g, q in zip(user_questions["gold_doc_id"], user_questions["qid"], strict=True)]
            split_by_group = _assign_splits(sorted(set(group)), cfg, np.random.default_rng([seed, 2]))
            qa = [
                (q.qid, "qa", split_by_group[g], q.question, q.answer, q.gold_doc_id if isinstance(q.gold_doc_id, str) else None, list(q.answers))
                for q, g in zip(user_questions.itertuples(index=False), group, strict=True)
            ]
            built("qa", qa, f"{len(qa):,} valid questions from benchmark.questions, split by gold document", "")

    if "define" in wanted:
        define, too_long = [], 0
        candidates = {}
        for i in range(n):
            if is_heldout[i]:
                continue
            body = heading_body(corpus.at[i, "title"], corpus.at[i, "text"])
            first = sentences(body)[0] if body else ""
            if len(first.split()) < 3:
                continue
            if len(first.split()) > MAX_DEFINITION_WORDS:
                too_long += 1
                continue
            candidates[corpus.at[i, "doc_id"]] = (corpus.at[i, "title"], first)
        split_by_doc = _assign_splits(list(candidates), cfg, np.random.default_rng([seed, 1]))
        for doc_id, (title, first) in candidates.items():
            define.append(("define:" + doc_id, "define", split_by_doc[doc_id], f"What is {title}?", first, doc_id, [first]))
        built("define", define,
              f"{len(define):,} indexed documents have a heading title and a first sentence of 3-{MAX_DEFINITION_WORDS} words"
              + (f" ({too_long:,} longer ones skipped)" if too_long else ""),
              "no indexed document has a title distinct from its text's start followed by a short first sentence")

    if "cloze" in wanted:
        cloze = _cloze_questions(heldout, cfg.cloze_per_doc, seed)
        built("cloze", cloze,
              f"{len(cloze):,} sentences of {CLOZE_WORDS[0]}-{CLOZE_WORDS[1]} words from held-out documents, one content word blanked",
              "no held-out document has a sentence of "
              f"{CLOZE_WORDS[0]}-{CLOZE_WORDS[1]} words with a content word to blank")

    questions = pd.DataFrame(rows, columns=QUESTION_COLUMNS).sort_values("qid", kind="stable").reset_index(drop=True)
    ordered_status = {t: status[t] for t in TASKS if t in status}
    return Benchmark(heldout, questions, ordered_status, duplicates)


def _cloze_questions(heldout: pd.DataFrame, per_doc: int, seed: int) -> list[tuple]:
    rows = []
    for doc_id, title, text in zip(heldout["doc_id"], heldout["title"], heldout["text"], strict=True):
        rng = np.random.default_rng([seed, 3, int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:4], "big")])
        body = heading_body(title, text) or str(text)
        title_words = set(_words(str(title)))
        usable = []
        for sentence in sentences(body):
            if not CLOZE_WORDS[0] <= len(sentence.split()) <= CLOZE_WORDS[1]:
                continue
            blanks = [m for m in _BLANKABLE.finditer(sentence)
                      if m.group().casefold() not in _STOPWORDS and m.group().casefold() not in title_words]
            if blanks:
                usable.append((sentence, blanks))
        if not usable:
            continue
        picked = np.sort(rng.permutation(len(usable))[:per_doc])
        for k in picked:
            sentence, blanks = usable[int(k)]
            word = blanks[int(rng.integers(len(blanks)))]
            masked = sentence[: word.start()] + BLANK + sentence[word.end() :]
            question = f'Fill in the blank ({BLANK}) with one word, in this sentence about {title}: "{masked}"'
            rows.append((f"cloze:{doc_id}:{int(k)}", "cloze", heldout_split(doc_id), question, word.group(), None, [word.group()]))
    return rows


def split_benchmark(
    corpus: pd.DataFrame, cfg: BenchmarkConfig, seed: int, user_questions: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(heldout, questions) of `build_benchmark`."""
    benchmark = build_benchmark(corpus, cfg, seed, user_questions)
    return benchmark.heldout, benchmark.questions


def benchmark_summary(
    corpus: pd.DataFrame, heldout: pd.DataFrame, questions: pd.DataFrame, benchmark: Benchmark | None = None
) -> dict[str, Any]:
    """split.json and MLflow: documents held out / indexed, questions per task and split, which tasks
    were built and why, and the held-out documents not evaluated because a near-duplicate is indexed."""
    counts = questions.groupby(["task", "split"]).size()
    tasks = sorted(set(questions["task"]), key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS))
    summary: dict[str, Any] = {
        "articles": int(len(corpus)),
        "heldout": int(len(heldout)),
        "indexed": int(len(corpus) - len(heldout)),
        "questions": {
            task: {split: int(counts.get((task, split), 0)) for split in SPLITS} for task in (tasks or TASKS)
        },
    }
    if benchmark is not None:
        summary["tasks"] = benchmark.tasks
        dups = benchmark.near_duplicates
        summary["near_duplicates"] = {
            "excluded": int(len(dups)),
            "rule": "held-out documents whose word n-grams occur in one indexed document (see benchmark.near_duplicate_*): "
                    "not evaluated, indexed instead",
            "examples": dups.head(20).to_dict(orient="records"),
        }
    return summary


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
