"""AAR, the Augmentation-Adapted Retriever (Yu et al. 2023): a small proxy LM's attention picks the
documents a retriever is then trained to prefer; the target LM is never consulted in training.

Training, per train-split question (x, y):
1. candidates: the top-N chunks of the *untuned* dense retriever (N = 10; AAR uses ANCE's top-10);
2. the proxy LM (`proxy_model`, default the configured LM, any HF causal LM name or path) reads
   the question with all N passages in one prompt (the shared QA prompt, passages cut to
   `passage_tokens`) followed by the gold answer; each passage's score is the attention mass from
   the answer tokens onto the passage's tokens — post-softmax weights summed over the passage's
   tokens, averaged over all layers, all heads and the answer positions (`score: mass`;
   `norms` weights each key by ‖v‖ as Atlas's ADist). Decoder-only attention favours recent and
   initial positions, so each question is read in two passage orders and the scores averaged;
3. positives: the top-2 passages by attention plus the gold article's passages; hard negatives:
   the other candidates. `positives: gold_only` is the control without the LM's preference
   (AAR's human labels alone), `attention_only` the LM's preference alone;
4. multi-positive InfoNCE (AAR's `use_all_positive_passages`): for each positive, cross-entropy
   against every in-batch passage that is not one of this question's positives, on cosine / τ.

This transplants AAR's mechanism from a Flan-T5 FiD reader (cross-attention at the first
decoding step) to a decoder-only proxy (self-attention from the answer tokens); how often the
attention-preferred passages are the gold article's is logged (`gold_agreement`), since SmolLM2's
attention found the gold passage in only 3 of 5 probes. Towers are shared (AAR's encoders are),
so the index is re-embedded once with the final encoder. Evaluation is In-Context RALM (passages
prepended, k = 2) with the target LM `lm.model` and the tuned retriever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from ragops.architectures.incontext_ralm import InContextRALM, InContextRALMOptions
from ragops.config import DEFAULT_MODEL, OptimizerOptions
from ragops.errors import ConfigError, RagopsError

if TYPE_CHECKING:
    import torch

    from ragops.lm.model import CausalLM
    from ragops.training.loop import TrainRun
    from ragops.training.retriever import RetrievalExample, RetrieverSetup


class AAROptions(InContextRALMOptions):
    retriever: Literal["bm25", "dense", "hybrid"] = "dense"
    proxy_model: str = DEFAULT_MODEL  # "default" = the configured LM (lm.model); else any HF causal LM name or path
    qa_examples: int = Field(default=80, ge=1)  # train questions per QA task
    n_candidates: int = Field(default=10, ge=2)  # N passages the proxy reads per question
    passage_tokens: int = Field(default=64, ge=8)  # each passage cut to this many proxy tokens
    orders: int = Field(default=2, ge=1, le=2)  # 2: read in the given and the reversed order, average
    score: Literal["mass", "norms"] = "mass"
    top_attention: int = Field(default=2, ge=0)  # positives taken from the attention ranking
    positives: Literal["attention_and_gold", "gold_only", "attention_only"] = "attention_and_gold"
    temperature: float = Field(default=0.05, gt=0)  # τ of the contrastive loss (cosine scores)
    dev_fraction: float = Field(default=0.1, ge=0, lt=1)
    train: OptimizerOptions = OptimizerOptions(steps=40, batch_size=8, lr=2e-5, warmup=0.1, checkpoint_every=10)


def passage_spans(offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token [start, end) of each character span, from a tokenizer's offset mapping."""
    out = []
    for a, b in char_spans:
        tokens = [i for i, (s, e) in enumerate(offsets) if e > a and s < b and e > s]
        out.append((tokens[0], tokens[-1] + 1) if tokens else (0, 0))
    return out


def proxy_attention_scores(proxy: CausalLM, question: str, passages: list[str], answer: str, score: str = "mass") -> np.ndarray:
    """One score per passage: attention from the gold-answer tokens onto the passage's tokens, when the
    proxy reads `passages` (shown in this order) with `question` in the shared QA prompt."""
    from ragops.architectures.prompts import answer_continuation, format_passage, qa_prompt
    from ragops.training.teachers import attention_mass

    chat = proxy.chat_formatter
    prompt = qa_prompt(question, passages, chat)
    # Where each passage sits in the prompt text (qa_prompt shows them best-last: reversed).
    shown = list(reversed(passages))
    cursor, char_spans = 0, []
    for text in shown:
        block = format_passage(text)
        at = prompt.index(block, cursor)
        char_spans.append((at, at + len(text.strip())))
        cursor = at + len(block)
    encoded = proxy.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    answer_ids = proxy.encode(answer_continuation(answer, chat=chat is not None))
    full = ids + answer_ids
    if len(full) > proxy.max_length:
        raise RagopsError(f"aar: a proxy prompt of {len(full)} tokens exceeds lm.max_length={proxy.max_length}; lower passage_tokens or n_candidates")
    # The positions whose next-token prediction is an answer token: the last prompt token and all
    # answer tokens but the last (teacher forcing).
    query_positions = list(range(len(ids) - 1, len(full) - 1))
    read = proxy.attention(full, query_positions, value_norms=score == "norms")
    spans = passage_spans(offsets, char_spans)
    scores_shown = attention_mass(read["weights"], spans, value_norms=read.get("value_norms"), score=score)
    return scores_shown[::-1].copy()  # back to the order of `passages`


def contrastive_loss(
    queries: torch.Tensor, passages: torch.Tensor, positives: list[list[int]], temperature: float, column_ids: list[Any] | None = None,
) -> torch.Tensor:
    """Multi-positive InfoNCE: for query b and each positive column j, −log softmax over {j} ∪ the
    columns that are not b's positives (in-batch passages included); averaged over b's positives,
    then over the batch. `column_ids` (e.g. chunk ids): a column holding the same passage as one of
    b's positives is never one of b's negatives, wherever in the batch it appears."""
    import torch

    logits = queries @ passages.T / temperature  # [B, M]
    losses = []
    for b, pos in enumerate(positives):
        if not pos:
            continue
        mask = torch.ones(logits.shape[1], dtype=torch.bool)
        mask[pos] = False
        if column_ids is not None:
            same = {column_ids[j] for j in pos}
            mask &= torch.tensor([c not in same for c in column_ids], dtype=torch.bool)
        negatives = logits[b][mask]
        per_positive = [torch.logsumexp(torch.cat([logits[b, j : j + 1], negatives]), dim=0) - logits[b, j] for j in pos]
        losses.append(torch.stack(per_positive).mean())
    if not losses:
        raise RagopsError("aar: a batch without any positive passage")
    return torch.stack(losses).mean()


class AARTask:
    """AAR's contrastive objective over precomputed positives/negatives, as a `TrainingTask`."""

    def __init__(self, setup: RetrieverSetup, examples: list[dict[str, Any]], dev: list[dict[str, Any]], options: AAROptions, seed: int, meter: Any) -> None:
        from ragops.training.loop import cycle_batches

        self.setup, self.examples, self.dev, self.options, self.meter = setup, examples, dev, options, meter
        self.batches = cycle_batches(len(examples), options.train.batch_size, seed)

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.setup.retriever.modules()

    def param_groups(self) -> None:
        return None

    def micro_batch(self, step: int, micro: int) -> list[dict[str, Any]]:
        return [self.examples[i] for i in self.batches(step * self.options.train.grad_accum + micro)]

    def _loss(self, batch: list[dict[str, Any]]) -> torch.Tensor:
        rows, positives = [], []
        for example in batch:
            start = len(rows)
            rows.extend(example["positives"])
            positives.append(list(range(start, len(rows))))
            rows.extend(example["negatives"])
        if self.meter is not None:
            self.meter.add(examples=len(batch))
        queries = self.setup.retriever.embed_queries([e["query"] for e in batch])
        passages = self.setup.retriever.embed_passages([self.setup.table.texts[r] for r in rows])
        return contrastive_loss(queries, passages, positives, self.options.temperature, column_ids=rows)

    def loss(self, batch: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self._loss(batch)
        return loss, {"train/contrastive": float(loss.detach())}

    def evaluate(self) -> dict[str, float]:
        if not self.dev:
            return {}
        return {"dev/loss": float(self._loss(self.dev))}

    def after_step(self, step: int) -> dict[str, float]:  # noqa: ARG002 - AAR trains against a fixed candidate set
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AAR(InContextRALM):
    name = "aar"
    family = "black-box"
    finetune = "retriever"
    Options = AAROptions
    options: AAROptions

    def load_proxy(self) -> CausalLM:
        """The proxy LM, loaded on its own: training never touches the target LM (`self.lm`)."""
        from ragops.architectures.base import lm_path
        from ragops.lm.model import CausalLM

        config = self.ctx.config
        location = lm_path(self.ctx.ws, config) if self.options.proxy_model == DEFAULT_MODEL else self.options.proxy_model
        try:
            return CausalLM.from_config(config.lm, location)
        except RagopsError as error:
            raise ConfigError(f"architectures.{self.name}.proxy_model: {error}") from None

    def _preferences(self, proxy: CausalLM, examples: list[RetrievalExample], setup: RetrieverSetup, run: TrainRun) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Positives and hard negatives per question, from the proxy's attention (cached on disk)."""
        from ragops.architectures.base import _progress
        from ragops.pipeline import code_fingerprint
        from ragops.io import json_hash, path_hash
        from ragops.training.teachers import PairScoreCache

        opt = self.options
        meta = {"proxy": opt.proxy_model, "lm": self.ctx.config.section("lm"), "n": opt.n_candidates, "passage_tokens": opt.passage_tokens,
                "orders": opt.orders, "score": opt.score, "prompts": code_fingerprint(["architectures/prompts.py", "training/teachers.py"]),
                "chunks": path_hash(self.ctx.ws.chunks), "index": path_hash(self.ctx.ws.index_dir / "meta.json")}
        cache = PairScoreCache(self.ctx.ws.cache_dir / "teacher" / f"{self.name}-{json_hash(meta)[:16]}.json", meta)
        candidates = setup.candidates(examples, opt.n_candidates)
        table = setup.table
        out, agree, seen = [], 0, 0
        bar = _progress(self.progress, len(examples), f"{self.name}: proxy attention")
        for example, rows in zip(examples, candidates, strict=True):
            keys = [PairScoreCache.key(example.example_id, table.chunk_ids[r]) for r in rows]
            scores, found = cache.lookup(keys)
            if not found.all():
                texts = [proxy.decode(proxy.encode(table.texts[r])[: opt.passage_tokens]) for r in rows]
                with proxy.charged_to(run.meter):
                    total = proxy_attention_scores(proxy, example.question, texts, example.target, opt.score)
                    if opt.orders == 2:
                        total = (total + proxy_attention_scores(proxy, example.question, texts[::-1], example.target, opt.score)[::-1]) / 2
                scores = np.asarray(total, dtype=np.float64)
                cache.store(keys, scores.tolist())
            ranked = [rows[i] for i in np.argsort(-scores, kind="stable")]
            preferred = ranked[: opt.top_attention]
            gold = [r for r in rows if table.doc_ids[r] == example.gold_doc_id]
            if not gold and example.gold_doc_id:
                gold = table.doc_rows(example.gold_doc_id).tolist()[:1]  # the gold article's passage, retrieved or not
            if example.gold_doc_id:
                seen += 1
                agree += int(any(table.doc_ids[r] == example.gold_doc_id for r in preferred))
            if opt.positives == "gold_only":
                positives = gold
            elif opt.positives == "attention_only":
                positives = preferred
            else:
                positives = list(dict.fromkeys([*preferred, *gold]))
            negatives = [r for r in rows if r not in positives]
            if positives:
                out.append({"id": example.example_id, "query": example.query, "positives": positives, "negatives": negatives})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        cache.save()
        stats = {"gold_agreement": agree / seen if seen else float("nan"), "questions": len(examples), "with_positives": len(out),
                 "proxy_cache_hits": cache.hits, "proxy_cache_misses": cache.misses}
        return out, stats

    def train(self, run: TrainRun) -> dict[str, Any]:
        from ragops.training.retriever import RetrieverSetup, retrieval_examples, write_trained_retriever

        opt, ws, config = self.options, self.ctx.ws, self.ctx.config
        if opt.retriever == "bm25":
            raise ConfigError(f"architectures.{self.name}.retriever: bm25 cannot be trained (use dense or hybrid)")
        proxy = self.load_proxy()
        train, dev = retrieval_examples(ws, qa_per_task=opt.qa_examples, lm_windows=0, encode=proxy.encode, decode=proxy.decode,
                                        prefix_tokens=1, target_tokens=1, seed=config.seed, dev_fraction=opt.dev_fraction)
        setup = RetrieverSetup(ws, config, "shared", meter=run.meter, device=run.device, refresh_mode="sync")
        train_pref, stats = self._preferences(proxy, train, setup, run)
        dev_pref, _ = self._preferences(proxy, dev, setup, run) if dev else ([], {})
        if not train_pref:
            raise RagopsError(f"architectures.{self.name}: no training question has a positive passage")
        del proxy
        if run.report is not None:
            run.report(0, {"train/gold_agreement": stats["gold_agreement"]})
        task = AARTask(setup, train_pref, dev_pref, opt, config.seed, run.meter)
        result = run.train(task, opt.train, seed=config.seed, desc=f"{self.name}: training")

        def write(tmp):
            index_meta = write_trained_retriever(tmp / "retriever", setup, meter=run.meter, progress=self.progress)
            return {"training": result.summary(), "preferences": stats, "examples": {"train": len(train_pref), "dev": len(dev_pref)},
                    "objective": {"positives": opt.positives, "score": opt.score, "top_attention": opt.top_attention,
                                  "temperature": opt.temperature, "n_candidates": opt.n_candidates, "orders": opt.orders},
                    "index": {"count": index_meta["count"], "factory": index_meta["factory"]},
                    "trainable_params": setup.retriever.trainable_parameters}

        manifest = self.save_artifacts(write, truncated=result.truncated)
        return manifest["info"]
