"""RETRO (Borgeaud et al. 2022), RETRO-fitted onto the pre-trained LM (SmolLM2 by default).

The LM is frozen. Two small trained parts are added (plain torch modules, attached to the HF
decoder with forward hooks, `RetroLM`):

- **chunked cross-attention (CCA)** after decoder layers `cca_layers` ("auto": 3 layers evenly
  spaced over the upper half, SmolLM2's 0-indexed 15, 22, 29; the 2-layer test model: layer 1). A
  CCA block adds attn(RMSNorm(h), neighbour encodings) to the layer's output (post-layer
  residual). Its output projection starts at zero, so before training the model's log-probs are
  the base LM's exactly (RETRO-fitting's starting point; the paper's models were trained from
  scratch, the zero start is our deviation);
- a **neighbour encoder**: `encoder_layers` (2) bidirectional pre-norm transformer layers at the
  LM's width over the neighbour tokens (the LM's frozen token embeddings + learned positions),
  each layer self-attention, cross-attention to the retrieving chunk's decoder hidden states at
  the first CCA layer (RETRO's conditioning), and an MLP. It runs once per forward, at the first
  CCA layer; every CCA block has its own key/value projections of its output.

Sequences are split into chunks of `chunk_size` = m tokens (32: held-out articles average ≈ 108
SmolLM2 tokens, so with RETRO's 64 only ≈ 40 % of their tokens could see any neighbour; with 16
the retrieval calls double for little gain). Each chunk C_u gets `k` (2) neighbours from the
frozen workspace dense retriever over the existing index, queried with the chunk's own text;
a neighbour = the retrieved chunk + its continuation (the next chunk of the same article in the
index, when there is one), cut to `neighbour_tokens` = r (64) LM tokens. Causality is RETRO's:
the neighbours of C_u are read from the last token of C_u onward (the m−1 shift), i.e. the token
at position t attends to the neighbours of chunk ⌊(t+1)/m⌋ − 1, so they only affect predictions
of tokens after C_u. Neighbour look-ups are cached on disk by content (query text and excluded
article; `shared.RetrievalCache`).

Training (train split only, `ragops.training.data` guards): the plain LM loss on (i) the text of
`lm_articles` trainable articles (held-out and dev/test articles never), each chunk's neighbours
excluding the article itself (RETRO's same-document filter) and (ii) `qa_examples` train-split
questions per QA task in the shared prompt (no passage text), loss on the gold answer + the
end-of-turn token, the question's neighbours attached as described below (a QA prompt is not an
article: its neighbours are retrieved as in evaluation, gold article included). Only the CCA
blocks and the encoder train (the shared `TrainRun` loop: checkpoints, resume, loss curves); they
are saved as safetensors with the base LM's fingerprint and refused for another base LM.

Evaluation, same metric keys as every architecture:
- `lm`: the closed book's windows (`CausalLM.document_windows`), each chunk's neighbours
  retrieved with the chunk's text — the article's own preceding text only (causal);
- QA: neighbours retrieved with the question text (as the dense retriever is used everywhere);
  the chat prompt (no passage text) is left-padded to a multiple of m, the neighbours belong to its
  last chunk, so the last prompt token and the answer's first m tokens read them. The gold-answer
  NLL is scored after that prompt as for every architecture; greedy generation keeps the
  question's neighbours (answers are shorter than m tokens; no re-retrieval at chunk boundaries).
- `eval_neighbours: random` (the `retro_random` control): the same trained weights (copied from
  the base entry's artifacts when they match — so train `retro` first, as `ragops run` does in
  params order — else trained identically) read k random index chunks (+ continuations) instead:
  what the retrieved content itself is worth. Training always uses retrieved neighbours.

Cost: training charges `tokens_trained` (decoder tokens) and FLOPs = the frozen LM's forward, the
backward through the layers from the first CCA layer up (activation gradients only), and 3x the
forward FLOPs of the trained modules (CCA over decoder tokens, encoder over neighbour tokens).
Evaluation charges the LM's usual counters plus the modules' forward FLOPs, `tokens_retrieved` =
neighbour tokens encoded and one retrieval call per chunk looked up.
"""

from __future__ import annotations

import contextlib

import functools
import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from ragops.architectures.base import QA_BATCH, Architecture, _progress
from ragops.config import ArchitectureOptions, OptimizerOptions
from ragops.training.loop import TrainingTask
from ragops.errors import ConfigError, RagopsError
from ragops.retrieval.types import Passage

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from ragops.cost import CostMeter
    from ragops.lm.model import CausalLM
    from ragops.training.loop import TrainRun

MODULES_DIR = "retro"
WEIGHTS_FILE = "modules.safetensors"
META_FILE = "retro.json"
EXAMPLES_FILE = "examples.json"
SCORE_BATCH = 8  # sequences per forward when scoring


class RetroOptions(ArchitectureOptions):
    retriever: Literal["dense"] = "dense"  # the frozen workspace dense retriever and index
    chunk_size: int = Field(default=32, ge=2)  # m
    k: int = Field(default=2, ge=1)  # neighbours per chunk
    neighbour_tokens: int = Field(default=64, ge=2)  # r: retrieved chunk + continuation, LM tokens
    cca_layers: list[int] | Literal["auto"] = "auto"  # 0-indexed decoder layers followed by a CCA block
    encoder_layers: int = Field(default=2, ge=1)
    encoder_ffn: int = Field(default=1536, ge=8)  # the encoder MLP's hidden width
    eval_neighbours: Literal["retrieved", "random"] = "retrieved"  # random: the control (same weights)
    # training data (train split only)
    lm_articles: int = Field(default=1000, ge=0)  # trainable articles read as LM text
    max_tokens: int = Field(default=160, ge=8)  # an article's tokens kept (p95 of the corpus ≈ 135)
    qa_examples: int = Field(default=500, ge=0)  # train-split questions per QA task
    dev_fraction: float = Field(default=0.02, ge=0, lt=1)  # examples held back for dev/loss
    cache_retrieval: bool = True
    train: OptimizerOptions = OptimizerOptions(steps=245, batch_size=8, lr=3e-4, warmup=0.05, eval_every=125, checkpoint_every=25)

    @field_validator("cca_layers")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(v < 0 for v in value) or len(set(value)) != len(value)):
            raise ValueError("expected 'auto' or distinct non-negative layer indices")
        return value


def auto_cca_layers(n_layers: int) -> list[int]:
    """3 layers evenly spaced over the upper half, the last layer included (fewer for shallow LMs)."""
    low, n = n_layers // 2, min(3, n_layers - n_layers // 2)
    return sorted({int(round(x)) for x in np.linspace(low, n_layers - 1, n)}) if n > 1 else [n_layers - 1]


def resolve_cca_layers(option: list[int] | str, n_layers: int) -> list[int]:
    layers = auto_cca_layers(n_layers) if option == "auto" else sorted(option)
    if layers[-1] >= n_layers:
        raise ConfigError(f"architectures.retro.cca_layers: layer {layers[-1]} does not exist (the LM has {n_layers} layers)")
    return layers


# ------------------------------------------------------------------------------------------------
# Neighbours: retrieval (frozen dense retriever), continuations, random control, content cache
# ------------------------------------------------------------------------------------------------


def continuation_texts(chunks: pd.DataFrame) -> dict[str, str]:
    """chunk_id -> text of the next chunk of the same article (by `position`), for chunks that have one."""
    ordered = chunks.sort_values(["doc_id", "position"], kind="stable")
    ids, docs, texts = ordered["chunk_id"].astype(str).tolist(), ordered["doc_id"].astype(str).tolist(), ordered["text"].astype(str).tolist()
    return {ids[i]: texts[i + 1] for i in range(len(ids) - 1) if docs[i] == docs[i + 1]}


def neighbour_text(passage: Passage, continuation: str | None) -> str:
    """A neighbour as the encoder reads it: the retrieved chunk (`{title}\\n{text}`), then its continuation."""
    text = passage.text.strip()
    return f"{text}\n{continuation.strip()}" if continuation else text


class NeighbourSource:
    """k neighbours (token ids) per query text: retrieved by the frozen retriever, or random index
    chunks (the control), plus continuations. Retrieved ones are cached by (excluded article, query)."""

    def __init__(self, retriever: Any, continuations: dict[str, str], encode, *, k: int, tokens: int, mode: str = "retrieved",
                 cache: Any = None, seed: int = 0) -> None:
        self.retriever, self.continuations, self.encode = retriever, continuations, encode
        self.k, self.tokens, self.mode, self.cache, self.seed = k, tokens, mode, cache, seed
        self.calls = 0  # queries answered (cache hits included): the retrieval calls charged
        self._ids: dict[str, list[int]] = {}
        self._memo: dict[str, list[Passage]] = {}

    def passages(self, queries: Sequence[str], exclude: Sequence[str | None], *, count: bool = True) -> list[list[Passage]]:
        if count and self.mode == "retrieved":
            self.calls += len(queries)
        if self.mode == "random":
            return [self._random(q, x) for q, x in zip(queries, exclude, strict=True)]
        out: list[list[Passage] | None] = [None] * len(queries)
        missing: dict[tuple[str, str], list[int]] = {}
        for i, (query, excluded) in enumerate(zip(queries, exclude, strict=True)):
            key = self._key(query, excluded)
            hit = self._memo.get(key)
            if hit is None and self.cache is not None:
                hit = self.cache.get(key, query)
            if hit is None:
                missing.setdefault((query, excluded or ""), []).append(i)
            else:
                out[i] = hit
        if missing:
            todo = list(missing)
            result = self.retriever.search([q for q, _ in todo], self.k, exclude_doc_ids=[{x} if x else set() for _, x in todo])
            for (query, excluded), found in zip(todo, result.passages(), strict=True):
                for i in missing[(query, excluded)]:
                    out[i] = found
                key = self._key(query, excluded or None)
                self._memo[key] = found
                if self.cache is not None:
                    self.cache.put(key, query, found)
        return out  # type: ignore[return-value]

    def prefetch(self, queries: Sequence[str], exclude: Sequence[str | None], block: int = 256) -> None:
        """Look `queries` up in large batches ahead of their one-by-one use (not charged: their use is)."""
        for start in range(0, len(queries), block):
            self.passages(queries[start : start + block], exclude[start : start + block], count=False)

    @staticmethod
    def _key(query: str, excluded: str | None) -> str:
        return f"{excluded or ''}|{hashlib.sha256(query.encode()).hexdigest()[:24]}"

    def _random(self, query: str, excluded: str | None) -> list[Passage]:
        """k index chunks drawn with a seed from the query's content (the same query, the same draw)."""
        table = self.retriever.table
        rng = np.random.default_rng([self.seed, int(hashlib.sha256(query.encode()).hexdigest()[:12], 16)])
        picked: list[Passage] = []
        for row in rng.permutation(len(table)):
            if table.doc_ids[row] != excluded:
                picked.append(Passage(table.chunk_ids[row], table.doc_ids[row], 0.0, table.texts[row]))
            if len(picked) == self.k:
                break
        return picked

    def ids(self, passage: Passage) -> list[int]:
        """Token ids of a neighbour: the chunk and its continuation, first `tokens` LM tokens."""
        ids = self._ids.get(passage.chunk_id)
        if ids is None:
            ids = self._ids[passage.chunk_id] = self.encode(neighbour_text(passage, self.continuations.get(passage.chunk_id)))[: self.tokens]
        return ids

    def neighbours(self, queries: Sequence[str], exclude: Sequence[str | None]) -> tuple[list[list[list[int]]], list[list[Passage]]]:
        found = self.passages(queries, exclude)
        return [[self.ids(p) for p in hits] for hits in found], found


# ------------------------------------------------------------------------------------------------
# Sequences: token ids on the chunk grid, with the neighbours of some chunks
# ------------------------------------------------------------------------------------------------


@dataclass
class RetroSequence:
    """`ids` placed after `lead` padding tokens (so chunk boundaries fall where they should: every
    m tokens from the padded start); tokens from `targets_from` (an index into `ids`) are scored or
    trained on; `neighbours[u]` = the k neighbours' token ids of chunk u (padded coordinates)."""

    ids: list[int]
    targets_from: int
    lead: int = 0
    neighbours: dict[int, list[list[int]]] = field(default_factory=dict)
    example_id: str = ""


def lm_sequence(ids: list[int], targets_from: int, m: int, source: NeighbourSource, decode, exclude: str | None) -> tuple[RetroSequence, list[list[Passage]]]:
    """A text sequence with the neighbours of every chunk whose neighbours can affect a scored
    token: chunk u (tokens [u·m, (u+1)·m)) is read from position (u+1)·m − 1, which predicts token
    (u+1)·m, so chunks with (u+1)·m < len(ids) — each queried with its own text."""
    chunks = [u for u in range(len(ids) // m) if (u + 1) * m < len(ids)]
    queries = [decode(ids[u * m : (u + 1) * m]) for u in chunks]
    found, passages = source.neighbours(queries, [exclude] * len(chunks)) if chunks else ([], [])
    return RetroSequence(list(ids), targets_from, 0, {u: n for u, n in zip(chunks, found, strict=True) if n}), passages


def qa_sequence(prompt: list[int], target: list[int], m: int, neighbours: list[list[int]]) -> RetroSequence:
    """The prompt left-padded to a multiple of m; the question's neighbours belong to its last chunk."""
    lead = (-len(prompt)) % m
    last_chunk = (lead + len(prompt)) // m - 1
    return RetroSequence(list(prompt) + list(target), len(prompt), lead, {last_chunk: neighbours} if neighbours else {})


@dataclass
class Batch:
    ids: Any  # [B, T] long
    mask: Any  # [B, T] long, 1 = real token
    positions: Any  # [B, T]
    neighbour_ids: Any  # [N, k, r] long (N = chunks with neighbours)
    neighbour_mask: Any  # [N, k, r] bool
    where: Any  # [N, 2] (row, chunk) of each
    starts: list[int]  # padded index of each row's ids[0]
    n_chunks: int


def collate(seqs: Sequence[RetroSequence], m: int, k: int, r: int, pad_id: int, align_end: bool = False) -> Batch:
    """Right-padded batch on each row's chunk grid; `align_end` left-pads every row further (by
    multiples of m) so all rows end at the same index (generation appends tokens in lockstep)."""
    import torch

    ends = [s.lead + len(s.ids) for s in seqs]
    extra = [max(ends) - e for e in ends] if align_end else [0] * len(seqs)
    if align_end and any(x % m for x in extra):
        raise ValueError("collate(align_end): every sequence must end on a chunk boundary")
    width = max(e + x for e, x in zip(ends, extra, strict=True))
    width = max(width, 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    starts, entries = [], []
    for b, (s, x) in enumerate(zip(seqs, extra, strict=True)):
        start = s.lead + x
        ids[b, start : start + len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        mask[b, start : start + len(s.ids)] = 1
        starts.append(start)
        for u, found in sorted(s.neighbours.items()):
            entries.append((b, u + x // m, found))
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    n_ids = torch.full((len(entries), k, r), pad_id, dtype=torch.long)
    n_mask = torch.zeros((len(entries), k, r), dtype=torch.bool)
    for n, (_, _, found) in enumerate(entries):
        for j, tokens in enumerate(found[:k]):
            tokens = tokens[:r]
            n_ids[n, j, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            n_mask[n, j, : len(tokens)] = True
    where = torch.tensor([(b, u) for b, u, _ in entries], dtype=torch.long).reshape(-1, 2)
    return Batch(ids, mask, positions, n_ids, n_mask, where, starts, math.ceil(width / m))


# ------------------------------------------------------------------------------------------------
# The torch modules (built lazily: this module's top level stays free of torch)
# ------------------------------------------------------------------------------------------------


@functools.cache
def _nn() -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Attention(nn.Module):
        """Multi-head attention of `x` over `memory` (bidirectional), boolean key mask."""

        def __init__(self, dim: int, heads: int, zero_out: bool = False) -> None:
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
            if zero_out:
                nn.init.zeros_(self.o.weight)

        def forward(self, x, memory, key_mask):
            n, tq, d = x.shape
            tk, h = memory.shape[1], self.heads
            q = self.q(x).view(n, tq, h, d // h).transpose(1, 2)
            k = self.k(memory).view(n, tk, h, d // h).transpose(1, 2)
            v = self.v(memory).view(n, tk, h, d // h).transpose(1, 2)
            any_key = key_mask.any(dim=-1)
            safe = key_mask.clone()
            safe[~any_key, 0] = True  # a row without keys attends to a dummy, then is zeroed
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None, None, :])
            out = self.o(out.transpose(1, 2).reshape(n, tq, d))
            return out * any_key[:, None, None].to(out.dtype)

    class EncoderLayer(nn.Module):
        def __init__(self, dim: int, heads: int, ffn: int, eps: float) -> None:
            super().__init__()
            self.norm_self, self.norm_cross, self.norm_ffn = (nn.RMSNorm(dim, eps=eps) for _ in range(3))
            self.self_attn = Attention(dim, heads)
            self.cross_attn = Attention(dim, heads)
            self.ffn = nn.Sequential(nn.Linear(dim, ffn, bias=False), nn.GELU(), nn.Linear(ffn, dim, bias=False))

        def forward(self, x, x_mask, chunk, chunk_mask):
            y = self.norm_self(x)
            x = x + self.self_attn(y, y, x_mask)
            x = x + self.cross_attn(self.norm_cross(x), chunk, chunk_mask)
            return x + self.ffn(self.norm_ffn(x))

    class NeighbourEncoder(nn.Module):
        """Bidirectional encoder of each neighbour, conditioned on its retrieving chunk's hidden states."""

        def __init__(self, dim: int, heads: int, layers: int, ffn: int, tokens: int, eps: float) -> None:
            super().__init__()
            self.positions = nn.Parameter(torch.randn(tokens, dim) * 0.02)
            self.chunk_norm = nn.RMSNorm(dim, eps=eps)
            self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn, eps) for _ in range(layers))
            self.out_norm = nn.RMSNorm(dim, eps=eps)

        def forward(self, embedded, mask, chunk_hidden, chunk_mask):
            """embedded [N, k, r, d], mask [N, k, r]; chunk_hidden [N, m, d], chunk_mask [N, m] -> [N, k·r, d]."""
            n, k, r, d = embedded.shape
            x = (embedded + self.positions[:r]).reshape(n * k, r, d)
            x_mask = mask.reshape(n * k, r)
            chunk = self.chunk_norm(chunk_hidden).repeat_interleave(k, dim=0)
            c_mask = chunk_mask.repeat_interleave(k, dim=0)
            for layer in self.layers:
                x = layer(x, x_mask, chunk, c_mask)
            return self.out_norm(x).reshape(n, k * r, d)

    class ChunkedCrossAttention(nn.Module):
        """h + attn(norm(h), neighbours of chunk ⌊(t+1)/m⌋ − 1) at each position t (RETRO's m−1 shift)."""

        def __init__(self, dim: int, heads: int, m: int, eps: float) -> None:
            super().__init__()
            self.m = m
            self.norm = nn.RMSNorm(dim, eps=eps)
            self.attn = Attention(dim, heads, zero_out=True)  # zero output projection: starts as the identity

        def forward(self, hidden, offset: int, memory, memory_mask):
            """hidden [B, T, d] at padded positions offset..offset+T−1; memory [B, U, k·r, d]."""
            b, t, d = hidden.shape
            m, n_chunks = self.m, memory.shape[1]
            shifted = torch.arange(offset, offset + t, device=hidden.device) - (m - 1)
            chunk = torch.div(shifted, m, rounding_mode="floor")
            ok = (shifted >= 0) & (chunk < n_chunks)
            if not bool(ok.any()):
                return hidden
            first = int(chunk[ok].min())
            span = int(chunk[ok].max()) - first + 1
            slot = (chunk[ok] - first) * m + shifted[ok] % m
            queries = hidden.new_zeros(b, span * m, d)
            queries[:, slot] = self.norm(hidden[:, ok]).to(queries.dtype)  # (bf16 under autocast)
            mem = memory[:, first : first + span].reshape(b * span, -1, d)
            mem_mask = memory_mask[:, first : first + span].reshape(b * span, -1)
            out = self.attn(queries.view(b * span, m, d), mem, mem_mask).view(b, span * m, d)
            delta = hidden.new_zeros(b, t, d)
            delta[:, ok] = out[:, slot].to(delta.dtype)
            return hidden + delta

    class RetroModules(nn.Module):
        """Everything RETRO-fitting trains: the encoder and one CCA block per chosen layer."""

        def __init__(self, dim: int, heads: int, layers: list[int], m: int, encoder_layers: int, ffn: int, tokens: int, eps: float) -> None:
            super().__init__()
            self.layers = list(layers)
            self.encoder = NeighbourEncoder(dim, heads, encoder_layers, ffn, tokens, eps)
            self.cca = nn.ModuleList(ChunkedCrossAttention(dim, heads, m, eps) for _ in layers)

    return type("RetroNN", (), {"Attention": Attention, "NeighbourEncoder": NeighbourEncoder,
                                "ChunkedCrossAttention": ChunkedCrossAttention, "RetroModules": RetroModules})


def build_modules(config: Any, options: RetroOptions) -> Any:
    """Fresh RETRO modules for an HF decoder `config` (seeded by the caller)."""
    n_layers = int(config.num_hidden_layers)
    return _nn().RetroModules(
        int(config.hidden_size), int(config.num_attention_heads), resolve_cca_layers(options.cca_layers, n_layers),
        options.chunk_size, options.encoder_layers, options.encoder_ffn, options.neighbour_tokens,
        float(getattr(config, "rms_norm_eps", 1e-6)),
    )


@dataclass
class _State:
    """What the hooks read during one forward (or one generation)."""

    batch: Batch
    offset: int = 0  # padded index of the first input position
    memory: Any = None  # [B, U, k·r, d] neighbour encodings, computed at the first CCA layer
    memory_mask: Any = None


class RetroLM:
    """The frozen HF causal LM with the RETRO modules attached by forward hooks.

    `forward(batch, labels)` -> (logits, loss); `hidden(batch, ...)` for scoring and generation.
    The hooks act only inside `hidden` (they find no state otherwise), so the shared LM object keeps
    answering exactly as before for every other architecture; `remove()` detaches them.
    """

    def __init__(self, model: Any, modules: Any) -> None:
        import torch

        self.model = model
        self.modules = modules
        self.body = model.base_model  # the decoder stack (LlamaModel), as CausalLM runs it
        self.head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        for p in model.parameters():
            p.requires_grad_(False)
        first = next(model.parameters())
        modules.to(device=first.device, dtype=first.dtype)  # the LM's lm.dtype (float32 by default)
        self.device = first.device
        self._state: _State | None = None
        self._torch = torch
        self.compute = contextlib.nullcontext  # reads at the CausalLM's precision: set by `Retro.retro_lm`
        params = list(inspect.signature(self.body.forward).parameters)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers renamed it
        layers = self.body.layers
        self.first_layer = modules.layers[0]
        self._handles = [layers[layer].register_forward_hook(self._hook(i, layer)) for i, layer in enumerate(modules.layers)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int, layer: int):
        def hook(_module, _args, output):
            state = self._state
            if state is None or state.batch.where.shape[0] == 0:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            if layer == self.first_layer and state.memory is None:
                state.memory, state.memory_mask = self._encode(state, hidden)
            hidden = self.modules.cca[index](hidden, state.offset, state.memory, state.memory_mask)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _encode(self, state: _State, hidden):
        """Encode each chunk's neighbours conditioned on that chunk's hidden states (this layer's)."""
        torch = self._torch
        batch, m = state.batch, self.modules.cca[0].m
        if state.offset != 0:
            raise RuntimeError("RetroLM: neighbours must be encoded in the forward that holds their chunks")
        where = batch.where.to(hidden.device)
        cols = where[:, 1:2] * m + torch.arange(m, device=hidden.device)  # [N, m]
        width = hidden.shape[1]
        inside = cols < width
        cols_c = cols.clamp(max=width - 1)
        chunk_hidden = hidden[where[:, :1], cols_c]  # [N, m, d]
        chunk_mask = batch.mask.to(hidden.device)[where[:, :1], cols_c].bool() & inside
        n_ids = batch.neighbour_ids.to(hidden.device)
        n_mask = batch.neighbour_mask.to(hidden.device)
        encoded = self.modules.encoder(self.embed(n_ids), n_mask, chunk_hidden, chunk_mask)  # [N, k·r, d]
        b, d = hidden.shape[0], hidden.shape[-1]
        memory = hidden.new_zeros(b, batch.n_chunks, encoded.shape[1], d)
        memory_mask = torch.zeros(b, batch.n_chunks, encoded.shape[1], dtype=torch.bool, device=hidden.device)
        memory = memory.index_put((where[:, 0], where[:, 1]), encoded)
        memory_mask[where[:, 0], where[:, 1]] = n_mask.reshape(n_mask.shape[0], -1)
        return memory, memory_mask

    def hidden(self, batch: Batch, *, cache: Any = None, ids: Any = None, mask: Any = None, positions: Any = None,
               offset: int = 0, use_cache: bool = False, state: _State | None = None):
        """Last hidden states of `batch` (or of `ids` appended at padded index `offset` with `cache`)."""
        state = state or _State(batch)
        state.offset = offset
        self._state = state
        try:
            kwargs = {"input_ids": (batch.ids if ids is None else ids).to(self.device),
                      "attention_mask": (batch.mask if mask is None else mask).to(self.device),
                      "position_ids": (batch.positions if positions is None else positions).to(self.device),
                      "use_cache": use_cache}
            if cache is not None:
                kwargs[self._cache_kw] = cache
            out = self.body(**kwargs)
        finally:
            self._state = None
        return out.last_hidden_state, getattr(out, self._cache_kw, None), state

    def forward(self, batch: Batch, labels: Any = None):
        """(logits, loss): with `labels` ([B, T], −100 = ignored; label t is predicted at t−1) the
        logits of the predicting positions only [n, V] and the mean NLL; without, [B, T, V] and None."""
        torch = self._torch
        hidden, _, _ = self.hidden(batch)
        if labels is None:
            return self.head(hidden).float(), None
        labels = labels.to(hidden.device)
        rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
        logits = self.head(hidden[rows, cols]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[rows, cols + 1])
        return logits, loss

    __call__ = forward


def labels_of(batch: Batch, seqs: Sequence[RetroSequence]) -> Any:
    import torch

    labels = torch.full(batch.ids.shape, -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        start = batch.starts[b]
        labels[b, start + s.targets_from : start + len(s.ids)] = batch.ids[b, start + s.targets_from : start + len(s.ids)]
    return labels


def score_sequences(retro: RetroLM, seqs: Sequence[RetroSequence], m: int, k: int, r: int, pad_id: int) -> list[np.ndarray]:
    """Log-probs of each sequence's target tokens (no gradient)."""
    torch = retro._torch
    out: list[np.ndarray] = []
    for start in range(0, len(seqs), SCORE_BATCH):
        part = list(seqs[start : start + SCORE_BATCH])
        batch = collate(part, m, k, r, pad_id)
        with torch.inference_mode(), retro.compute():
            hidden, _, _ = retro.hidden(batch)
            for b, s in enumerate(part):
                first = batch.starts[b] + s.targets_from
                last = batch.starts[b] + len(s.ids)
                if last <= first:
                    out.append(np.zeros(0, dtype=np.float32))
                    continue
                logits = retro.head(hidden[b, first - 1 : last - 1]).float()
                target = batch.ids[b, first:last].to(logits.device)
                lp = logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
                out.append(lp.cpu().numpy().astype(np.float32))
    return out


def greedy_generate(retro: RetroLM, lm: CausalLM, prompts: Sequence[RetroSequence], m: int, k: int, r: int,
                    max_new_tokens: int, stop: Sequence[str]) -> tuple[list[str], list[int]]:
    """Greedy continuations of prompts (each ending on a chunk boundary), the question's neighbours
    kept throughout; returns (texts, generated token counts)."""
    from ragops.lm.model import _find_stop

    torch = retro._torch
    batch = collate(prompts, m, k, r, lm.pad_id, align_end=True)
    n, width = batch.ids.shape
    texts, generated = [""] * n, [[] for _ in range(n)]
    if max_new_tokens <= 0:
        return texts, [0] * n
    with torch.inference_mode(), retro.compute():
        hidden, cache, state = retro.hidden(batch, use_cache=True)
        logits = retro.head(hidden[:, -1]).float()
        mask, lengths = batch.mask.clone(), batch.mask.sum(dim=1)
        alive = set(range(n))
        for step in range(max_new_tokens):
            tokens = logits.argmax(dim=-1).tolist()
            for row in sorted(alive):
                token = tokens[row]
                if token in lm.eos_ids:
                    alive.discard(row)
                    continue
                generated[row].append(token)
                text = lm.decode(generated[row])
                cut = _find_stop(text, stop)
                texts[row] = text if cut is None else text[:cut]
                if cut is not None:
                    alive.discard(row)
            if not alive or step == max_new_tokens - 1:
                break
            ids = torch.tensor([[generated[row][-1] if generated[row] else lm.pad_id] for row in range(n)], dtype=torch.long)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            positions = (lengths + step)[:, None]
            hidden, cache, state = retro.hidden(batch, cache=cache, ids=ids, mask=mask, positions=positions, offset=width + step,
                                                use_cache=True, state=state)
            logits = retro.head(hidden[:, -1]).float()
    return texts, [len(g) for g in generated]


# ------------------------------------------------------------------------------------------------
# Saving and loading the trained modules
# ------------------------------------------------------------------------------------------------


def save_modules(modules: Any, directory: Path, *, base: str | Path, options: RetroOptions, layers: list[int]) -> None:
    from safetensors.torch import save_file

    from ragops.io import write_json
    from ragops.lm.finetune import base_fingerprint

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in modules.state_dict().items()}, str(directory / WEIGHTS_FILE))
    write_json(directory / META_FILE, {
        "base": str(base), "base_fingerprint": base_fingerprint(base), "cca_layers": layers, "chunk_size": options.chunk_size,
        "k": options.k, "neighbour_tokens": options.neighbour_tokens, "encoder_layers": options.encoder_layers,
        "encoder_ffn": options.encoder_ffn, "params": int(sum(p.numel() for p in modules.parameters())),
    })


def load_modules(directory: Path, base: str | Path, config: Any, options: RetroOptions) -> Any:
    """The trained modules saved in `directory`; refuses modules trained on another base LM (one line naming both)."""
    from safetensors.torch import load_file

    from ragops.lm.finetune import read_base_checked_meta

    meta = read_base_checked_meta(Path(directory), base, META_FILE, "RETRO modules")
    opts = options.model_copy(update={"cca_layers": list(meta["cca_layers"])})
    modules = build_modules(config, opts)
    modules.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return modules.eval()


# ------------------------------------------------------------------------------------------------
# Cost
# ------------------------------------------------------------------------------------------------


def module_flops(modules: Any, decoder_tokens: int, neighbour_tokens: int) -> float:
    """Forward FLOPs of the RETRO modules: 2 per weight per token (CCA blocks over the decoder
    tokens, the encoder over neighbour tokens); attention-score terms are left out (small at r = 64)."""
    cca = sum(p.numel() for p in modules.cca.parameters())
    encoder = sum(p.numel() for p in modules.encoder.parameters()) - modules.encoder.positions.numel()
    return 2.0 * cca * decoder_tokens + 2.0 * encoder * neighbour_tokens


def training_flops(lm: CausalLM, modules: Any, seqs: Sequence[RetroSequence], n_loss: int, neighbour_tokens: int) -> float:
    """Forward of the frozen LM + backward (activation gradients) through the layers from the
    first CCA layer up + 3x the trained modules' forward."""
    from ragops.cost import forward_flops

    tokens = sum(len(s.ids) for s in seqs)
    context = int(round(sum(len(s.ids) * (len(s.ids) + 1) / 2 for s in seqs) / max(tokens, 1)))
    body = forward_flops(lm._body_params, tokens, lm.n_layers, lm.d_model, context)
    head = forward_flops(lm._head_params, n_loss)
    upper = (lm.n_layers - modules.layers[0]) / max(lm.n_layers, 1)
    return body + head + upper * body + head + 3.0 * module_flops(modules, tokens, neighbour_tokens)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


class RetroTask(TrainingTask):
    """The `TrainingTask` of RETRO-fitting: the plain LM loss on pre-built sequences."""

    def __init__(self, arch: Retro, retro: RetroLM, train: list[RetroSequence], dev: list[RetroSequence], run: TrainRun) -> None:
        from ragops.training.loop import cycle_batches

        self.arch, self.retro, self.train_seqs, self.dev_seqs = arch, retro, train, dev
        self.meter = run.meter
        opt = arch.options
        self.m, self.k, self.r = opt.chunk_size, opt.k, opt.neighbour_tokens
        self.batches = cycle_batches(len(train), opt.train.batch_size, arch.ctx.config.seed)

    def modules(self) -> dict[str, Any]:
        return {"retro": self.retro.modules}

    def param_groups(self) -> None:
        return None

    def micro_batch(self, step: int, micro: int) -> list[RetroSequence]:
        index = step * self.arch.options.train.grad_accum + micro
        return [self.train_seqs[i] for i in self.batches(index)]

    def loss(self, seqs: list[RetroSequence]):
        lm = self.arch.lm
        batch = collate(seqs, self.m, self.k, self.r, lm.pad_id)
        labels = labels_of(batch, seqs)
        _, loss = self.retro.forward(batch, labels)
        if self.meter is not None:
            n_loss = int((labels[:, 1:] != -100).sum())
            n_neighbour = int(batch.neighbour_mask.sum())
            self.meter.add(tokens_trained=sum(len(s.ids) for s in seqs), tokens_retrieved=n_neighbour, examples=len(seqs),
                           flops=training_flops(lm, self.retro.modules, seqs, n_loss, n_neighbour))
        return loss, {}

    def evaluate(self) -> dict[str, float]:
        if not self.dev_seqs:
            return {}
        lm = self.arch.lm
        scored = score_sequences(self.retro, self.dev_seqs, self.m, self.k, self.r, lm.pad_id)
        return {"dev/loss": -float(sum(lp.sum() for lp in scored)) / max(1, sum(len(lp) for lp in scored))}


# ------------------------------------------------------------------------------------------------
# The architecture
# ------------------------------------------------------------------------------------------------


class Retro(Architecture):
    name = "retro"
    family = "white-box"
    finetune = "lm"
    Options = RetroOptions
    options: RetroOptions
    code_deps = ("retrieval/retriever.py", "retrieval/embed.py")

    def __init__(self, ctx, options=None) -> None:
        super().__init__(ctx, options)
        self._retro: RetroLM | None = None
        self._source: dict[str, NeighbourSource] = {}

    # --- pieces -------------------------------------------------------------------------------------------
    def base_path(self) -> Path | str:
        from ragops.architectures.base import lm_path

        return lm_path(self.ctx.ws, self.ctx.config)

    def retro_lm(self, modules: Any = None) -> RetroLM:
        """The base LM with the trained modules (or fresh ones before training: the base LM exactly)."""
        if modules is not None:
            if self._retro is not None:
                self._retro.remove()
            self._retro = RetroLM(self.lm.model, modules)
        if self._retro is None:
            directory = self.artifact_dir / MODULES_DIR
            if (directory / META_FILE).exists():
                modules = load_modules(directory, self.base_path(), self.lm.model.config, self.options)
            else:
                import torch

                torch.manual_seed(self.ctx.config.seed)
                modules = build_modules(self.lm.model.config, self.options).eval()
            self._retro = RetroLM(self.lm.model, modules)
        self._retro.compute = self.lm.compute  # the same precision as every other architecture's reads
        return self._retro

    def neighbour_source(self, mode: str | None = None) -> NeighbourSource:
        mode = mode or self.options.eval_neighbours
        if mode not in self._source:
            import pandas as pd

            from ragops.architectures.shared import RetrievalCache
            from ragops.io import json_hash, text_hash

            opt, ws = self.options, self.ctx.ws
            retriever = self.ctx.retriever(opt.retriever)
            chunks = pd.read_parquet(ws.chunks, columns=["chunk_id", "doc_id", "position", "text"])
            cache = None
            if opt.cache_retrieval and mode == "retrieved":
                index_meta = ws.index_dir / "meta.json"
                index = text_hash(index_meta.read_text()) if index_meta.exists() else "none"
                meta = {"architecture": "retro", "retriever": opt.retriever, "k": opt.k, "index": index}
                cache = RetrievalCache(ws.retrieval_cache / "retro" / f"neighbours-k{opt.k}-{json_hash(meta)[:12]}.json", meta)
            self._source[mode] = NeighbourSource(retriever, continuation_texts(chunks), self.lm.encode, k=opt.k,
                                                 tokens=opt.neighbour_tokens, mode=mode, cache=cache, seed=self.ctx.config.seed)
        return self._source[mode]

    def _save_cache(self) -> None:
        for source in self._source.values():
            if source.cache is not None:
                source.cache.save()

    # --- training data --------------------------------------------------------------------------------
    def training_sequences(self, source: NeighbourSource) -> tuple[list[RetroSequence], list[RetroSequence], dict[str, list[str]]]:
        """(train, dev, ids): LM text of trainable articles (own article excluded from its chunks'
        neighbours) and train-split QA prompts with their gold answers, shuffled with the seed."""
        from ragops.architectures.prompts import answer_continuation, document_text, qa_prompt
        from ragops.training.data import assert_clean_training_data, train_questions

        opt, ws, lm, seed = self.options, self.ctx.ws, self.lm, self.ctx.config.seed
        m = opt.chunk_size
        seqs: list[RetroSequence] = []
        text_docs: list[str] = []
        if opt.lm_articles:
            articles = trainable_articles(ws)
            pick = sorted(int(i) for i in np.random.default_rng([seed, 11]).permutation(len(articles))[: opt.lm_articles])
            docs = [articles.iloc[row] for row in pick]
            texts = [(lm.document_start + ids)[: opt.max_tokens]
                     for ids in lm.encode_batch([document_text(d["title"], d["text"]) for d in docs])]
            chunk_queries = [(lm.decode(ids[u * m : (u + 1) * m]), str(d["doc_id"]))
                             for d, ids in zip(docs, texts, strict=True) for u in range(len(ids) // m) if (u + 1) * m < len(ids)]
            source.prefetch([q for q, _ in chunk_queries], [x for _, x in chunk_queries])
            bar = _progress(self.progress, len(docs), f"{self.name}: training articles")
            for doc, ids in zip(docs, texts, strict=True):
                if len(ids) < 2:
                    continue
                seq, _ = lm_sequence(ids, 1, m, source, lm.decode, exclude=str(doc["doc_id"]))
                seq.example_id = f"lm:{doc['doc_id']}"
                seqs.append(seq)
                text_docs.append(str(doc["doc_id"]))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        qids: list[str] = []
        if opt.qa_examples:
            questions = train_questions(ws, opt.qa_examples, seed)
            chat, terminator = lm.chat_formatter, answer_terminator(lm)
            source.prefetch([str(q) for q in questions["question"]], [None] * len(questions))
            found, _ = source.neighbours([str(q) for q in questions["question"]], [None] * len(questions))
            for (_, q), neighbours in zip(questions.iterrows(), found, strict=True):
                prompt = lm.encode(qa_prompt(str(q["question"]), (), chat))
                target = lm.encode(answer_continuation(str(q["answer"]), chat=chat is not None)) + terminator
                seq = qa_sequence(prompt, target, m, neighbours)
                seq.example_id = f"qa:{q['qid']}"
                seqs.append(seq)
                qids.append(str(q["qid"]))
        if not seqs:
            raise RagopsError(f"architectures.{self.name}: no training examples (lm_articles and qa_examples are 0)")
        assert_clean_training_data(ws, qids=qids, text_doc_ids=text_docs)
        order = np.random.default_rng([seed, 12]).permutation(len(seqs))
        seqs = [seqs[i] for i in order]
        n_dev = int(round(opt.dev_fraction * len(seqs)))
        dev, train = seqs[:n_dev], seqs[n_dev:]
        return train, dev, {"train": [s.example_id for s in train], "dev": [s.example_id for s in dev]}

    # --- train --------------------------------------------------------------------------------------------
    def train(self, run: TrainRun) -> dict[str, Any]:
        import torch

        from ragops.io import write_json

        opt, config = self.options, self.ctx.config
        reused = self._reuse_base_weights()
        if reused is not None:
            return reused
        self.lm.model.to(run.device)
        self.lm.device = next(self.lm.model.parameters()).device
        torch.manual_seed(config.seed)
        modules = build_modules(self.lm.model.config, opt)
        retro = self.retro_lm(modules)
        source = self.neighbour_source("retrieved")
        try:
            train, dev, ids = self.training_sequences(source)
        finally:
            self._save_cache()
        if run.meter is not None:
            run.meter.add(retrieval_calls=source.calls)
        task = RetroTask(self, retro, train, dev, run)
        result = run.train(task, opt.train, seed=config.seed, desc=f"{self.name}: training")
        n_modules = int(sum(p.numel() for p in modules.parameters()))
        if run.meter is not None:
            run.meter.set_params(self.lm.n_params + n_modules, n_modules)

        def write(tmp: Path) -> dict[str, Any]:
            save_modules(modules, tmp / MODULES_DIR, base=self.base_path(), options=opt, layers=modules.layers)
            write_json(tmp / EXAMPLES_FILE, ids)
            return {
                "training": result.summary(), "examples": {"train": len(train), "dev": len(dev)},
                "sequences": {"lm": sum(s.example_id.startswith("lm:") for s in train + dev),
                              "qa": sum(s.example_id.startswith("qa:") for s in train + dev),
                              "decoder_tokens": sum(len(s.ids) for s in train)},
                "cca_layers": list(modules.layers), "chunk_size": opt.chunk_size, "k": opt.k,
                "neighbour_tokens": opt.neighbour_tokens, "retrieval_calls": source.calls,
                "trainable_params": n_modules, "extra_params": n_modules,
            }

        manifest = self.save_artifacts(write, truncated=result.truncated)
        self._retro.remove()
        self._retro = None
        return manifest["info"]

    def _reuse_base_weights(self) -> dict[str, Any] | None:
        """The random-neighbour control evaluates the base entry's trained weights: copy them when
        that entry is trained with the same training options (else this entry trains its own)."""
        import shutil

        from ragops.evaluation.runner import build_architecture
        from ragops.io import write_json

        base_name = self.options.base
        if self.options.eval_neighbours != "random" or not base_name or base_name == self.name:
            return None
        config = self.ctx.config
        if base_name not in config.architectures:
            return None
        base = build_architecture(base_name, self.ctx.ws, config, progress=False, lm=self.ctx.lm)
        ignore = {"enabled", "base", "eval_neighbours"}
        mine = {k: v for k, v in self.options.model_dump(mode="json").items() if k not in ignore}
        theirs = {k: v for k, v in base.options.model_dump(mode="json").items() if k not in ignore}
        if mine != theirs or base.needs_training():
            return None
        source_dir = base.artifact_dir / MODULES_DIR
        base_info = (base.trained_manifest() or {}).get("info", {})

        def write(tmp: Path) -> dict[str, Any]:
            shutil.copytree(source_dir, tmp / MODULES_DIR)
            if (base.artifact_dir / EXAMPLES_FILE).exists():
                shutil.copy(base.artifact_dir / EXAMPLES_FILE, tmp / EXAMPLES_FILE)
            write_json(tmp / "reused.json", {"from": base_name, "fingerprint": base.training_fingerprint()})
            return {**base_info, "reused_from": base_name}

        return self.save_artifacts(write)["info"]

    # --- QA -----------------------------------------------------------------------------------------------
    def answer(self, questions: pd.DataFrame, meter: CostMeter) -> pd.DataFrame:
        import pandas as pd

        from ragops.architectures.prompts import STOP, answer_continuation, clean_prediction, qa_prompt
        from ragops.cost import forward_flops

        opt, lm = self.options, self.lm
        m, k, r = opt.chunk_size, opt.k, opt.neighbour_tokens
        retro = self.retro_lm()
        source = self.neighbour_source()
        chat, max_new = lm.chat_formatter, self.ctx.config.eval.max_new_tokens
        rows: list[dict[str, Any]] = []
        bar = _progress(self.progress, len(questions), self.qa_progress_label(questions))
        try:
            for start in range(0, len(questions), QA_BATCH):
                part = questions.iloc[start : start + QA_BATCH]
                calls_before = source.calls
                found, passages = source.neighbours([str(q) for q in part["question"]], [None] * len(part))
                meter.add(retrieval_calls=source.calls - calls_before)
                prompts, scored_seqs = [], []
                for (_, q), neighbours in zip(part.iterrows(), found, strict=True):
                    cont = lm.encode(answer_continuation(str(q["answer"]), chat=chat is not None))
                    prompt = lm.encode(qa_prompt(str(q["question"]), (), chat))
                    prompt = prompt[-(lm.max_length - max(max_new, len(cont)) - m) :]
                    scored_seqs.append(qa_sequence(prompt, cont, m, neighbours))
                    prompts.append(qa_sequence(prompt, [], m, neighbours))
                scores = score_sequences(retro, scored_seqs, m, k, r, lm.pad_id)
                texts, n_generated = greedy_generate(retro, lm, prompts, m, k, r, max_new, STOP)
                for (_, q), seq, prompt, lp, text, n_gen, hits in zip(part.iterrows(), scored_seqs, prompts, scores, texts, n_generated, passages, strict=True):
                    n_neighbour = sum(len(n) for n in seq.neighbours.get(max(seq.neighbours, default=-1), []))
                    # The LM's own work (prompt + scored answer forward, prompt + generation forward) and the modules'.
                    n_prompt = len(prompt.ids)
                    flops = forward_flops(lm._body_params, len(seq.ids), lm.n_layers, lm.d_model, (len(seq.ids) + 1) // 2)
                    flops += forward_flops(lm._head_params, len(lp))
                    flops += forward_flops(lm._body_params, n_prompt + n_gen, lm.n_layers, lm.d_model, (n_prompt + n_gen + 1) // 2)
                    flops += forward_flops(lm._head_params, n_gen + 1)
                    flops += module_flops(retro.modules, len(seq.ids) + n_prompt + n_gen, 2 * n_neighbour)
                    lm.counters.flops += flops
                    lm.counters.tokens_forward += len(seq.ids) + n_prompt + n_gen
                    lm.counters.tokens_scored += len(lp)
                    lm.counters.tokens_generated += n_gen
                    meter.add(tokens_prompt=n_prompt, tokens_retrieved=n_neighbour, tokens_scored=len(lp), tokens_generated=n_gen,
                              flops=flops, questions=1, examples=1)
                    rows.append({
                        "qid": q["qid"],
                        "prediction": clean_prediction(text),
                        "gold_nll": float(-lp.mean()) if len(lp) else math.nan,
                        "gold_tokens": len(lp),
                        "retrieved_doc_ids": [p.doc_id for p in hits],
                        "retrieved_scores": [p.score for p in hits],
                        "shown_doc_ids": [p.doc_id for p in hits],  # read through CCA, not in the prompt text
                        "tokens_prompt": n_prompt,
                        "tokens_retrieved": n_neighbour,
                        "tokens_generated": n_gen,
                    })
                if bar is not None:
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
            self._save_cache()
        return pd.DataFrame(rows)

    # --- language modelling -------------------------------------------------------------------------
    def score_documents(self, docs: pd.DataFrame, meter: CostMeter) -> pd.DataFrame:
        import pandas as pd

        from ragops.architectures.prompts import document_text
        from ragops.cost import forward_flops

        opt, lm = self.options, self.lm
        m, k, r = opt.chunk_size, opt.k, opt.neighbour_tokens
        retro = self.retro_lm()
        source = self.neighbour_source()
        rows = []
        bar = _progress(self.progress, len(docs), f"{self.name}: documents (chunks of {m})")
        try:
            for _, doc in docs.iterrows():
                text = document_text(doc["title"], doc["text"])
                doc_id = str(doc["doc_id"])
                seqs, used = [], []
                calls_before = source.calls
                for context, target in lm.document_windows(lm.encode(text)):
                    seq, hits = lm_sequence(list(context) + list(target), len(context), m, source, lm.decode, exclude=doc_id)
                    seqs.append(seq)
                    used.extend(hits)
                scored = score_sequences(retro, seqs, m, k, r, lm.pad_id)
                n_scored = sum(len(lp) for lp in scored)
                n_tokens = sum(len(s.ids) for s in seqs)
                n_neighbour = sum(len(n) for s in seqs for found in s.neighbours.values() for n in found)
                calls = source.calls - calls_before
                flops = sum(forward_flops(lm._body_params, len(s.ids), lm.n_layers, lm.d_model, (len(s.ids) + 1) // 2) for s in seqs)
                flops += forward_flops(lm._head_params, n_scored) + module_flops(retro.modules, n_tokens, n_neighbour)
                lm.counters.flops += flops
                lm.counters.tokens_forward += n_tokens
                lm.counters.tokens_scored += n_scored
                prompt_tokens = n_tokens - n_scored
                meter.add(tokens_prompt=prompt_tokens, tokens_retrieved=n_neighbour, tokens_scored=n_scored, flops=flops,
                          retrieval_calls=calls, examples=1)
                rows.append({
                    "doc_id": doc_id,
                    "nll_sum": -float(sum(lp.sum() for lp in scored)),
                    "n_tokens": n_scored,
                    "n_words": len(text.split()),
                    "retrieved_doc_ids": [p.doc_id for hits in used for p in hits[:1]],
                    "retrieved_scores": [p.score for hits in used for p in hits[:1]],
                    "tokens_prompt": prompt_tokens,
                    "tokens_retrieved": n_neighbour,
                    "tokens_scored": n_scored,
                    "retrieval_calls": calls,
                })
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self._save_cache()
        self.info["lm"] = {"chunk_size": m, "k": k, "neighbours": opt.eval_neighbours}
        return pd.DataFrame(rows)


def answer_terminator(lm: CausalLM) -> list[int]:
    """What ends a trained gold answer: the chat model's end-of-turn (EOS) token, else a newline —
    where generation stops (as Atlas's reader is trained; not imported, so a change there does not
    retrain RETRO)."""
    eos = lm.tokenizer.eos_token_id
    if lm.chat_formatter is not None and eos is not None:
        return [int(eos)]
    return lm.encode("\n")


def trainable_articles(ws: Any) -> pd.DataFrame:
    """The articles RETRO-fitting may read as text (`ragops.training.data.trainable_articles`)."""
    from ragops.training.data import trainable_articles as allowed

    return allowed(ws)
