"""A user's own corpus is evaluable: their questions file (the `qa` task), tasks derived from any
corpus (`define`, `cloze`), near-duplicate leakage kept out of the held-out evaluation, and an end-to-end
run on tests/fixtures/dictionary (61 term/definition files, two of which share a body) with
closed book and In-Context RALM on the tiny LM."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ragops.config import BenchmarkConfig, IngestConfig
from ragops.data.benchmark import BLANK, build_benchmark, heldout_split, near_duplicates
from ragops.data.ingest import load_corpus
from ragops.data.questions import read_user_questions
from ragops.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
DICTIONARY = FIXTURES / "dictionary"
QA_FILE = FIXTURES / "dictionary-qa.jsonl"
TWINS = ("file:spooler.txt", "file:spooling.txt")  # the same definition under two headwords


@pytest.fixture(scope="module")
def dictionary() -> pd.DataFrame:
    corpus, report = load_corpus(str(DICTIONARY), IngestConfig())
    assert report["skipped"] == [] and report["duplicates_dropped"] == 0  # the twins differ by their first line
    return corpus


def _body(text: str) -> str:
    return text.split("\n", 1)[1]


# ------------------------------------------------------------------------------------------------
# The user's questions file
# ------------------------------------------------------------------------------------------------


def test_questions_file_keeps_good_lines_and_reports_each_bad_one_by_line(dictionary, tmp_path):
    lines = [
        '{"question": "How many bits make one byte?", "answers": ["eight", "8"], "title": "byte"}',  # 1: title, any case
        "",  # 2: blank, ignored
        '{"question": "What is a bug?", "answer": "an error"',  # 3: bad JSON
        '{"question": "What does a linker combine?"}',  # 4: no answer
        '{"question": "What is ASCII?", "answer": "an encoding", "doc_id": "file:nope.txt"}',  # 5: unknown doc
        '{"question": "  what does a linker   combine? ", "answer": "object files", "doc_id": "file:linker.txt"}',  # 6: good
        '{"question": "What does a linker combine?", "answer": "files"}',  # 7: the same question as line 6
        '["a", "list"]',  # 8: not an object
        '{"question": "What is a stack?", "answers": []}',  # 9: empty answers
        '{"question": "Who adopted spreadsheets early?", "answer": "accountants"}',  # 10: good, no gold document
        '{"question": "What is it?", "answer": "x", "title": "Nothing Of That Name"}',  # 11: unknown title
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    questions, skipped = read_user_questions(path, dictionary, label="qa.jsonl")
    assert questions["line"].tolist() == [1, 6, 10]
    assert questions["answers"].tolist() == [["eight", "8"], ["object files"], ["accountants"]]
    assert questions["answer"].tolist() == ["eight", "object files", "accountants"]
    assert questions["gold_doc_id"].tolist() == ["file:byte.txt", "file:linker.txt", None]
    assert questions["question"].iloc[1] == "what does a linker combine?"  # whitespace normalised
    assert questions["qid"].is_unique and all(q.startswith("qa:") for q in questions["qid"])
    assert [(s["path"], s["line"]) for s in skipped] == [("qa.jsonl", n) for n in (3, 4, 5, 7, 8, 9, 11)]
    reasons = [s["reason"] for s in skipped]
    assert reasons[0].startswith("invalid JSON") and "no 'answer' or 'answers'" == reasons[1]
    assert "file:nope.txt" in reasons[2] and reasons[3] == "the same question as line 6"
    assert "expected a JSON object" in reasons[4] and "'answers'" in reasons[5] and "Nothing Of That Name" in reasons[6]
    assert all("\n" not in r for r in reasons)
    # qids do not depend on the line order
    path.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    again, _ = read_user_questions(path, dictionary)
    assert set(again["qid"]) == set(questions["qid"])


def test_questions_file_without_a_valid_line_is_one_error(dictionary, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^qa.jsonl: no valid question \(2 lines skipped; the first: line 1: no 'answer'"):
        read_user_questions(path, dictionary, label="qa.jsonl")


def test_questions_gate_rejects_duplicate_qids():
    from ragops.data.validate import validate_questions

    table = pd.DataFrame({"qid": ["qa:1", "qa:1"], "question": ["a?", "b?"], "answer": ["x", "y"], "answers": [["x"], ["y"]]})
    report = validate_questions(table)
    assert not report.success and "expect_column_values_to_be_unique(qid) on 2 rows" in report.summary


def test_user_questions_split_by_gold_document_reproducibly_and_never_held_out(dictionary):
    questions, _ = read_user_questions(QA_FILE, dictionary)
    cfg = BenchmarkConfig(heldout_fraction=0.3, train_fraction=0.6, dev_fraction=0.2, near_duplicate_overlap=None)
    bench = build_benchmark(dictionary, cfg, 13, questions)
    assert list(bench.tasks) == ["describe", "identify", "define", "cloze", "qa"]
    assert [t for t, s in bench.tasks.items() if s["built"]] == ["qa"]  # auto: the user's questions only
    qa = bench.questions
    assert set(qa["task"]) == {"qa"} and len(qa) == len(questions) == 32
    # gold documents of the user's questions stay retrievable
    assert not set(qa["gold_doc_id"].dropna()) & set(bench.heldout["doc_id"])
    assert len(bench.heldout) == round(0.3 * len(dictionary))
    # questions about one document share a split (ASCII has two)
    ascii_splits = qa.loc[qa["gold_doc_id"] == "file:ascii.txt", "split"]
    assert len(ascii_splits) == 2 and ascii_splits.nunique() == 1
    # documents, not questions, are cut by the fractions: 32 questions on 30 gold documents + 2 without one
    groups = qa["gold_doc_id"].fillna(qa["qid"])
    per_group = qa.groupby(groups)["split"].first().value_counts()
    assert (per_group["train"], per_group["dev"], per_group["test"]) == (19, 6, 6)  # round(.6 * 31), round(.2 * 31), rest
    pd.testing.assert_frame_equal(qa, build_benchmark(dictionary.sample(frac=1, random_state=1), cfg, 13, questions).questions)
    assert build_benchmark(dictionary, cfg, 14, questions).questions["split"].tolist() != qa["split"].tolist()


# ------------------------------------------------------------------------------------------------
# Derived tasks
# ------------------------------------------------------------------------------------------------


def test_define_and_cloze_from_a_dictionary(dictionary):
    cfg = BenchmarkConfig(heldout_fraction=0.2, near_duplicate_overlap=None)
    bench = build_benchmark(dictionary, cfg, 13)
    assert [t for t, s in bench.tasks.items() if s["built"]] == ["define", "cloze"]
    assert "description" in bench.tasks["describe"]["reason"] and "questions file" in bench.tasks["qa"]["reason"]
    articles = dictionary.set_index("doc_id")
    heldout = set(bench.heldout["doc_id"])
    define = bench.questions[bench.questions["task"] == "define"]
    # every indexed entry: "What is {term}?" -> the first sentence of its definition (cut by hand here)
    assert set(define["gold_doc_id"]) == set(articles.index) - heldout
    for row in define.itertuples():
        title, text = articles.at[row.gold_doc_id, "title"], articles.at[row.gold_doc_id, "text"]
        assert row.question == f"What is {title}?"
        body = _body(text)
        assert row.answer == body[: body.index(". ") + 1] and list(row.answers) == [row.answer]
    assert articles.at["file:binary-search.txt", "text"].startswith("Binary search\n")
    assert define.set_index("gold_doc_id").at["file:binary-search.txt", "answer"] == (
        "A search method that halves a sorted list at every step until the wanted item is found."
    )
    # cloze: a held-out sentence with one word blanked; putting the answer back gives the sentence
    cloze = bench.questions[bench.questions["task"] == "cloze"]
    assert len(cloze) > 0 and cloze["gold_doc_id"].isna().all()
    for row in cloze.itertuples():
        doc_id = row.qid.split(":", 1)[1].rsplit(":", 1)[0]
        assert doc_id in heldout and row.split == heldout_split(doc_id) and row.split in ("dev", "test")
        masked = re.search(r': "(.*)"$', row.question).group(1)
        assert masked.count(BLANK) == 1 and masked.replace(BLANK, row.answer) in articles.at[doc_id, "text"]
        assert row.answer.isalpha() and len(row.answer) >= 4
    assert cloze.groupby(cloze["qid"].str.rsplit(":", n=1).str[0]).size().max() <= cfg.cloze_per_doc
    # reproducible
    pd.testing.assert_frame_equal(bench.questions, build_benchmark(dictionary, cfg, 13).questions)


def test_a_task_that_cannot_be_built_is_skipped_with_its_reason():
    from data_fixtures import tiny_corpus

    corpus = tiny_corpus(30)  # titles start the text ("Subject 3 is a thing."): no headings
    corpus["description"] = None
    bench = build_benchmark(corpus, BenchmarkConfig(heldout_fraction=0.2, tasks=["define", "identify", "cloze"]), 13)
    assert not bench.tasks["define"]["built"] and "title distinct from its text" in bench.tasks["define"]["reason"]
    assert not bench.tasks["identify"]["built"] and "description" in bench.tasks["identify"]["reason"]
    assert bench.tasks["qa"] == {"built": False, "reason": "not listed in benchmark.tasks"}
    assert bench.tasks["cloze"]["built"] and set(bench.questions["task"]) == {"cloze"}


# ------------------------------------------------------------------------------------------------
# Near-duplicate leakage
# ------------------------------------------------------------------------------------------------


def test_near_duplicates_by_ngram_containment():
    body = "one two three four five six seven eight nine ten"  # 10 words: 3 word 8-grams
    candidates = pd.DataFrame({
        "doc_id": ["h:copy", "h:half", "h:other"],
        "title": ["Copy", "Half", "Other"],
        "text": [f"Copy\n{body}", "Half\none two three four five six seven eight x y", "Other\nsomething else entirely here"],
    })
    reference = pd.DataFrame({"doc_id": ["i:a", "i:b"], "title": ["A", "B"], "text": [f"A\n{body}", f"B\nzero {body}"]})
    found = near_duplicates(candidates, reference, n=8, overlap=0.5)
    # h:copy: all 3 of its 8-grams in i:a (and in i:b; the smaller id is named); h:half: 1 of 3 (< 0.5)
    assert found.to_dict(orient="records") == [{"doc_id": "h:copy", "duplicate_of": "i:a", "overlap": 1.0}]
    low = near_duplicates(candidates, reference, n=8, overlap=0.3)
    assert low.set_index("doc_id")["overlap"].to_dict() == {"h:copy": 1.0, "h:half": round(1 / 3, 4)}


def test_a_heldout_entry_whose_body_is_indexed_under_another_headword_is_not_evaluated(dictionary):
    cfg = BenchmarkConfig(heldout_fraction=0.2, tasks=["define", "cloze"])
    unfiltered_cfg = cfg.model_copy(update={"near_duplicate_overlap": None})
    # the first seed whose random hold-out takes exactly one of the twins
    seed = next(s for s in range(100) if len(set(TWINS) & set(build_benchmark(dictionary, unfiltered_cfg, s).heldout["doc_id"])) == 1)
    unfiltered, filtered = build_benchmark(dictionary, unfiltered_cfg, seed), build_benchmark(dictionary, cfg, seed)
    # Independent expectation: held-out entries whose body (the text after the headword) is the body of an indexed entry.
    bodies = dictionary.set_index("doc_id")["text"].map(_body)
    held = set(unfiltered.heldout["doc_id"])
    expected = {d for d in held if any(bodies[o] == bodies[d] for o in set(bodies.index) - held)}
    assert len(expected) == 1 and expected < set(TWINS)
    (twin,) = expected
    (other,) = set(TWINS) - expected
    assert filtered.near_duplicates.to_dict(orient="records") == [{"doc_id": twin, "duplicate_of": other, "overlap": 1.0}]
    assert set(filtered.heldout["doc_id"]) == held - expected  # not evaluated (lm, cloze): it is indexed instead
    assert not filtered.questions["qid"].str.startswith(f"cloze:{twin}:").any()
    assert unfiltered.questions["qid"].str.startswith(f"cloze:{twin}:").any()
    assert f"define:{twin}" in set(filtered.questions["qid"])


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_user_corpus_end_to_end(tiny_lm_dir, migrated_mlflow_db, tmp_path, monkeypatch, caplog):
    from conftest import write_params

    from ragops import stages
    from ragops.evaluation.data import eval_tasks
    from ragops.io import read_json
    from ragops.params import load_config
    from ragops.paths import Workspace
    from ragops.training.data import train_questions
    from ragops.training.retriever import retrieval_examples

    root = tmp_path / "ws"
    (root / "mlruns").mkdir(parents=True)
    shutil.copy(migrated_mlflow_db, root / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    shutil.copytree(DICTIONARY, root / "corpus")
    qa_lines = QA_FILE.read_text(encoding="utf-8").splitlines()
    qa_lines.insert(3, '{"question": "broken"')  # line 4: reported, the rest kept
    (root / "qa.jsonl").write_text("\n".join(qa_lines) + "\n", encoding="utf-8")
    write_params(
        root, lm={"model": str(tiny_lm_dir)}, ingest={"source": "corpus"},
        benchmark={"heldout_fraction": 0.2, "questions": "qa.jsonl", "tasks": ["define", "cloze", "qa"]},
        eval={"split": "test"},
    )
    ws = Workspace(root)
    config = load_config(ws.params)
    stages.ingest(ws, config)
    for name in stages.STAGE_ORDER[1:]:
        stages.DATA_STAGES[name](ws, config, **({"progress": False} if name in ("embed", "eval_retrieval") else {}))

    summary = read_json(ws.benchmark_dir / "split.json")
    assert summary["articles"] == 61 and summary["heldout"] + summary["indexed"] == 61
    assert {t for t, s in summary["tasks"].items() if s["built"]} == {"define", "cloze", "qa"}
    assert summary["tasks"]["describe"] == {"built": False, "reason": "not listed in benchmark.tasks"}
    assert summary["user_questions"]["valid"] == 32 and summary["user_questions"]["skipped"] == 1
    assert summary["user_questions"]["skipped_lines"][0]["line"] == 4
    assert any("qa.jsonl:4: invalid JSON" in r.getMessage() for r in caplog.records)
    # nothing held out is indexed, and no held-out near-duplicate is evaluated (the twins' case)
    chunks = pd.read_parquet(ws.chunks, columns=["doc_id"])
    heldout = pd.read_parquet(ws.heldout)
    assert not set(heldout["doc_id"]) & set(chunks["doc_id"])
    assert not (set(TWINS) & set(heldout["doc_id"]) and set(TWINS) & set(chunks["doc_id"]))
    # trained methods see train questions of every task the split built, never dev/test ones
    train = train_questions(ws, None, config.seed)
    assert set(train["task"]) == {"define", "qa"} and (train["split"] == "train").all()
    examples = sum(retrieval_examples(ws, qa_per_task=100, lm_windows=0, encode=None, decode=None, prefix_tokens=8,
                                      target_tokens=8, seed=config.seed, dev_fraction=0.1), [])
    assert len(examples) == len(train)
    assert sum(e.gold_doc_id is None for e in examples) == int(train["gold_doc_id"].isna().sum())
    assert "None" not in {e.gold_doc_id for e in examples}
    # retrieval evaluation only counts questions that have a gold document (no cloze)
    retrieval = read_json(ws.metrics_file("retrieval"))
    assert "test/bm25/define/recall_at_1" in retrieval and not any("/cloze/" in k for k in retrieval)

    # eval.tasks adapts: auto = what the split built + lm; a listed task the split did not build is skipped
    assert eval_tasks(ws, config.eval) == ["define", "cloze", "qa", "lm"]
    listed = config.eval.model_copy(update={"tasks": ["describe", "qa"]})
    caplog.clear()
    assert eval_tasks(ws, listed) == ["qa"]
    assert any("task describe skipped" in r.getMessage() for r in caplog.records)

    questions = pd.read_parquet(ws.questions)
    for name in ("closed_book", "incontext_ralm"):
        stages.train_architecture(ws, config, name, progress=False)
        stages.evaluate_architecture(ws, config, name, progress=False)
        metrics = read_json(ws.metrics_file(name))
        for task in ("define", "cloze", "qa"):
            for key in ("f1", "em", "gold_nll"):
                assert f"{task}/{key}" in metrics and f"{task}/{key}_ci_low" in metrics
        assert "lm/token_ppl" in metrics and "cloze/retrieval_recall" not in metrics
        predictions = pd.read_parquet(ws.eval_dir(name) / "predictions.parquet")
        qa = predictions[predictions["task"] == "qa"].merge(questions, on="qid", suffixes=("", "_q"))
        assert len(qa) == min(config.eval.max_questions, int(((questions["task"] == "qa") & (questions["split"] == "test")).sum()))
        assert (qa["split"] == "test").all()
        # EM/F1 take the best of the accepted answers (recomputed here by hand from the rows)
        for row in qa.itertuples():
            assert row.em == float(any(_norm(row.prediction) == _norm(a) for a in row.answers))
    ralm = pd.read_parquet(ws.eval_dir("incontext_ralm") / "predictions.parquet")
    assert ralm.loc[ralm["task"] == "define", "shown_doc_ids"].map(len).gt(0).all()
    assert json.loads(json.dumps(read_json(ws.metrics_file("incontext_ralm"))))  # plain JSON (no NaN recall)


def _norm(text: str) -> str:
    text = re.sub(r"\b(a|an|the)\b", " ", "".join(c for c in text.lower() if c.isalnum() or c.isspace()))
    return " ".join(text.split())


def test_nothing_to_evaluate_is_one_line(tmp_path, caplog):
    from ragops.config import EvalConfig
    from ragops.data.benchmark import QUESTION_COLUMNS
    from ragops.evaluation.data import eval_tasks
    from ragops.paths import Workspace

    ws = Workspace(tmp_path)
    ws.benchmark_dir.mkdir(parents=True)
    pd.DataFrame(columns=QUESTION_COLUMNS).to_parquet(ws.questions)  # a split that built no question
    dev_only = next(f"doc:{i}" for i in range(100) if heldout_split(f"doc:{i}") == "dev")
    pd.DataFrame({"doc_id": [dev_only], "title": ["T"], "text": ["x"]}).to_parquet(ws.heldout)
    with pytest.raises(DataError, match=r"nothing to evaluate: none of the tasks lm has questions or held-out documents in split 'test'"):
        eval_tasks(ws, EvalConfig())
    assert any("task lm skipped: no held-out document in the 'test' half" in r.getMessage() for r in caplog.records)
    assert eval_tasks(ws, EvalConfig(split="dev")) == ["lm"]
