"""In-Context RALM (Ram et al. 2023): retrieved text prepended to the LM's input, no training.

QA: the top-k passages for the question go before it in the shared prompt.

Language modelling (rag-methods.md §1): the document is scored in target spans of `stride`
tokens. Before each span [b, e) (b > 0) the retriever is queried with the last `query_length`
tokens of the prefix, x[b-ℓ:b], strictly before the target; the chosen passage is prepended to
the window [start; passage; x[..b]] and x[b:e] is scored. Every window begins with the same start
token(s) as the closed book's (`lm.start_token`, `CausalLM.document_start`): the only difference
between the two is the passage. The first span has no prefix and is scored like the plain LM
(without a start token its first token is context only, as for every architecture). Ranking
`first` takes the retriever's top passage; `logprob` takes, of the top `rerank_candidates`, the
one under which the LM gives the last `rerank_tokens` prefix tokens the lowest NLL (still never
looking at the target).

Deviations from the reference implementation (Ram et al.'s code): retrieval starts at token
`stride` (the first span is scored without a passage) rather than after a first full window;
the passage is followed by a blank line (`\n\n`, `prompts.format_passage`); and with a start
token the document's token 0 is scored (after the start token), where the reference leaves it
unscored (`lm.start_token: none` reproduces that).

Retrieval results are cached on disk by (document, begin, end) offsets in a file that records
stride, query length, retriever, candidates and index (`shared.RetrievalCache`): reruns and sweeps
reuse them, and a file made with other settings is refused, not silently reused.

`merge_windows` (default on) scores consecutive spans that chose the same passage in one forward:
when the window is not truncated, token t's log-prob given [passage; x<t] is the same whether t is
scored in its own span's forward or in a longer one, so this is exact and often much cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ragops.architectures.base import Architecture, _progress
from ragops.config import ArchitectureOptions
from ragops.errors import ConfigError
from ragops.retrieval.types import Passage, Retriever

if TYPE_CHECKING:
    import pandas as pd

    from ragops.cost import CostMeter


class InContextRALMOptions(ArchitectureOptions):
    retriever: Literal["bm25", "dense", "hybrid"] = "bm25"
    k: int = Field(default=2, ge=1)  # QA: passages prepended to the question
    stride: int = Field(default=16, ge=1)  # lm: retrieve every `stride` tokens
    query_length: int = Field(default=32, ge=1)  # lm: the query is the last `query_length` prefix tokens
    ranking: Literal["first", "logprob"] = "first"  # lm: which retrieved passage to prepend
    rerank_candidates: int = Field(default=16, ge=2)  # lm, ranking=logprob: passages considered
    rerank_tokens: int = Field(default=16, ge=1)  # lm, ranking=logprob: prefix tokens whose NLL ranks them
    retrieved_max_length: int = Field(default=256, ge=8)  # lm: tokens of the prepended passage kept
    merge_windows: bool = True  # lm: one forward for consecutive spans with the same passage (exact)
    cache_retrieval: bool = True  # lm: reuse retrieval results across runs (keyed by offsets)
    retrieval_cache_file: str | None = None  # lm: an explicit cache file (default: one per setting under .cache/)


def strided_spans(n_tokens: int, stride: int) -> list[tuple[int, int]]:
    """Target spans [b, e) of `stride` tokens covering 0..n_tokens."""
    return [(b, min(b + stride, n_tokens)) for b in range(0, n_tokens, stride)]


def query_window(begin: int, query_length: int) -> tuple[int, int]:
    """Token offsets of the retrieval query for a span starting at `begin`: strictly before it."""
    return max(0, begin - query_length), begin


@dataclass
class _Job:
    chunk_id: str | None
    passage_ids: list[int]
    start: int  # first prefix token kept in the window
    begin: int  # first target token
    end: int
    spans: list[int] = field(default_factory=list)


class InContextRALM(Architecture):
    name = "incontext_ralm"
    family = "black-box"
    finetune = "none"
    Options = InContextRALMOptions
    options: InContextRALMOptions

    # --- QA ----------------------------------------------------------------------------------------------
    def passages_for_questions(self, questions: pd.DataFrame, meter: CostMeter) -> list[list[Passage]]:
        retriever = self.ctx.retriever(self.options.retriever)
        return self.retrieve(retriever, [str(q) for q in questions["question"]], self.options.k, meter)

    # --- language modelling --------------------------------------------------------------------------
    def score_documents(self, docs: pd.DataFrame, meter: CostMeter) -> pd.DataFrame:
        import pandas as pd

        from ragops.architectures.prompts import document_text

        opt, lm = self.options, self.lm
        if opt.stride + opt.retrieved_max_length + len(lm.document_start) >= lm.max_length:
            raise ConfigError(
                f"architectures.{self.name}: stride ({opt.stride}) + retrieved_max_length ({opt.retrieved_max_length}) "
                f"+ the start token must be below lm.max_length ({lm.max_length})"
            )
        retriever = self.ctx.retriever(opt.retriever)
        cache = self.open_cache(retriever) if opt.cache_retrieval else None
        self._passage_ids: dict[str, list[int]] = {}
        rows = []
        stats = {"windows": 0, "spans": 0, "rerank_pairs": 0}
        bar = _progress(self.progress, len(docs), f"{self.name}: documents (stride {opt.stride}, query {opt.query_length})")
        try:
            for _, doc in docs.iterrows():
                text = document_text(doc["title"], doc["text"])
                ids = lm.encode(text)
                rows.append(self._score_document(str(doc["doc_id"]), ids, len(text.split()), retriever, cache, meter, stats))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if cache is not None:
                cache.save()
        self.info["lm"] = {
            **stats,
            "retrieval_cache": str(cache.path) if cache is not None else None,
            "retrieval_cache_hits": cache.hits if cache is not None else 0,
            "retrieval_cache_misses": cache.misses if cache is not None else 0,
        }
        return pd.DataFrame(rows)

    def open_cache(self, retriever: Retriever):
        from ragops.architectures.shared import RetrievalCache
        from ragops.io import json_hash, text_hash

        opt = self.options
        candidates = self._n_candidates()
        index_meta = self.ctx.ws.index_dir / "meta.json"
        trained = self.trained_retriever_dir()
        if trained is not None and opt.retriever != "bm25":
            index_meta = trained / "index" / "meta.json"  # a tuned retriever: its own results, never the untuned ones
        fingerprint = json_hash(
            {
                "index": text_hash(index_meta.read_text()) if index_meta.exists() else getattr(retriever, "name", opt.retriever),
                "vocab": self.lm.vocab_size,
            }
        )[:12]
        meta = {
            "architecture": self.name,
            "task": "lm",
            "retriever": opt.retriever,
            "stride": opt.stride,
            "query_length": opt.query_length,
            "candidates": candidates,
            "index": fingerprint,
        }
        if opt.retrieval_cache_file:
            path = Path(opt.retrieval_cache_file)
        else:
            name = f"lm-{opt.retriever}-s{opt.stride}-q{opt.query_length}-n{candidates}-{fingerprint}.json"
            path = self.ctx.ws.retrieval_cache / self.name / name
        return RetrievalCache(path, meta)

    def _n_candidates(self) -> int:
        return self.options.rerank_candidates if self.options.ranking == "logprob" else 1

    def _ids_of(self, chunk_id: str, text: str) -> list[int]:
        """Token ids of a passage as prepended: `format_passage` text, cut to `retrieved_max_length`."""
        ids = self._passage_ids.get(chunk_id)
        if ids is None:
            from ragops.architectures.prompts import format_passage

            sep = self.lm.encode(format_passage("x"))[len(self.lm.encode("x")) :]
            body = self.lm.encode(text.strip())[: self.options.retrieved_max_length - len(sep)]
            ids = self._passage_ids[chunk_id] = body + sep
        return ids

    def _retrieve_spans(self, doc_id, ids, spans, retriever, cache, meter) -> list[list[Passage] | None]:
        from ragops.architectures.shared import offsets_key

        lm, opt = self.lm, self.options
        n = self._n_candidates()
        hits: list[list[Passage] | None] = [None] * len(spans)
        missing = []
        for i, (begin, end) in enumerate(spans):
            if begin == 0:
                continue
            q0, q1 = query_window(begin, opt.query_length)
            query = lm.decode(ids[q0:q1])
            key = offsets_key(doc_id, begin, end)
            cached = cache.get(key, query) if cache is not None else None
            if cached is None:
                missing.append((i, key, query))
            else:
                hits[i] = cached
        meter.add(retrieval_calls=sum(1 for b, _ in spans if b > 0))
        if missing:
            result = retriever.search([q for _, _, q in missing], n, exclude_doc_ids=[{doc_id} for _ in missing])
            for found, (i, key, query) in zip(result.passages(), missing, strict=True):
                hits[i] = found
                if cache is not None:
                    cache.put(key, query, found)
        return hits

    def _choose(self, ids, spans, hits, meter, stats) -> list[Passage | None]:
        """The passage prepended before each span (None: no retrieval for that span)."""
        opt, lm = self.options, self.lm
        if opt.ranking == "first":
            return [h[0] if h else None for h in hits]
        contexts, targets, owners, retrieved = [], [], [], 0
        for i, ((begin, _), candidates) in enumerate(zip(spans, hits, strict=True)):
            if not candidates:
                continue
            split = max(0, begin - opt.rerank_tokens)
            for c, cand in enumerate(candidates[: opt.rerank_candidates]):
                passage = self._ids_of(cand.chunk_id, cand.text)
                start = max(0, begin - (lm.max_length - len(passage) - len(lm.document_start)))
                contexts.append(lm.document_start + passage + ids[min(start, split) : split])
                retrieved += len(passage)
                targets.append(ids[split:begin])
                owners.append((i, c))
        with lm.charged_to(meter):
            scored = lm.score_ids(contexts, targets)
        meter.add(tokens_retrieved=retrieved)
        stats["rerank_pairs"] += len(contexts)
        best: dict[int, tuple[float, int]] = {}
        for (i, c), lp in zip(owners, scored, strict=True):
            total = float(lp.sum())
            if i not in best or total > best[i][0]:
                best[i] = (total, c)
        return [hits[i][best[i][1]] if i in best else None for i in range(len(spans))]

    def _score_document(self, doc_id, ids, n_words, retriever, cache, meter, stats) -> dict[str, Any]:
        opt, lm = self.options, self.lm
        spans = strided_spans(len(ids), opt.stride)
        hits = self._retrieve_spans(doc_id, ids, spans, retriever, cache, meter)
        chosen = self._choose(ids, spans, hits, meter, stats)
        first = 0 if lm.document_start else 1  # without a start token, token 0 is context only
        jobs: list[_Job] = []
        for i, ((begin, end), passage) in enumerate(zip(spans, chosen, strict=True)):
            begin = max(begin, first)
            if begin >= end:
                continue
            passage_ids = self._ids_of(passage.chunk_id, passage.text) if passage else []
            start = max(0, end - (lm.max_length - len(passage_ids) - len(lm.document_start)))
            chunk_id = passage.chunk_id if passage else None
            last = jobs[-1] if jobs else None
            if opt.merge_windows and last and last.chunk_id == chunk_id and last.start == 0 and start == 0 and last.end == begin:
                last.end = end
                last.spans.append(i)
            else:
                jobs.append(_Job(chunk_id, passage_ids, start, begin, end, [i]))
        contexts = [lm.document_start + job.passage_ids + ids[job.start : job.begin] for job in jobs]
        targets = [ids[job.begin : job.end] for job in jobs]
        with lm.charged_to(meter):
            scored = lm.score_ids(contexts, targets)
        tokens_retrieved = sum(len(job.passage_ids) for job in jobs)
        tokens_prompt = sum(len(lm.document_start) + job.begin - job.start for job in jobs)
        n_scored = sum(len(target) for target in targets)
        meter.add(tokens_retrieved=tokens_retrieved, tokens_prompt=tokens_prompt, examples=1)
        stats["windows"] += len(jobs)
        stats["spans"] += len(spans)
        nll = -float(sum(lp.sum() for lp in scored))
        used = [p for (b, _), p in zip(spans, chosen, strict=True) if b > 0]
        return {
            "doc_id": doc_id,
            "nll_sum": nll,
            "n_tokens": n_scored,
            "n_words": n_words,
            "retrieved_doc_ids": [p.doc_id if p else "" for p in used],
            "retrieved_scores": [p.score if p else float("nan") for p in used],
            "tokens_prompt": tokens_prompt,
            "tokens_retrieved": tokens_retrieved,
            "tokens_scored": n_scored,
            "retrieval_calls": len(used),
            "lm_windows": len(jobs),
        }
