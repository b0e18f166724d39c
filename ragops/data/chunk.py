"""Sentence-aware token-window chunking of the corpus.

Window sizes are counted with the *encoder's* tokenizer (special tokens excluded), so a chunk of
`size` tokens fits the encoder exactly. Each document's text is split into sentences (a regex on
sentence-final punctuation followed by a capital, digit, quote or parenthesis, plus line breaks);
whole sentences are packed greedily into windows of at most `size` tokens; the next window starts
with the trailing sentences of the previous one that total at most `overlap` tokens. A sentence
longer than `size` tokens becomes its own run of token windows (stride `size - overlap`, cut
where possible at a word start), mapped back to text through the tokenizer's offsets.

Every chunk's `text` is an exact substring of its document's text (title not included: it is in
its own column). Chunk -> document mapping: the `doc_id` column (`chunk_id` is
`<doc_id>#<position:04d>`, positions 0.. in reading order). `n_tokens` is the token count of the
chunk text itself, re-measured after packing; a chunk that re-tokenises longer than `size` (possible
with BPE tokenizers, whose counts are not additive across sentences) is re-split on tokens.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from ragops.errors import RagopsError
from ragops.resources import resolve_encoder

CHUNK_COLUMNS = ["chunk_id", "doc_id", "position", "title", "text", "n_tokens"]
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\s*\n\s*")


def load_tokenizer(model_spec: str):
    """The (fast) tokenizer of an encoder: "default" = the packaged MiniLM, else a HF name or path."""
    from transformers import AutoTokenizer

    location = resolve_encoder(model_spec)
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:  # a hub name that is not in the offline cache, a folder without a tokenizer
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RagopsError(f"embed.model '{model_spec}': cannot load its tokenizer ({reason})") from None


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, whitespace trimmed, in order."""
    spans: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))

    start = 0
    for match in _SENTENCE_BOUNDARY.finditer(text):
        add(start, match.start())
        start = match.end()
    add(start, len(text))
    return spans


def _encode(tokenizer, texts: list[str]) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Token counts and offsets (special tokens excluded, no truncation) of many texts at once."""
    if not texts:
        return [], []
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    offsets = encoded["offset_mapping"]
    return [len(ids) for ids in encoded["input_ids"]], offsets


def _token_windows(offsets: list[tuple[int, int]], size: int, overlap: int, text: str) -> list[tuple[int, int]]:
    """Character spans (into `text`, the string the offsets refer to) of windows of <= size tokens,
    consecutive windows sharing <= overlap tokens; cuts prefer a token that starts a word
    (whitespace before it, or a BPE token that begins with the space)."""
    n = len(offsets)
    if n == 0:
        return []

    def starts_word(i: int) -> bool:
        if i == 0 or i >= n:
            return True
        start = offsets[i][0]
        return start > offsets[i - 1][1] or (start < len(text) and text[start].isspace())

    spans = []
    a = 0
    while True:
        b = min(a + size, n)
        if b < n:
            for cut in range(b, a + max(1, size // 2), -1):  # back off to a word boundary if one is near
                if starts_word(cut):
                    b = cut
                    break
        spans.append((offsets[a][0], offsets[b - 1][1]))
        if b >= n:
            return spans
        nxt = b - overlap
        for start in range(max(a + 1, b - overlap), b + 1):  # start the next window at a word start
            if starts_word(start):
                nxt = start
                break
        a = max(a + 1, min(nxt, b))


def _pack(units: list[tuple[int, int, int]], size: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy packing of sentences (start, end, n_tokens), each <= size tokens, into character spans."""
    spans: list[tuple[int, int]] = []
    window: list[tuple[int, int, int]] = []
    tokens = 0
    for start, end, n in units:
        if window and tokens + n > size:
            spans.append((window[0][0], window[-1][1]))
            tail: list[tuple[int, int, int]] = []
            carried = 0
            for unit in reversed(window):
                if carried + unit[2] > overlap:
                    break
                tail.insert(0, unit)
                carried += unit[2]
            while tail and carried + n > size:
                carried -= tail.pop(0)[2]
            window, tokens = tail, carried
        window.append((start, end, n))
        tokens += n
    if window:
        spans.append((window[0][0], window[-1][1]))
    return spans


def _doc_spans(text: str, sentences: list[tuple[int, int]], counts: list[int], offsets: list, size: int, overlap: int) -> list[tuple[int, int]]:
    """Chunk spans of one document. Sentence i was tokenised with the whitespace before it
    (text[end of sentence i-1 : end of sentence i]) so that BPE-style tokenizers, which turn a
    separating space into (part of) a token, are counted as they will be inside a chunk."""
    spans: list[tuple[int, int]] = []
    run: list[tuple[int, int, int]] = []
    previous_end = sentences[0][0] if sentences else 0
    for (start, end), n, offs in zip(sentences, counts, offsets, strict=True):
        base = previous_end
        previous_end = end
        if n <= size:
            run.append((start, end, n))
            continue
        spans.extend(_pack(run, size, overlap))  # a long sentence closes the current window
        run = []
        for a, b in _token_windows(offs, size, overlap, text[base:end]):
            a, b = _trim(text, base + a, base + b)
            if b > a:
                spans.append((a, b))
    spans.extend(_pack(run, size, overlap))
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def chunk_corpus(corpus: pd.DataFrame, tokenizer: Any, size: int, overlap: int) -> pd.DataFrame:
    """Chunk every document of `corpus` (doc_id, title, text) into windows of at most `size` tokens.

    Returns a table with columns chunk_id, doc_id, position, title, text, n_tokens, ordered by the
    corpus order and then position. Documents whose text has no sentence yield no chunk.
    """
    if size < 1 or not 0 <= overlap < size:
        raise RagopsError(f"chunking needs size >= 1 and 0 <= overlap < size (got size={size}, overlap={overlap})")
    if not getattr(tokenizer, "is_fast", False):
        raise RagopsError(f"chunking needs a fast tokenizer (offsets); {type(tokenizer).__name__} is not one")

    doc_ids = corpus["doc_id"].tolist()
    titles = corpus["title"].tolist()
    texts = ["" if pd.isna(t) else str(t) for t in corpus["text"].tolist()]

    doc_sentences = [sentence_spans(text) for text in texts]
    flat = [
        text[(spans[i - 1][1] if i else a) : b]
        for text, spans in zip(texts, doc_sentences, strict=True)
        for i, (a, b) in enumerate(spans)
    ]
    counts, offsets = _encode(tokenizer, flat)

    chunk_doc: list[int] = []
    chunk_spans: list[tuple[int, int]] = []
    cursor = 0
    for index, (text, spans) in enumerate(zip(texts, doc_sentences, strict=True)):
        k = len(spans)
        for span in _doc_spans(text, spans, counts[cursor : cursor + k], offsets[cursor : cursor + k], size, overlap):
            chunk_doc.append(index)
            chunk_spans.append(span)
        cursor += k

    chunk_texts = [texts[d][a:b] for d, (a, b) in zip(chunk_doc, chunk_spans, strict=True)]
    n_tokens, chunk_offsets = _encode(tokenizer, chunk_texts)
    chunk_doc, chunk_texts, n_tokens = _resplit_oversized(tokenizer, chunk_doc, chunk_texts, n_tokens, chunk_offsets, size, overlap)

    positions: list[int] = []
    previous = None
    for d in chunk_doc:
        positions.append(positions[-1] + 1 if d == previous else 0)
        previous = d
    return pd.DataFrame(
        {
            "chunk_id": [f"{doc_ids[d]}#{p:04d}" for d, p in zip(chunk_doc, positions, strict=True)],
            "doc_id": [doc_ids[d] for d in chunk_doc],
            "position": pd.Series(positions, dtype="int64"),
            "title": [titles[d] for d in chunk_doc],
            "text": chunk_texts,
            "n_tokens": pd.Series(n_tokens, dtype="int64"),
        },
        columns=CHUNK_COLUMNS,
    )


def _resplit_oversized(tokenizer, chunk_doc, chunk_texts, n_tokens, chunk_offsets, size, overlap):
    """Re-split, on its own tokens, any chunk whose text re-tokenises to more than `size` tokens."""
    if all(n <= size for n in n_tokens):
        return chunk_doc, chunk_texts, n_tokens
    docs, texts, counts = [], [], []
    for d, text, n, offs in zip(chunk_doc, chunk_texts, n_tokens, chunk_offsets, strict=True):
        if n <= size:
            docs.append(d)
            texts.append(text)
            counts.append(n)
            continue
        target = size
        while True:
            pieces = [text[a:b] for a, b in (_trim(text, *w) for w in _token_windows(offs, target, min(overlap, target - 1), text)) if b > a]
            piece_counts, _ = _encode(tokenizer, pieces)
            if max(piece_counts) <= size or target == 1:
                break
            target = max(1, target - (max(piece_counts) - size))
        for piece, count in zip(pieces, piece_counts, strict=True):
            docs.append(d)
            texts.append(piece)
            counts.append(count)
    return docs, texts, counts


