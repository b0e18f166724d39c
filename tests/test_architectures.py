"""Closed book and In-Context RALM end to end on the tiny LM, a real BM25 index over real passages.

The workspace holds ~30 real Wikipedia summaries (one chunk each), 4 held-out articles and QA
questions built the way ragops.data.benchmark builds them. Nothing is mocked: the retriever is
ragops' BM25Retriever; where a test needs to see the retriever's queries it wraps it in a
recorder that forwards every call.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ragops.architectures.base import ArchitectureContext
from ragops.architectures.closed_book import ClosedBook
from ragops.architectures.incontext_ralm import InContextRALM, InContextRALMOptions
from ragops.architectures.shared import RefreshSchedule, RetrievalCache, kl_distill
from ragops.retrieval.types import Passage
from ragops.params import resolve
from ragops.cost import CostMeter
from ragops.errors import RagopsError
from ragops.evaluation import run_architecture
from ragops.architectures.prompts import document_text
from ragops.evaluation.harness import PREDICTION_COLUMNS, metric_keys
from ragops.lm import CausalLM
from ragops.paths import Workspace
from ragops.resources import default_corpus_file

INDEXED = [
    "Leonardo da Vinci", "Paris", "Eiffel Tower", "2001: A Space Odyssey", "Stanley Kubrick", "Arthur C. Clarke",
    "Albert Einstein", "General relativity", "Mount Everest", "Nepal", "Photosynthesis", "Chlorophyll",
    "Amazon River", "Brazil", "Pacific Ocean", "Moon", "Neil Armstrong", "William Shakespeare", "Hamlet",
    "Ludwig van Beethoven", "Great Wall of China", "Roman Empire", "Charles Darwin", "DNA", "Marie Curie",
    "Penicillin", "Alexander Fleming",
]
HELDOUT = ["Apollo 11", "Isaac Newton", "Mona Lisa", "Himalayas"]  # test, test, dev, dev halves
QUESTION_DOCS = ["2001: A Space Odyssey", "Mount Everest", "Photosynthesis", "Charles Darwin", "Eiffel Tower"]


def doc_id(title: str) -> str:
    return "wiki:" + hashlib.sha1(title.encode()).hexdigest()[:16]


def build_workspace(root, heldout_titles=HELDOUT, indexed_titles=INDEXED) -> Workspace:
    corpus = json.loads(default_corpus_file().read_text())
    ws = Workspace(root)
    ws.benchmark_dir.mkdir(parents=True, exist_ok=True)
    ws.chunks_dir.mkdir(parents=True, exist_ok=True)

    def row(title):
        entry = corpus[title]
        return {"doc_id": doc_id(title), "title": title, "text": entry["extract"], "source": "wiki-summaries",
                "description": entry["description"], "topic": entry["topic"]}

    pd.DataFrame([row(t) for t in heldout_titles]).to_parquet(ws.heldout, index=False)
    chunks = pd.DataFrame(
        [{**{k: v for k, v in row(t).items() if k in ("doc_id", "title", "text")}, "chunk_id": f"{doc_id(t)}#0000",
          "position": 0, "n_tokens": len(corpus[t]["extract"].split())} for t in indexed_titles]
    )[["chunk_id", "doc_id", "position", "title", "text", "n_tokens"]]
    chunks.to_parquet(ws.chunks, index=False)
    questions = []
    for title in QUESTION_DOCS:
        description = corpus[title]["description"]
        questions.append((f"describe:{doc_id(title)}", "describe", "test", f"What is {title}?", description, doc_id(title)))
        questions.append((f"identify:{doc_id(title)}", "identify", "test", f'Which subject is described as "{description}"?', title, doc_id(title)))
    pd.DataFrame(questions, columns=["qid", "task", "split", "question", "answer", "gold_doc_id"]).to_parquet(ws.questions, index=False)
    return ws


def bm25_over(ws: Workspace):
    from ragops.retrieval.index import build_bm25
    from ragops.retrieval.retriever import BM25Retriever

    chunks = pd.read_parquet(ws.chunks)
    return BM25Retriever(build_bm25([f"{t}\n{x}" for t, x in zip(chunks["title"], chunks["text"], strict=True)]), chunks)


class Recorder:
    """Forwards every search to a real retriever and keeps the queries and exclusions it was given."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.calls: list[tuple[list[str], int, list[set[str]] | None]] = []

    def search(self, queries, k, exclude_doc_ids=None):
        self.calls.append((list(queries), k, exclude_doc_ids))
        return self.inner.search(queries, k, exclude_doc_ids)

    @property
    def queries(self) -> list[str]:
        return [q for call in self.calls for q in call[0]]


def make_config(**ralm):
    return resolve(
        {
            "eval": {"tasks": ["describe", "identify", "lm"], "split": "test", "max_questions": 3, "max_lm_docs": 2,
                     "max_new_tokens": 6, "bootstrap_samples": 50},
            "architectures": {"closed_book": {}, "incontext_ralm": {"k": 2, "stride": 8, "query_length": 8, "retrieved_max_length": 128, **ralm}},
            "sweep": {"strides": [8, 16], "query_lengths": [8], "max_docs": 1},
        }
    )


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir) -> CausalLM:
    return CausalLM.load(tiny_lm_dir, device="cpu", max_length=512, batch_tokens=2048)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("ralm-ws"))


@pytest.fixture(scope="module")
def bm25(ws):
    return bm25_over(ws)


def ralm(ws, lm, retriever, config=None, **options) -> InContextRALM:
    config = config or make_config()
    ctx = ArchitectureContext(ws, config, ws.architecture_dir("incontext_ralm"), progress=False, lm_override=lm,
                              retrievers={"bm25": retriever})
    base = config.architectures["incontext_ralm"]
    return InContextRALM(ctx, base.model_copy(update=options))


def heldout_docs(ws, titles):
    frame = pd.read_parquet(ws.heldout)
    return frame[frame["title"].isin(titles)].reset_index(drop=True)


def test_both_architectures_report_every_metric_key(ws, tiny_lm, bm25, tmp_path, tiny_lm_dir):
    config = make_config()
    results = {}
    for name in ("closed_book", "incontext_ralm"):
        train, infer = None, CostMeter("inference")
        results[name] = (run_architecture(name, ws, config, infer_meter=infer, progress=False,
                                          lm=tiny_lm, retrievers={"bm25": bm25}), train, infer)
    expected = set(metric_keys(["describe", "identify", "lm"]))
    closed, ralm_result = results["closed_book"][0], results["incontext_ralm"][0]
    assert set(closed.metrics) == set(ralm_result.metrics) == expected
    for result, _, infer in results.values():
        for key, value in result.metrics.items():
            assert np.isfinite(value), key
            if not key.endswith(("_ci_low", "_ci_high")) and not key.startswith("inference/"):
                assert result.metrics[f"{key}_ci_low"] <= value + 1e-9 <= result.metrics[f"{key}_ci_high"] + 2e-9
        table = result.predictions
        assert list(table.columns) == PREDICTION_COLUMNS
        table.to_parquet(tmp_path / "predictions.parquet", index=False)
        back = pd.read_parquet(tmp_path / "predictions.parquet")
        assert len(back) == len(table) and list(back.columns) == PREDICTION_COLUMNS
        json.dumps(result.info, default=str)
        assert (table["task"] == "describe").sum() == 3 and (table["task"] == "identify").sum() == 3
        assert (table["task"] == "lm").sum() == 2  # the two held-out docs of the test half
        assert result.metrics["inference/describe/retrieval_rate"] == (0.0 if result is closed else 1.0)
        assert infer.counters["questions"] == 6 and infer.counters["tokens_scored"] > 0 and infer.counters["flops"] > 0
        assert infer.params_total == tiny_lm.n_params and infer.wall_s > 0
        metrics = infer.metrics()
        assert metrics["inference/tokens_prompt"] > 0
        # QA cost per 1,000 questions and lm cost per 1,000 held-out tokens, each from its own task's time
        assert metrics["inference/qa/questions"] == 6 and metrics["inference/lm/tokens"] == table.query("task == 'lm'")["n_tokens"].sum()
        assert metrics["inference/qa/wall_s_per_1k_questions"] == pytest.approx(infer.parts["qa"].wall_s / 6 * 1000)
        assert infer.parts["qa"].wall_s + infer.parts["lm"].wall_s <= infer.wall_s
        assert metrics["inference/qa/flops"] + metrics["inference/lm/flops"] == pytest.approx(metrics["inference/flops"])
    assert set(results["closed_book"][2].metrics()) == set(results["incontext_ralm"][2].metrics())  # the same cost keys
    assert "{passage}" not in closed.info["prompt"] and "{passage}" in ralm_result.info["prompt"]
    assert closed.info["conventions"]["prompt.format"] == "raw"  # the tiny LM has no chat template
    assert closed.info["conventions"]["lm.name"] == str(tiny_lm_dir) and closed.info["conventions"]["lm.quantisation"] == "none"
    closed_infer, ralm_infer = results["closed_book"][2], results["incontext_ralm"][2]
    assert closed_infer.counters["retrieval_calls"] == 0 and closed_infer.counters["tokens_retrieved"] == 0
    assert ralm_infer.counters["retrieval_calls"] > 6 and ralm_infer.counters["tokens_retrieved"] > 0
    assert closed.metrics["describe/retrieval_recall"] == 0.0
    # BM25 on "What is <title>?" finds the article: the gold document is shown to the LM
    assert ralm_result.metrics["describe/retrieval_recall"] > 0.5
    qa = ralm_result.predictions[ralm_result.predictions["task"] != "lm"]
    assert all(len(s) <= 2 for s in qa["shown_doc_ids"])
    # the same held-out tokens are scored by both (perplexities are comparable)
    lm_rows = {name: r[0].predictions.query("task == 'lm'") for name, r in results.items()}
    assert list(lm_rows["closed_book"]["n_tokens"]) == list(lm_rows["incontext_ralm"]["n_tokens"])
    # a held-out article is never retrieved for itself
    for ids, doc in zip(lm_rows["incontext_ralm"]["retrieved_doc_ids"], lm_rows["incontext_ralm"]["doc_id"], strict=True):
        assert doc not in ids


def test_strided_retrieval_queries_only_the_prefix(ws, tiny_lm, bm25):
    docs = heldout_docs(ws, ["Apollo 11"])
    recorder = Recorder(bm25)
    arch = ralm(ws, tiny_lm, recorder, stride=8, query_length=5, cache_retrieval=False)
    meter = CostMeter("inference")
    out = arch.score_documents(docs, meter)
    ids = tiny_lm.encode(document_text(docs.at[0, "title"], docs.at[0, "text"]))
    # spans start at 0, 8, 16, ...; before each but the first, the query is the 5 tokens just before it
    expected = [tiny_lm.decode(ids[begin - 5 : begin]) for begin in range(8, len(ids), 8)]
    assert len(recorder.queries) == len(expected) == out.at[0, "retrieval_calls"] == meter.counters["retrieval_calls"]
    assert recorder.queries == expected
    assert all(call[2] == [{docs.at[0, "doc_id"]}] * len(call[0]) for call in recorder.calls)
    assert out.at[0, "n_tokens"] == len(ids)  # after the start token, every token is scored


def test_merged_windows_are_exact_and_cheaper(ws, tiny_lm, bm25):
    docs = heldout_docs(ws, ["Apollo 11", "Isaac Newton"])
    merged = ralm(ws, tiny_lm, bm25, stride=4, query_length=8, cache_retrieval=False)
    plain = ralm(ws, tiny_lm, bm25, stride=4, query_length=8, cache_retrieval=False, merge_windows=False)
    m_meter, p_meter = CostMeter("inference"), CostMeter("inference")
    a = merged.score_documents(docs, m_meter)
    b = plain.score_documents(docs, p_meter)
    np.testing.assert_allclose(a["nll_sum"], b["nll_sum"], rtol=1e-4)
    assert list(a["retrieved_doc_ids"]) == list(b["retrieved_doc_ids"])
    assert (a["lm_windows"] <= b["lm_windows"]).all()
    assert m_meter.counters["flops"] <= p_meter.counters["flops"]


def test_retrieval_cache_is_reused_and_refuses_other_settings(ws, tiny_lm, bm25, tmp_path):
    docs = heldout_docs(ws, ["Apollo 11"])
    cache_file = tmp_path / "retrieval.json"
    first = Recorder(bm25)
    a = ralm(ws, tiny_lm, first, stride=8, query_length=8, retrieval_cache_file=str(cache_file)).score_documents(docs, CostMeter())
    assert first.queries and cache_file.exists()
    meta = json.loads(cache_file.read_text())["meta"]
    assert meta["stride"] == 8 and meta["query_length"] == 8
    second = Recorder(bm25)
    b = ralm(ws, tiny_lm, second, stride=8, query_length=8, retrieval_cache_file=str(cache_file)).score_documents(docs, CostMeter())
    assert second.queries == []  # served from the cache
    np.testing.assert_allclose(a["nll_sum"], b["nll_sum"], rtol=1e-5)
    for other in ({"stride": 4}, {"query_length": 16}):
        with pytest.raises(RagopsError, match=next(iter(other))):
            ralm(ws, tiny_lm, bm25, retrieval_cache_file=str(cache_file), **{"stride": 8, "query_length": 8, **other}).score_documents(docs, CostMeter())
    # the default cache location names the settings, so a sweep never collides
    arch4 = ralm(ws, tiny_lm, bm25, stride=4, query_length=8)
    arch8 = ralm(ws, tiny_lm, bm25, stride=8, query_length=8)
    assert arch4.open_cache(bm25).path != arch8.open_cache(bm25).path


def test_cache_entry_with_another_query_is_a_miss(tmp_path):
    cache = RetrievalCache(tmp_path / "c.json", {"stride": 4, "query_length": 8})
    cache.put("d|4|8", "query one", [Passage("c1", "d1", 1.5, "text one")])
    cache.save()
    reopened = RetrievalCache(tmp_path / "c.json", {"stride": 4, "query_length": 8})
    assert reopened.get("d|4|8", "query one") == [Passage("c1", "d1", 1.5, "text one")]
    assert reopened.get("d|4|8", "query two") is None
    with pytest.raises(RagopsError, match="query_length"):
        RetrievalCache(tmp_path / "c.json", {"stride": 4, "query_length": 32})


def test_logprob_ranking_picks_the_passage_that_best_predicts_the_prefix(ws, tiny_lm, bm25, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = heldout_docs(ws, ["Apollo 11"])
    arch = ralm(ws, tiny_lm, bm25, stride=16, query_length=32, ranking="logprob", rerank_candidates=3, rerank_tokens=6,
                cache_retrieval=False, merge_windows=False)
    out = arch.score_documents(docs, CostMeter())
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = encode(document_text(docs.at[0, "title"], docs.at[0, "text"]))
    for n, begin in enumerate(range(16, len(ids), 16)):  # the first span with three BM25 candidates
        query = tokenizer.decode(ids[max(0, begin - 32) : begin], skip_special_tokens=True)
        result = bm25.search([query], 3, exclude_doc_ids=[{docs.at[0, "doc_id"]}])
        if len(result.chunk_ids[0]) == 3:
            break
    else:
        pytest.fail("no span with three candidates")
    # each candidate's NLL of the 6 prefix tokens before the span, given [separator; passage; blank line; earlier prefix]
    separator, blank_line = tokenizer.convert_tokens_to_ids("<|endoftext|>"), encode("x\n\n")[len(encode("x")):]
    nll = []
    for text in result.texts[0]:
        window = [separator, *encode(text.strip())[: 128 - len(blank_line)], *blank_line, *ids[:begin]]  # retrieved_max_length 128
        logp = plain_logprobs(model, window)
        nll.append(-sum(float(logp[len(window) - begin + j - 1, ids[j]]) for j in range(begin - 6, begin)))
    assert len(set(np.round(nll, 6))) == 3
    assert out.at[0, "retrieved_doc_ids"][n] == result.doc_ids[0][int(np.argmin(nll))]
    assert arch.info["lm"]["rerank_pairs"] >= 3


def plain_logprobs(model, input_ids: list[int]):
    """log p(next token) at every position of one plain, unbatched, uncached forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([input_ids])).logits[0].double(), dim=-1)


def reference_ralm_nll(tokenizer, model, retriever, doc_id, text, *, stride, query_length, max_length, retrieved_max_length, start_ids):
    """In-Context RALM's document NLL, written out as a straightforward loop: for every span of
    `stride` tokens, retrieve with the `query_length` tokens before it (never for the first span),
    prepend the top passage (its tokens, then those of a blank line), keep as much of the document
    prefix as fits, run one plain forward and add up the span's log-probs."""
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = encode(text)
    blank_line = encode("x\n\n")[len(encode("x")):]
    first = 0 if start_ids else 1
    total = 0.0
    for begin in range(0, len(ids), stride):
        end = min(begin + stride, len(ids))
        passage = []
        if begin > 0:
            query = tokenizer.decode(ids[max(0, begin - query_length):begin], skip_special_tokens=True)
            top = retriever.search([query], 1, exclude_doc_ids=[{doc_id}])
            if top.chunk_ids[0]:
                passage = encode(top.texts[0][0].strip())[: retrieved_max_length - len(blank_line)] + blank_line
        keep = max_length - len(start_ids) - len(passage)  # document tokens that fit in the window
        since = max(0, end - keep)
        window = [*start_ids, *passage, *ids[since:end]]
        logp = plain_logprobs(model, window)
        offset = len(start_ids) + len(passage) - since  # ids[j] sits at window position offset + j
        for j in range(max(begin, first), end):
            total -= float(logp[offset + j - 1, ids[j]])
    return total, len(ids) - first


@pytest.mark.parametrize("start_token", ["separator", "none"])
def test_ralm_document_nll_equals_a_reference_loop(ws, bm25, tiny_lm_dir, start_token):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    lm = CausalLM.load(tiny_lm_dir, device="cpu", max_length=160, batch_tokens=2048, start_token=start_token)
    docs = heldout_docs(ws, ["Isaac Newton", "Apollo 11"])
    arch = ralm(ws, lm, bm25, stride=8, query_length=8, retrieved_max_length=64, cache_retrieval=False)
    out = arch.score_documents(docs, CostMeter())
    start_ids = [tokenizer.convert_tokens_to_ids("<|endoftext|>")] if start_token == "separator" else []
    for row, (_, doc) in zip(out.itertuples(), docs.iterrows(), strict=True):
        text = document_text(doc["title"], doc["text"])
        want, n_scored = reference_ralm_nll(tokenizer, model, bm25, doc["doc_id"], text, stride=8, query_length=8, max_length=160,
                                            retrieved_max_length=64, start_ids=start_ids)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) > 160  # long enough to slide the window
        assert row.n_tokens == n_scored
        assert row.nll_sum == pytest.approx(want, rel=1e-5)


def test_closed_book_document_nll_by_hand(ws, tiny_lm_dir):
    """Closed book scores each held-out document after the document separator, all tokens in one
    window when it fits: the NLL of one plain forward over [<|endoftext|>, x0, x1, ...]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    lm = CausalLM.load(tiny_lm_dir, device="cpu", max_length=1024)
    docs = heldout_docs(ws, ["Apollo 11", "Isaac Newton"])
    ctx = ArchitectureContext(ws, make_config(), ws.architecture_dir("closed_book"), progress=False, lm_override=lm)
    out = ClosedBook(ctx).score_documents(docs, CostMeter())
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row, (_, doc) in zip(out.itertuples(), docs.iterrows(), strict=True):
        ids = tokenizer(document_text(doc["title"], doc["text"]), add_special_tokens=False)["input_ids"]
        assert len(ids) < 1023  # one window
        logp = plain_logprobs(model, [separator, *ids])
        assert row.n_tokens == len(ids)
        assert row.nll_sum == pytest.approx(-sum(float(logp[j, t]) for j, t in enumerate(ids)), rel=1e-5)


def test_kl_distill_hand_example():
    """Student uniform over 3 documents, teacher (0.5, 0.3, 0.2); values computed by hand."""
    student = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    p = np.array([0.5, 0.3, 0.2])
    kl_teacher_student = float(np.sum(p * np.log(p / (1 / 3))))  # 0.0689593
    kl_student_teacher = float(np.sum((1 / 3) * np.log((1 / 3) / p)))  # 0.0702403
    assert kl_teacher_student == pytest.approx(0.0689593, abs=1e-6)
    assert kl_student_teacher == pytest.approx(0.0702403, abs=1e-6)
    loss = kl_distill(student, teacher, direction="teacher_student", reduction="batchmean")
    assert float(loss.detach()) == pytest.approx(kl_teacher_student, abs=1e-6)
    assert kl_distill(student, teacher, direction="student_teacher").item() == pytest.approx(kl_student_teacher, abs=1e-6)
    assert kl_distill(student, teacher, reduction="mean").item() == pytest.approx(kl_teacher_student / 3, abs=1e-6)
    assert kl_distill(student, teacher, reduction="sum").item() == pytest.approx(kl_teacher_student, abs=1e-6)
    assert kl_distill(student, teacher, reduction="none").shape == (1, 3)
    # batchmean averages over queries: a batch of the same row twice gives the same value
    assert kl_distill(student.repeat(2, 1), teacher.repeat(2, 1)).item() == pytest.approx(kl_teacher_student, abs=1e-6)
    # temperatures: teacher scores /0.5 sharpen the target -> a larger divergence from uniform
    assert kl_distill(student, teacher, teacher_temperature=0.5).item() > kl_teacher_student
    # zero for identical distributions, gradient flows into the student only
    assert kl_distill(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        kl_distill(student, teacher, direction="forward")


def test_refresh_schedule_atlas_format():
    schedule = RefreshSchedule.parse("0-1000:500,1000-10000:2000")
    due = [s for s in range(0, 10000) if schedule.due(s)]
    assert due == [0, 500, 1000, 3000, 5000, 7000, 9000]
    assert not RefreshSchedule.parse("-1").due(0)


def test_options_are_validated_from_params(ws):
    config = make_config(ranking="logprob", rerank_candidates=4)
    options = config.architectures["incontext_ralm"]
    assert isinstance(options, InContextRALMOptions) and options.rerank_candidates == 4
    with pytest.raises(Exception, match="rerank_candidates"):
        make_config(rerank_candidates=0)
    assert InContextRALM.tags() == {"architecture": "incontext_ralm", "family": "black-box", "finetune": "none"}
    assert ClosedBook.tags()["family"] == "baseline"


def test_sweep_table_and_plot(ws, tiny_lm, bm25, tmp_path):
    from ragops.evaluation import plot_sweep, run_sweep

    table = run_sweep(ws, make_config(), progress=False, lm=tiny_lm, retrievers={"bm25": bm25})
    assert list(table.columns) == ["stride", "query_length", "token_ppl", "word_ppl", "wall_s", "lm_tokens", "retrieval_calls"]
    assert sorted(zip(table["stride"], table["query_length"])) == [(8, 8), (16, 8)]
    # each point is In-Context RALM with that stride and query length on the dev half's first article
    from ragops.evaluation.data import load_heldout

    dev = load_heldout(ws, "dev", 1)
    for stride in (8, 16):
        scored = ralm(ws, tiny_lm, bm25, stride=stride, query_length=8).score_documents(dev, CostMeter())
        point = table.set_index("stride").loc[stride]
        assert point["token_ppl"] == pytest.approx(np.exp(scored["nll_sum"].sum() / scored["n_tokens"].sum()), rel=1e-6)
        assert point["word_ppl"] == pytest.approx(np.exp(scored["nll_sum"].sum() / scored["n_words"].sum()), rel=1e-6)
    calls = dict(zip(table["stride"], table["retrieval_calls"]))
    assert calls[8] > calls[16] > 0  # a smaller stride retrieves more often
    assert "closed_book" in table.attrs
    png = plot_sweep(table, tmp_path / "plots" / "sweep.png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class ToyTrained(ClosedBook):
    """A minimal fine-tuning architecture: 'training' writes one artifact file, evaluation reads it."""

    name = "toy_trained"
    finetune = "lm"
    trained_calls = 0

    def train(self, run):
        ToyTrained.trained_calls += 1
        run.meter.add(tokens_scored=10)

        def write(tmp):
            (tmp / "weights.txt").write_text("trained")
            return {"steps": 1}

        return self.save_artifacts(write)


def test_training_plumbing_for_later_architectures(ws, tiny_lm, monkeypatch):
    from ragops.architectures import registry
    from ragops.training.loop import TrainRun

    monkeypatch.setitem(registry.ARCHITECTURES, "toy_trained", "test_architectures:ToyTrained")
    config = resolve({"eval": {"tasks": ["describe"], "split": "test", "max_questions": 1, "max_new_tokens": 2,
                               "bootstrap_samples": 10}})
    ToyTrained.trained_calls = 0
    arch = ToyTrained(ArchitectureContext(ws, config, ws.architecture_dir("toy_trained"), progress=False, lm_override=tiny_lm))
    with pytest.raises(RagopsError, match="not trained for the current settings"):
        run_architecture("toy_trained", ws, config, infer_meter=CostMeter("inference"), progress=False, lm=tiny_lm)
    assert arch.needs_training()
    with CostMeter("train") as train:
        arch.train(TrainRun(meter=train, progress=False))
    assert ToyTrained.trained_calls == 1 and train.counters["tokens_scored"] == 10
    result = run_architecture("toy_trained", ws, config, infer_meter=CostMeter("inference"), progress=False, lm=tiny_lm)
    assert result.info["train"] == {"steps": 1} and result.info["finetune"] == "lm"
    assert (ws.architecture_dir("toy_trained") / "weights.txt").read_text() == "trained"
    assert not arch.needs_training()  # artifacts for the same settings are reused
    # other settings (here the seed) invalidate them; a new version replaces the folder whole
    reseeded = ToyTrained(ArchitectureContext(ws, config.model_copy(update={"seed": config.seed + 1}), ws.architecture_dir("toy_trained"),
                                              progress=False, lm_override=tiny_lm))
    assert reseeded.needs_training()
    manifest = reseeded.train(TrainRun(meter=CostMeter("train"), progress=False))
    assert manifest["version"] == 2 and not reseeded.needs_training() and arch.needs_training()
