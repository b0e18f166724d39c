"""A causal LM wrapper built for evaluation throughput on a small CPU.

What it does beyond `model(...)`:
- `score`: per-token log-probs of continuations given contexts. Context and continuation are
  tokenised separately and their ids concatenated, so the boundary is exact; the context is
  left-truncated to fit `max_length`. Sequences are sorted by length and packed into batches of at
  most `batch_tokens` padded tokens. The vocabulary projection (a fifth of SmolLM2's forward FLOPs)
  runs only on the positions that are scored, and the log-softmax runs in row chunks so a batch
  never materialises [batch, length, vocab] logits.
- A context shared by several continuations is run once; its KV cache is reused for each
  continuation (`score` groups identical contexts; `score_and_generate` scores a gold answer and
  generates from the same prompt with one prompt forward).
- `generate`: greedy, batched with left padding, KV cache, stop strings, finished rows dropped.
- `counters`: tokens through the model, padding, scored and generated tokens, FLOPs
  (`ragops.cost.forward_flops`), so callers can charge a `CostMeter` exactly.

torch and transformers are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragops.cost import forward_flops
from ragops.errors import ConfigError, RagopsError

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
MIN_SHARED_CONTEXT = 16  # tokens: shorter shared contexts are recomputed per continuation


@dataclass
class LMCounters:
    """Cumulative work done by one CausalLM (take a `snapshot()` before, subtract after)."""

    tokens_forward: int = 0  # real (non-padding) tokens run through the model; a cached prefix counts once
    tokens_padded: int = 0  # padding positions computed anyway
    tokens_scored: int = 0  # continuation tokens whose log-prob was returned
    tokens_generated: int = 0
    forward_passes: int = 0
    flops: float = 0.0

    def snapshot(self) -> LMCounters:
        return LMCounters(**asdict(self))

    def since(self, before: LMCounters) -> dict[str, float]:
        now, then = asdict(self), asdict(before)
        return {key: now[key] - then[key] for key in now}


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RagopsError(f"lm.device '{device}': CUDA is not available on this machine")
    return device


PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(precision: str, device: str) -> str:
    """`lm.precision` for this machine: `auto` is bfloat16 where the hardware multiplies bf16
    natively (a CPU with AVX512-BF16 or AMX; a CUDA GPU with bf16), else float32 (elsewhere bf16 is
    emulated and slower than float32)."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"lm.precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bfloat16" if native else "float32"


class CausalLM:
    """Scoring and greedy generation over a Hugging Face causal LM (see the module docstring).

    `precision="bfloat16"` runs the matrix multiplies of every read (scoring, generation, attention
    read-outs) under bf16 autocast, the weights staying as loaded: ~2.6x the float32 speed on a CPU
    with AVX512-BF16, at a cost of ~0.03 nats/token of noise and a +0.004 nats/token bias in NLL
    (SmolLM2, 30 held-out articles). Log-probs are always taken from float32 logits.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, max_length: int = 1024, batch_tokens: int = 4096, name: str = "", start_token: str = "separator",
        precision: str = "float32",
    ) -> None:
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device.type)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_length = int(min(max_length, limit)) if limit else int(max_length)
        self.batch_tokens = int(batch_tokens)
        self.counters = LMCounters()
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        if self._head is None:
            raise RagopsError(f"{self.name}: the model has no output embedding (not a causal LM?)")
        for attribute in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attribute, None):
                raise RagopsError(f"{self.name}: {attribute} is not supported by ragops' scoring path")
        params = list(inspect.signature(self._base.forward).parameters)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.refresh_vocabulary()
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_id = int(start if start is not None else 0)  # before an empty prompt (never a document)
        self.start_token = start_token
        self.document_start = document_start_ids(tokenizer, start_token, self.name)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.start_id)
        eos = getattr(model.generation_config, "eos_token_id", None) if getattr(model, "generation_config", None) else None
        eos_ids = {tokenizer.eos_token_id} | (set(eos) if isinstance(eos, (list, tuple)) else {eos})
        self.eos_ids = {int(i) for i in eos_ids if i is not None}
        self._torch = torch

    def refresh_vocabulary(self) -> None:
        """Re-read sizes after the model changed (e.g. embeddings resized for added tokens)."""
        import torch

        model = self.model
        self._head = model.get_output_embeddings()
        config = model.config
        self.n_params = int(sum(p.numel() for p in model.parameters()))
        self.n_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
        self.d_model = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
        self.vocab_size = int(self._head.weight.shape[0])
        head_params = int(self._head.weight.numel())
        embeddings = model.get_input_embeddings()
        tied = embeddings is not None and embeddings.weight.data_ptr() == self._head.weight.data_ptr()
        # Every embedding table (tokens, and learned positions as in GPT-2) is a lookup, not a matmul.
        tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        if embeddings is not None:
            tables.setdefault(id(embeddings.weight), embeddings.weight.numel())
        embed_params = int(sum(tables.values()))
        # Embedding lookups cost nothing; the vocabulary projection is charged per scored position.
        self._body_params = self.n_params - embed_params - (0 if tied else head_params)
        self._head_params = head_params

    def compute(self):
        """The numeric precision of a read: bf16 autocast (`precision="bfloat16"`) or plain float32.
        Code that runs the model's layers itself (RETRO's chunked cross-attention) reads under it too."""
        if self.precision == "bfloat16":
            return self._torch.autocast(device_type=self.device.type, dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    def project(self, hidden):
        """float32 next-token logits of hidden states (the vocabulary projection, at `precision`)."""
        with self.compute():
            return self._head(hidden).float()

    # --- cost accounting ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def charged_to(self, meter: Any):
        """Charge the LM work done inside the block (tokens scored and generated, FLOPs) to `meter`
        (a `ragops.cost.CostMeter`; None charges nothing). The one place LM work reaches a meter."""
        before = self.counters.snapshot()
        try:
            yield
        finally:
            if meter is not None:
                spent = self.counters.since(before)
                meter.add(tokens_scored=spent["tokens_scored"], tokens_generated=spent["tokens_generated"], flops=spent["flops"])

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        threads: int | None = None,
        dtype: str = "float32",
        max_length: int = 1024,
        batch_tokens: int = 4096,
        start_token: str = "separator",
        precision: str = "float32",
    ) -> CausalLM:
        """Load a prepared folder (see `prepare_lm`) or any local/offline HF causal LM."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise RagopsError(f"lm.dtype '{dtype}': expected one of {', '.join(_DTYPES)}")
        if threads:
            torch.set_num_threads(int(threads))
        device = resolve_device(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, _DTYPES[dtype]))
        except (OSError, ValueError) as error:
            raise RagopsError(f"{path}: cannot load the language model ({str(error).splitlines()[0]})") from None
        model.to(device)
        return cls(model, tokenizer, max_length=max_length, batch_tokens=batch_tokens, name=str(path), start_token=start_token,
                   precision=precision)

    @classmethod
    def from_config(cls, lm_config: Any, path: str | Path) -> CausalLM:
        """Load with the settings of an `LMConfig` section."""
        return cls.load(
            path,
            device=lm_config.device,
            threads=lm_config.threads,
            dtype=lm_config.dtype,
            max_length=lm_config.max_length,
            batch_tokens=lm_config.batch_tokens,
            start_token=lm_config.start_token,
            precision=lm_config.precision,
        )

    # --- tokens ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        out = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [list(ids) if text else [] for ids, text in zip(out, texts, strict=True)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @property
    def chat_formatter(self):
        """user message -> prompt in the tokenizer's chat template (assistant header last), or None
        when the tokenizer has no chat template (a plain LM)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None

        def format_chat(user: str) -> str:
            messages = [{"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        return format_chat

    # --- scoring ----------------------------------------------------------------------------------------
    def score(self, contexts: Sequence[str], continuations: Sequence[str], progress: bool = False) -> list[np.ndarray]:
        """Per-token log-probs (natural log) of each continuation given its context."""
        if len(contexts) != len(continuations):
            raise ValueError(f"score: {len(contexts)} contexts but {len(continuations)} continuations")
        unique = list(dict.fromkeys(contexts))
        encoded = dict(zip(unique, self.encode_batch(unique), strict=True))
        return self.score_ids([encoded[c] for c in contexts], self.encode_batch(continuations), progress=progress)

    def score_ids(
        self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], progress: bool = False
    ) -> list[np.ndarray]:
        """`score` on token ids. An empty context means "start of text" (the BOS, else EOS, token)."""
        if len(contexts) != len(continuations):
            raise ValueError(f"score_ids: {len(contexts)} contexts but {len(continuations)} continuations")
        results: list[np.ndarray | None] = [None] * len(contexts)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
            if not continuation:
                results[i] = np.zeros(0, dtype=np.float32)
                continue
            if len(continuation) > self.max_length - 1:
                raise RagopsError(
                    f"a continuation of {len(continuation)} tokens does not fit lm.max_length={self.max_length}; "
                    "score it in windows"
                )
            groups.setdefault(tuple(context) if context else (self.start_id,), []).append(i)
        # Reusing a context's cache pays when the context is long; a short one (e.g. the start token
        # before whole documents) is cheaper to recompute than to pad continuations around.
        singles = [(ctx, i) for ctx, members in groups.items() if len(members) == 1 or len(ctx) < MIN_SHARED_CONTEXT for i in members]
        shared = [(ctx, members) for ctx, members in groups.items() if len(members) > 1 and len(ctx) >= MIN_SHARED_CONTEXT]
        bar = _bar(progress, len(contexts) - sum(r is not None for r in results), "scoring")
        try:
            self._score_singles(singles, continuations, results, bar)
            self._score_shared(shared, continuations, results, bar)
        finally:
            if bar is not None:
                bar.close()
        if any(r is None for r in results):
            raise RuntimeError("internal error: a continuation was not scored")
        return results  # type: ignore[return-value]

    def _score_singles(self, items, continuations, results, bar) -> None:
        torch = self._torch
        sequences = []
        for context, index in items:
            cont = list(continuations[index])
            ctx = list(context)[-(self.max_length - len(cont)) :]
            sequences.append((ctx + cont, len(cont), index, len(ctx)))
        sequences.sort(key=lambda s: len(s[0]), reverse=True)
        for batch in self._batches(sequences, lambda s: len(s[0])):
            width = len(batch[0][0])
            ids, mask, positions = self._left_pad([s[0] for s in batch], width)
            with torch.inference_mode():
                hidden = self._forward(ids, mask, positions)[0]
            rows, cols, targets = [], [], []
            for r, (seq, n_cont, _, _) in enumerate(batch):
                start = width - n_cont  # index of the first continuation token
                rows.extend([r] * n_cont)
                cols.extend(range(start - 1, width - 1))
                targets.extend(seq[-n_cont:])
            logprobs = self._logprobs(hidden[rows, cols], targets)
            offset = 0
            for seq, n_cont, index, n_ctx in batch:
                results[index] = logprobs[offset : offset + n_cont]
                offset += n_cont
                self._charge(n_new=len(seq), past=0, n_logits=n_cont)
            self.counters.tokens_padded += len(batch) * width - sum(len(s[0]) for s in batch)
            self.counters.tokens_scored += sum(s[1] for s in batch)
            if bar is not None:
                bar.update(len(batch))

    def _score_shared(self, groups, continuations, results, bar) -> None:
        """Contexts with several continuations: one prefix forward, the cache reused by each continuation."""
        torch = self._torch
        prepared = []
        for context, members in groups:
            longest = max(len(continuations[i]) for i in members)
            prepared.append((list(context)[-(self.max_length - longest) :], members))
        prepared.sort(key=lambda p: len(p[0]), reverse=True)
        for batch in self._batches(prepared, lambda p: len(p[0])):
            width = len(batch[0][0])
            ids, mask, positions = self._left_pad([p[0] for p in batch], width)
            with torch.inference_mode():
                hidden, cache = self._forward(ids, mask, positions, use_cache=True)
            for p in batch:
                self._charge(n_new=len(p[0]), past=0, n_logits=0)
            self.counters.tokens_padded += len(batch) * width - sum(len(p[0]) for p in batch)
            last = hidden[:, -1]
            rows = [(r, i) for r, (_, members) in enumerate(batch) for i in members]
            # Continuations in chunks whose attention span (prefix + continuation) fits the token budget.
            rows.sort(key=lambda ri: len(continuations[ri[1]]), reverse=True)
            chunk: list[tuple[int, int]] = []
            for row in rows:
                longest = width + len(continuations[chunk[0][1]]) if chunk else 0
                if chunk and (
                    (len(chunk) + 1) * longest > self.batch_tokens
                    or width + len(continuations[row[1]]) < 0.75 * longest
                ):
                    self._continue_rows(chunk, last, cache, mask, batch, continuations, results)
                    if bar is not None:
                        bar.update(len(chunk))
                    chunk = []
                chunk.append(row)
            if chunk:
                self._continue_rows(chunk, last, cache, mask, batch, continuations, results)
                if bar is not None:
                    bar.update(len(chunk))

    def _continue_rows(self, chunk, last, cache, prefix_mask, batch, continuations, results) -> None:
        torch = self._torch
        index = torch.tensor([r for r, _ in chunk], device=self.device)
        conts = [list(continuations[i]) for _, i in chunk]
        first_lp = self._logprobs(last[index], [c[0] for c in conts])
        body = [c[:-1] for c in conts]  # the last continuation token predicts nothing we need
        longest = max(len(b) for b in body)
        rest = None
        if longest:
            ids = torch.full((len(chunk), longest), self.pad_id, dtype=torch.long)
            cmask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for r, b in enumerate(body):
                ids[r, : len(b)] = torch.tensor(b, dtype=torch.long)
                cmask[r, : len(b)] = 1
            pmask = prefix_mask[index.cpu()] if prefix_mask is not None else torch.ones((len(chunk), cache_len(cache)), dtype=torch.long)
            full_mask = torch.cat([pmask.cpu(), cmask], dim=1)
            plen = pmask.sum(dim=1, keepdim=True).cpu()
            positions = plen + torch.arange(longest).unsqueeze(0)
            sub = select_cache(cache, index)
            with torch.inference_mode():
                hidden = self._forward(ids, full_mask, positions, cache=sub)[0]
            rows, cols, targets = [], [], []
            for r, c in enumerate(conts):
                rows.extend([r] * (len(c) - 1))
                cols.extend(range(len(c) - 1))
                targets.extend(c[1:])
            rest = self._logprobs(hidden[rows, cols], targets) if targets else None
            self.counters.tokens_padded += len(chunk) * longest - sum(len(b) for b in body)
        offset = 0
        for r, ((row, i), c) in enumerate(zip(chunk, conts, strict=True)):
            n_rest = len(c) - 1
            tail = rest[offset : offset + n_rest] if n_rest else np.zeros(0, dtype=np.float32)
            offset += n_rest
            results[i] = np.concatenate([first_lp[r : r + 1], tail]).astype(np.float32)
            past = len(batch[row][0])
            self._charge(n_new=n_rest, past=past, n_logits=len(c))
            self.counters.tokens_scored += len(c)

    # --- generation ---------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 16, stop: Sequence[str] = ("\n",), progress: bool = False
    ) -> list[str]:
        """Greedy continuations of each prompt, cut at the first stop string (see `score_and_generate`)."""
        return self.score_and_generate(prompts, None, max_new_tokens=max_new_tokens, stop=stop, progress=progress)[1]

    def score_and_generate(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str] | None,
        max_new_tokens: int = 16,
        stop: Sequence[str] = ("\n",),
        progress: bool = False,
    ) -> tuple[list[np.ndarray], list[str]]:
        """Score `continuations[i]` given `prompts[i]` and generate from the same prompt, one prompt forward.

        Generation is greedy and batched (left padding, KV cache). It ends at an EOS token, after
        `max_new_tokens`, or at the first stop string found after any leading whitespace (so a
        model that opens its answer with a newline still answers); the stop string is not returned.
        """
        prompt_ids = self.encode_batch(list(prompts))
        cont_ids = self.encode_batch(list(continuations)) if continuations is not None else None
        return self.score_and_generate_ids(prompt_ids, cont_ids, max_new_tokens=max_new_tokens, stop=stop, progress=progress)

    def score_and_generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]] | None,
        max_new_tokens: int = 16,
        stop: Sequence[str] = ("\n",),
        progress: bool = False,
    ) -> tuple[list[np.ndarray], list[str]]:
        torch = self._torch
        n = len(prompts)
        if continuations is not None and len(continuations) != n:
            raise ValueError(f"{n} prompts but {len(continuations)} continuations")
        conts = [list(c) for c in continuations] if continuations is not None else [[] for _ in range(n)]
        items = []
        for i, prompt in enumerate(prompts):
            reserve = max(max_new_tokens, len(conts[i]))
            if reserve > self.max_length - 1:
                raise RagopsError(f"max_new_tokens/continuation of {reserve} tokens does not fit lm.max_length={self.max_length}")
            ids = list(prompt) if prompt else [self.start_id]
            items.append((ids[-(self.max_length - reserve) :], i))
        items.sort(key=lambda it: len(it[0]), reverse=True)
        scores: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
        texts = [""] * n
        bar = _bar(progress, n, "generating")
        # Looser padding limit: every extra batch costs max_new_tokens more (memory-bound) decode steps.
        for batch in self._batches(items, lambda it: len(it[0]) + max_new_tokens, max_padding=0.5 if max_new_tokens else 0.25):
            width = len(batch[0][0])
            ids, mask, positions = self._left_pad([it[0] for it in batch], width)
            with torch.inference_mode():
                hidden, cache = self._forward(ids, mask, positions, use_cache=True)
            for it in batch:
                self._charge(n_new=len(it[0]), past=0, n_logits=1)
            self.counters.tokens_padded += len(batch) * width - sum(len(it[0]) for it in batch)
            last = hidden[:, -1]
            if continuations is not None:
                chunk = [(r, it[1]) for r, it in enumerate(batch) if conts[it[1]]]
                if chunk:
                    holder: list[Any] = [None] * n
                    self._continue_rows(chunk, last, cache, mask, batch, conts, holder)
                    for _, i in chunk:
                        scores[i] = holder[i]
            if max_new_tokens > 0:
                outs = self._greedy(last, cache, mask, [len(it[0]) for it in batch], max_new_tokens, stop)
                for (_, i), text in zip(batch, outs, strict=True):
                    texts[i] = text
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return scores, texts

    def _greedy(self, last_hidden, cache, prefix_mask, prompt_lens, max_new_tokens, stop, choose=None) -> list[str]:
        """Greedy decoding from a prompt forward's last hidden states and cache.

        `choose(logits [n_alive, vocab], alive_rows) -> next token per alive row` is the per-step
        next-token hook (default: each row's argmax); ensemble decoding passes one that mixes the
        rows of a question and gives them all the same token."""
        torch = self._torch
        n = last_hidden.shape[0]
        generated: list[list[int]] = [[] for _ in range(n)]
        texts = [""] * n
        alive = list(range(n))  # batch rows still generating, in cache order
        with torch.inference_mode():
            logits = self.project(last_hidden)
        mask = prefix_mask.cpu() if prefix_mask is not None else torch.ones((n, cache_len(cache)), dtype=torch.long)
        lengths = torch.tensor(prompt_lens, dtype=torch.long)
        for step in range(max_new_tokens):
            next_ids = logits.argmax(dim=-1).tolist() if choose is None else list(choose(logits, alive))
            keep = []
            for row, token in zip(alive, next_ids, strict=True):
                if token in self.eos_ids:
                    continue
                generated[row].append(token)
                self.counters.tokens_generated += 1
                text = self.decode(generated[row])
                cut = _find_stop(text, stop)
                texts[row] = text if cut is None else text[:cut]
                if cut is None:
                    keep.append(row)
            if not keep or step == max_new_tokens - 1:
                break
            positions_in_batch = [alive.index(row) for row in keep]
            if len(keep) != len(alive):
                index = torch.tensor(positions_in_batch, device=self.device)
                cache = select_cache(cache, index)
                mask = mask[positions_in_batch]
                lengths = lengths[positions_in_batch]
            alive = keep
            ids = torch.tensor([[generated[row][-1]] for row in alive], dtype=torch.long)
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=torch.long)], dim=1)
            positions = lengths.unsqueeze(1) + step
            with torch.inference_mode():
                hidden, cache = self._forward(ids, mask, positions, cache=cache, use_cache=True)
                logits = self.project(hidden[:, -1])
            for row in alive:
                self._charge(n_new=1, past=int(lengths[alive.index(row)]) + step, n_logits=1)
        return texts

    # --- mixtures (REPLUG) -------------------------------------------------------------------------
    def score_and_generate_mixture(
        self,
        groups: Sequence[Sequence[Sequence[int]]],
        log_weights: Sequence[Sequence[float]],
        continuations: Sequence[Sequence[int]] | None,
        max_new_tokens: int = 16,
        stop: Sequence[str] = ("\n",),
        progress: bool = False,
    ) -> tuple[list[float], list[list[np.ndarray]], list[str]]:
        """A λ-weighted mixture over k prompts per question (REPLUG: one retrieved document per prompt).

        For question i with prompts `groups[i]` (token ids, one per document) and normalised
        log-weights `log_weights[i]` (log λ_d):
        - scoring, in probability space: log P(y | x) = logsumexp_d(log λ_d + log P_LM(y | d∘x)),
          with log P_LM(y | d∘x) the sum of the continuation's token log-probs under prompt d
          (never an average of logits);
        - ensemble decoding: at each step the next-token distribution is Σ_d λ_d P_LM(· | d∘x, y<t),
          its argmax is appended to all k rows of the question.
        Returns (mixture log-prob of each continuation, per-document token log-probs, generated text).
        Every row is run through the model: the cost is k prompts per question.
        """
        torch = self._torch
        n = len(groups)
        if len(log_weights) != n or (continuations is not None and len(continuations) != n):
            raise ValueError(f"score_and_generate_mixture: {n} groups, {len(log_weights)} weight rows, continuations for {None if continuations is None else len(continuations)}")
        conts = [list(c) for c in continuations] if continuations is not None else [[] for _ in range(n)]
        prepared = []
        for i, (prompts, weights) in enumerate(zip(groups, log_weights, strict=True)):
            if len(prompts) == 0 or len(prompts) != len(weights):
                raise ValueError(f"group {i}: {len(prompts)} prompts and {len(weights)} weights")
            reserve = max(max_new_tokens, len(conts[i]))
            if reserve > self.max_length - 1:
                raise RagopsError(f"max_new_tokens/continuation of {reserve} tokens does not fit lm.max_length={self.max_length}")
            rows = [(list(p) if p else [self.start_id])[-(self.max_length - reserve) :] for p in prompts]
            prepared.append((i, rows, np.asarray(weights, dtype=np.float64)))
        prepared.sort(key=lambda g: max(len(r) for r in g[1]), reverse=True)
        mixture = [0.0] * n
        per_doc: list[list[np.ndarray]] = [[] for _ in range(n)]
        texts = [""] * n
        bar = _bar(progress, n, "mixture")
        batches, current, width = [], [], 0
        for group in prepared:  # whole groups per batch: the mixture needs all k rows together
            longest = max(len(r) for r in group[1]) + max_new_tokens
            rows_now = sum(len(g[1]) for g in current)
            if current and (rows_now + len(group[1])) * max(width, longest) > self.batch_tokens:
                batches.append(current)
                current, width = [], 0
            current.append(group)
            width = max(width, longest)
        if current:
            batches.append(current)
        for batch in batches:
            flat = [(gi, d, row) for gi, (_, rows, _) in enumerate(batch) for d, row in enumerate(rows)]
            width = max(len(row) for _, _, row in flat)
            ids, mask, positions = self._left_pad([row for _, _, row in flat], width)
            with torch.inference_mode():
                hidden, cache = self._forward(ids, mask, positions, use_cache=True)
            for _, _, row in flat:
                self._charge(n_new=len(row), past=0, n_logits=1)
            self.counters.tokens_padded += len(flat) * width - sum(len(row) for _, _, row in flat)
            last = hidden[:, -1]
            row_owner = [batch[gi][0] for gi, _, _ in flat]
            if continuations is not None:
                chunk = [(r, r) for r in range(len(flat)) if conts[row_owner[r]]]
                if chunk:
                    holder: list[Any] = [None] * len(flat)
                    row_conts = [conts[row_owner[r]] for r in range(len(flat))]
                    self._continue_rows(chunk, last, cache, mask, [(row, None) for _, _, row in flat], row_conts, holder)
                    for r, (gi, d, _) in enumerate(flat):
                        i = batch[gi][0]
                        per_doc[i].append(holder[r] if holder[r] is not None else np.zeros(0, dtype=np.float32))
                    for gi, (i, _, weights) in enumerate(batch):
                        totals = np.array([float(lp.sum()) for lp in per_doc[i]], dtype=np.float64)
                        mixture[i] = float(_logsumexp(weights + totals))
            if max_new_tokens > 0:
                log_w = torch.tensor([batch[gi][2][d] for gi, d, _ in flat], dtype=torch.float32)
                group_of = [gi for gi, _, _ in flat]

                def choose(logits, alive, log_w=log_w, group_of=group_of):
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    out = [0] * len(alive)
                    members: dict[int, list[int]] = {}
                    for position, row in enumerate(alive):
                        members.setdefault(group_of[row], []).append(position)
                    for positions_of_group in members.values():
                        rows = torch.tensor([alive[p] for p in positions_of_group])
                        mixed = torch.logsumexp(logp[positions_of_group] + log_w[rows].unsqueeze(1), dim=0)
                        token = int(mixed.argmax())
                        for p in positions_of_group:
                            out[p] = token
                    return out

                outs = self._greedy(last, cache, mask, [len(row) for _, _, row in flat], max_new_tokens, stop, choose=choose)
                for r, (gi, d, _) in enumerate(flat):
                    if d == 0:
                        texts[batch[gi][0]] = outs[r]
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return mixture, per_doc, texts

    # --- read-outs for white-box methods -----------------------------------------------------------
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], token_ids: Sequence[int]) -> np.ndarray:
        """log P(t | prompt) for each candidate token t (over the full vocabulary): [n_prompts, len(token_ids)].
        SELF-RAG reads its reflection tokens' probabilities this way."""
        torch = self._torch
        out = np.zeros((len(prompts), len(token_ids)), dtype=np.float32)
        items = sorted(((list(p)[-(self.max_length - 1) :] or [self.start_id], i) for i, p in enumerate(prompts)), key=lambda it: -len(it[0]))
        wanted = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        for batch in self._batches(items, lambda it: len(it[0])):
            width = len(batch[0][0])
            ids, mask, positions = self._left_pad([it[0] for it in batch], width)
            with torch.inference_mode():
                hidden = self._forward(ids, mask, positions)[0][:, -1]
                logp = torch.log_softmax(self.project(hidden), dim=-1)[:, wanted]
            for it in batch:
                self._charge(n_new=len(it[0]), past=0, n_logits=1)
            self.counters.tokens_padded += len(batch) * width - sum(len(it[0]) for it in batch)
            for r, (_, i) in enumerate(batch):
                out[i] = logp[r].cpu().numpy()
        return out

    def attention(self, ids: Sequence[int], query_positions: Sequence[int], value_norms: bool = False) -> dict[str, np.ndarray]:
        """Self-attention of the positions `query_positions` of one sequence, from every layer and head.

        Returns {"weights": [layers, heads, n_query, seq]} (post-softmax probabilities) and, with
        `value_norms`, {"value_norms": [layers, heads, seq]} (‖v_j‖ per key position and head, GQA
        key/value heads repeated to the query heads) — AAR's and Atlas ADist's signals. Runs the
        eager attention kernel for this call (sdpa returns no weights), so it costs a bit more
        than a scoring forward; one sequence per call, so no padding mask is involved.
        """
        torch = self._torch
        ids = list(ids)[-self.max_length :]
        rows = torch.tensor(list(query_positions), dtype=torch.long)
        config = self.model.config
        previous = getattr(config, "_attn_implementation", "sdpa")
        captured: list[Any] = []
        hooks = []
        if value_norms:
            layers = getattr(self._base, "layers", None)
            if layers is None:
                raise RagopsError(f"{self.name}: value norms need a Llama-style model (decoder .layers[i].self_attn.v_proj)")
            for layer in layers:
                hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, out: captured.append(out.detach())))
        try:
            self.model.set_attn_implementation("eager")
            with torch.inference_mode(), self.compute():
                out = self._base(input_ids=torch.tensor([ids], device=self.device), output_attentions=True)
        finally:
            self.model.set_attn_implementation(previous)
            for hook in hooks:
                hook.remove()
        self._charge(n_new=len(ids), past=0, n_logits=0)
        weights = torch.stack([a[0][:, rows.to(a.device), :] for a in out.attentions]).float().cpu().numpy()
        result = {"weights": weights}
        if value_norms:
            n_heads = weights.shape[1]
            norms = []
            for values in captured:
                v = values[0].float()  # [seq, kv_heads * head_dim]
                kv_heads = int(getattr(config, "num_key_value_heads", n_heads) or n_heads)
                per_head = v.view(v.shape[0], kv_heads, -1).norm(dim=-1).T  # [kv_heads, seq]
                norms.append(per_head.repeat_interleave(n_heads // kv_heads, dim=0))
            result["value_norms"] = torch.stack(norms).cpu().numpy()
        return result

    # --- perplexity helpers ---------------------------------------------------------------------------
    @property
    def document_start_text(self) -> str:
        """The start-token convention in words, for the record (an MLflow param)."""
        if not self.document_start:
            return "none (no start token; a document's first token is context only, never scored)"
        return " ".join(self.tokenizer.convert_ids_to_tokens(self.document_start))

    def document_windows(self, ids: Sequence[int], stride: int | None = None) -> list[tuple[list[int], list[int]]]:
        """`document_windows` of `ids` under this LM's start-token convention and `max_length`."""
        return document_windows(list(ids), self.max_length, self.document_start, stride)

    def token_logprobs(self, ids: Sequence[int], stride: int | None = None) -> np.ndarray:
        """Log-prob of every scored token of document `ids` (see `document_windows`: all of them
        after the start token, or all but the first without one), in windows of at most
        `max_length` tokens that advance by `stride`, each token scored once with as much left
        context as fits."""
        return self.token_logprobs_batch([ids], stride=stride)[0]

    def token_logprobs_batch(self, docs: Sequence[Sequence[int]], stride: int | None = None, progress: bool = False) -> list[np.ndarray]:
        contexts, continuations, owners = [], [], []
        for d, ids in enumerate(docs):
            for context, target in self.document_windows(ids, stride):
                contexts.append(context)
                continuations.append(target)
                owners.append(d)
        scored = self.score_ids(contexts, continuations, progress=progress)
        out: list[list[np.ndarray]] = [[] for _ in docs]
        for owner, lp in zip(owners, scored, strict=True):
            out[owner].append(lp)
        return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32) for parts in out]

    def perplexity(self, texts: Sequence[str], stride: int | None = None) -> dict[str, float]:
        """Corpus-level token and word perplexity of `texts` (total NLL / tokens, / whitespace words)."""
        docs = self.encode_batch(list(texts))
        logprobs = self.token_logprobs_batch(docs, stride=stride)
        nll = -float(sum(lp.sum() for lp in logprobs))
        tokens = sum(len(lp) for lp in logprobs)
        words = sum(len(t.split()) for t in texts)
        return {
            "nll": nll,
            "tokens": tokens,
            "words": words,
            "token_ppl": math.exp(nll / max(tokens, 1)),
            "word_ppl": math.exp(nll / max(words, 1)),
        }

    # --- internals -------------------------------------------------------------------------------------
    def _batches(self, items: list, length, max_padding: float = 0.25) -> list[list]:
        """Consecutive groups of `items` (sorted longest first) of at most `batch_tokens` padded
        tokens. A group also ends before an item that would be more than `max_padding` padding:
        on a CPU a batch of a few hundred tokens already keeps the matrix units busy, so a smaller
        batch costs less than computing padding."""
        batches, current = [], []
        for item in items:
            width = length(current[0]) if current else length(item)
            if current and ((len(current) + 1) * width > self.batch_tokens or length(item) < (1 - max_padding) * width):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    def _left_pad(self, seqs: list[list[int]], width: int):
        torch = self._torch
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            if seq:
                ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[r, width - len(seq) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids, (None if bool(mask.all()) else mask), positions

    def _forward(self, ids, mask, positions, cache=None, use_cache: bool = False):
        self.counters.forward_passes += 1
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "position_ids": positions.to(self.device),
            "use_cache": use_cache or cache is not None,
        }
        if mask is not None and not bool(mask.all()):
            kwargs["attention_mask"] = mask.to(self.device)
        if cache is not None:
            kwargs[self._cache_kw] = cache
        with self.compute():
            out = self._base(**kwargs)
        new_cache = getattr(out, "cache", None) if self._cache_kw == "cache" else getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    def _logprobs(self, hidden, targets: Sequence[int]) -> np.ndarray:
        """log p(target | hidden state) per row, the vocabulary projection run in row chunks."""
        torch = self._torch
        if len(targets) == 0:
            return np.zeros(0, dtype=np.float32)
        target = torch.tensor(list(targets), dtype=torch.long, device=hidden.device)
        rows = max(1, (64 << 20) // (4 * self.vocab_size))  # ~64 MiB of float32 logits per chunk
        out = []
        with torch.inference_mode():
            for start in range(0, hidden.shape[0], rows):
                logits = self.project(hidden[start : start + rows])
                picked = logits.gather(1, target[start : start + rows, None]).squeeze(1)
                out.append(picked - torch.logsumexp(logits, dim=-1))
        return torch.cat(out).cpu().numpy().astype(np.float32)

    def _charge(self, n_new: int, past: int, n_logits: int) -> None:
        """Count one row's forward: `n_new` tokens after `past` cached ones, `n_logits` projected."""
        if n_new:
            context = past + (n_new + 1) / 2  # mean attention span of the new tokens
            self.counters.flops += forward_flops(self._body_params, n_new, self.n_layers, self.d_model, int(round(context)))
            self.counters.tokens_forward += n_new
        if n_logits:
            self.counters.flops += forward_flops(self._head_params, n_logits)


SEPARATOR_TOKENS = ("<|endoftext|>", "<|end_of_text|>")  # document separators of GPT-2/SmolLM2/Qwen, Llama 3


def document_start_ids(tokenizer: Any, start_token: str, name: str = "the LM") -> list[int]:
    """The token ids every scored document window begins with (`lm.start_token`):

    - `separator` (default): the document separator the model was pretrained with between
      documents: `<|endoftext|>` (GPT-2, SmolLM2, Qwen) or `<|end_of_text|>` (Llama 3) when the
      vocabulary has it, else the EOS token. Not the BOS of an instruct model's chat template
      (SmolLM2-Instruct's BOS is `<|im_start|>`, a chat-role token: 14.71 vs 13.05 token
      perplexity on the default held-out articles).
    - `bos` / `eos`: the tokenizer's BOS / EOS token.
    - `none`: no start token; a document's first token is context only and never scored (as the
      In-Context RALM reference code does).
    - any other string: that token, which must be one token of the vocabulary.
    """
    vocab = tokenizer.get_vocab()
    if start_token == "none":
        return []
    if start_token == "separator":
        token = next((t for t in SEPARATOR_TOKENS if t in vocab), tokenizer.eos_token)
    elif start_token == "bos":
        token = tokenizer.bos_token or tokenizer.eos_token
    elif start_token == "eos":
        token = tokenizer.eos_token
    else:
        token = start_token
    if token is None or token not in vocab:
        raise ConfigError(f"lm.start_token '{start_token}': {name} has no such token (use separator, bos, eos, none or one token of its vocabulary)")
    return [int(vocab[token])]


def document_windows(ids: list[int], max_length: int, start_ids: Sequence[int] = (), stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, target) pairs that score a document once, under a start-token convention.

    Every window's input is `start_ids` + document tokens, at most `max_length` tokens in all. With
    start tokens, every document token is scored, the first one given the start tokens alone.
    Without (`start_ids` empty), the first document token is context only: it has nothing to be
    predicted from. The first window scores as many tokens as fit; each next window advances by
    `stride` tokens (default: half a window) and keeps the preceding document tokens as context.
    """
    start = list(start_ids)
    first = 0 if start else 1  # the first scored token
    if len(ids) <= first:
        return []
    room = max_length - len(start)  # document tokens per window (context + target)
    if room < 2:
        raise ValueError(f"max_length {max_length} leaves no room for document tokens after {len(start)} start token(s)")
    stride = stride or max(1, room // 2)
    if stride >= room:
        raise ValueError(f"stride {stride} must be smaller than the window of {room} document tokens")
    end = min(room, len(ids))
    pairs = [(start + ids[:first], ids[first:end])]
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        begin = max(0, new_end - room)
        pairs.append((start + ids[begin:end], ids[end:new_end]))
        end = new_end
    return pairs


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    if not np.isfinite(top):
        return top
    return top + float(np.log(np.sum(np.exp(values - top))))


def cache_len(cache: Any) -> int:
    return int(cache.get_seq_length())


def select_cache(cache: Any, index: Any) -> Any:
    """A new cache holding rows `index` of `cache` (repeats allowed); `cache` itself is unchanged."""
    from transformers.cache_utils import DynamicCache

    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") for layer in layers):
        return DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in layers])
    import copy

    clone = copy.deepcopy(cache)
    clone.batch_select_indices(index)
    return clone


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    body = len(text) - len(text.lstrip())
    hits = [text.find(s, body) for s in stop if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _bar(progress: bool, total: int, desc: str):
    if not progress or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", leave=False)

