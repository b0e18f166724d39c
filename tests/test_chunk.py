"""Chunking with the real MiniLM tokenizer (and a tiny byte-level BPE one for the non-additive case)."""

from __future__ import annotations

import pandas as pd
import pytest

from ragops.config import IngestConfig
from ragops.data.chunk import CHUNK_COLUMNS, chunk_corpus, load_tokenizer, sentence_spans
from ragops.data.ingest import load_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _doc(doc_id: str, text: str, title: str = "A title") -> dict:
    return {"doc_id": doc_id, "title": title, "text": text, "source": "test", "description": None, "topic": None}


SHORT_SENTENCES = " ".join(f"Sentence number {i} is rather short." for i in range(40))
LONG_SENTENCE = "This sentence never ends and " + " ".join(f"keeps listing item{i} and more" for i in range(120)) + "."


@pytest.fixture(scope="module")
def real_sample():
    corpus, _ = load_corpus("default", IngestConfig(limit=150))
    return corpus


def test_real_sample_windows_fit_and_are_exact_substrings(tokenizer, real_sample):
    chunks = chunk_corpus(real_sample, tokenizer, size=64, overlap=16)
    assert list(chunks.columns) == CHUNK_COLUMNS
    assert chunks["chunk_id"].is_unique
    assert set(chunks["doc_id"]) == set(real_sample["doc_id"])  # every document has a chunk
    texts = real_sample.set_index("doc_id")["text"]
    titles = real_sample.set_index("doc_id")["title"]
    for row in chunks.itertuples():
        assert row.text in texts[row.doc_id]  # pure text: an exact substring, no title added
        assert row.title == titles[row.doc_id]
        assert row.chunk_id == f"{row.doc_id}#{row.position:04d}"
        assert row.n_tokens == _count(tokenizer, row.text) <= 64
    # positions are 0..k-1 per document, in reading order
    for _, group in chunks.groupby("doc_id", sort=False):
        assert group["position"].tolist() == list(range(len(group)))
        starts = [texts[group["doc_id"].iloc[0]].index(t) for t in group["text"]]
        assert starts == sorted(starts)
    assert chunks["doc_id"].tolist() == sorted(chunks["doc_id"])  # corpus order kept


def test_every_sentence_is_covered(tokenizer, real_sample):
    chunks = chunk_corpus(real_sample, tokenizer, size=48, overlap=8)
    by_doc = chunks.groupby("doc_id")["text"].apply(list)
    for doc_id, text in zip(real_sample["doc_id"], real_sample["text"], strict=True):
        for a, b in sentence_spans(text):
            sentence = text[a:b]
            if _count(tokenizer, sentence) <= 48:
                assert any(sentence in chunk for chunk in by_doc[doc_id]), (doc_id, sentence)


def test_consecutive_chunks_overlap_by_whole_sentences(tokenizer):
    corpus = pd.DataFrame([_doc("t:1", SHORT_SENTENCES)])
    chunks = chunk_corpus(corpus, tokenizer, size=40, overlap=16)
    assert len(chunks) > 3
    sentences = [SHORT_SENTENCES[a:b] for a, b in sentence_spans(SHORT_SENTENCES)]
    per_chunk = [[s for s in sentences if s in chunk] for chunk in chunks["text"]]
    for before, after in zip(per_chunk, per_chunk[1:]):
        shared = [s for s in after if s in before]
        assert shared, "consecutive chunks must share their boundary sentences"
        assert shared == before[-len(shared):] == after[: len(shared)]  # trailing sentences carried over
        assert sum(_count(tokenizer, s) for s in shared) <= 16
    assert all(n <= 40 for n in chunks["n_tokens"])
    # no overlap asked, none given; the chunks then tile the text
    plain = chunk_corpus(corpus, tokenizer, size=40, overlap=0)
    assert " ".join(plain["text"]) == SHORT_SENTENCES


def test_long_sentence_is_split_on_tokens_with_token_overlap(tokenizer):
    text = "A short opening sentence. " + LONG_SENTENCE + " A short closing sentence."
    corpus = pd.DataFrame([_doc("t:long", text)])
    assert _count(tokenizer, LONG_SENTENCE) > 3 * 64
    chunks = chunk_corpus(corpus, tokenizer, size=64, overlap=10)
    texts = chunks["text"].tolist()
    assert texts[0] == "A short opening sentence." and texts[-1] == "A short closing sentence."
    pieces = texts[1:-1]
    assert len(pieces) >= 4 and all(n <= 64 for n in chunks["n_tokens"])
    assert pieces[0].startswith("This sentence never ends") and pieces[-1].endswith("item119 and more.")
    position = 0
    for before, after in zip(pieces, pieces[1:]):
        start = LONG_SENTENCE.index(after, position)
        end_before = LONG_SENTENCE.index(before, position) + len(before)
        assert start < end_before, "pieces of a long sentence overlap"
        assert _count(tokenizer, LONG_SENTENCE[start:end_before]) <= 10
        assert not after[0].isspace() and after.split()[0] in LONG_SENTENCE.split()  # cut at a word start
        position = start
    words = set(LONG_SENTENCE.split())
    assert words == set(" ".join(pieces).split())  # nothing lost


def test_ids_are_stable_and_independent_of_other_documents(tokenizer, real_sample):
    first = chunk_corpus(real_sample, tokenizer, size=64, overlap=16)
    again = chunk_corpus(real_sample, tokenizer, size=64, overlap=16)
    pd.testing.assert_frame_equal(first, again)
    subset = real_sample.iloc[10:20]
    alone = chunk_corpus(subset, tokenizer, size=64, overlap=16)
    expected = first[first["doc_id"].isin(subset["doc_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, expected)


def test_empty_and_blank_documents_give_no_chunks(tokenizer):
    corpus = pd.DataFrame([_doc("t:a", ""), _doc("t:b", " \n "), _doc("t:c", "Only this.")])
    chunks = chunk_corpus(corpus, tokenizer, size=16, overlap=4)
    assert chunks["chunk_id"].tolist() == ["t:c#0000"]
    assert chunk_corpus(corpus.iloc[:0], tokenizer, size=16, overlap=4).columns.tolist() == CHUNK_COLUMNS


def test_non_additive_bpe_tokenizer_still_fits():
    """Byte-level BPE counts a separating space as a token: windows must still fit once re-measured."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([SHORT_SENTENCES, LONG_SENTENCE], trainer)
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend)
    corpus = pd.DataFrame([_doc("t:1", SHORT_SENTENCES), _doc("t:2", LONG_SENTENCE)])
    chunks = chunk_corpus(corpus, bpe, size=24, overlap=6)
    for row in chunks.itertuples():
        assert row.n_tokens == _count(bpe, row.text) <= 24
        assert row.text in corpus.set_index("doc_id")["text"][row.doc_id]
    assert set(" ".join(chunks["text"]).split()) == set((SHORT_SENTENCES + " " + LONG_SENTENCE).split())


def test_bad_arguments(tokenizer):
    from ragops.errors import RagopsError

    with pytest.raises(RagopsError, match="overlap < size"):
        chunk_corpus(pd.DataFrame([_doc("t:1", "Text.")]), tokenizer, size=8, overlap=8)
