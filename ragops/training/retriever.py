"""What every retriever-training method shares (REPLUG LSR, AAR, Atlas's retriever side).

- `RetrievalExample` and `retrieval_examples`: train-split questions (x = question, y = gold
  answer, gold article known) and language-modelling windows (x = a prefix of a train-split
  article, y = its continuation, the source article excluded from retrieval), split into a
  training part and a dev slice held back from the gradient (early stopping, dev metrics). Dev and
  test questions are never used: the benchmark's dev split is for model comparison, not training.
- `RetrieverSetup`: the trainable dual encoder, the chunk table and the index training retrieves
  candidates from (an `IndexRefresher` when the passage tower trains, else the fixed workspace
  index), with `candidates()` = top-k chunks of the current (possibly stale) index for a batch.
- `write_trained_retriever`: the final artifacts: tuned encoder(s) and an index of every chunk
  embedded by the final passage encoder (re-embedded when the passage tower changed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragops.errors import RagopsError

if TYPE_CHECKING:
    from ragops.cost import CostMeter
    from ragops.paths import Workspace
    from ragops.retrieval.retriever import ChunkTable
    from ragops.retrieval.trainable import TrainableRetriever
    from ragops.training.refresh import IndexRefresher


@dataclass(frozen=True)
class RetrievalExample:
    example_id: str
    kind: str  # a QA task name, or "lm"
    query: str  # what the retriever is asked (question, or the window's prefix)
    target: str  # y: the gold answer, or the window's continuation
    gold_doc_id: str | None  # QA: the gold article; lm: None
    source_doc_id: str | None  # lm: the article the window comes from (excluded from retrieval)
    question: str = ""  # QA: the question as the LM sees it


def retrieval_examples(
    ws: Workspace, *, qa_per_task: int, lm_windows: int, encode, decode, prefix_tokens: int, target_tokens: int,
    seed: int, dev_fraction: float,
) -> tuple[list[RetrievalExample], list[RetrievalExample]]:
    """(train, dev) examples from train-split questions and train-split article windows."""
    from ragops.training.data import lm_windows as make_windows
    from ragops.training.data import train_questions

    examples: list[RetrievalExample] = []
    if qa_per_task:
        for _, q in train_questions(ws, qa_per_task, seed).iterrows():
            examples.append(RetrievalExample(str(q["qid"]), str(q["task"]), str(q["question"]), str(q["answer"]),
                                             # a user question may name no gold document
                                             q["gold_doc_id"] if isinstance(q["gold_doc_id"], str) else None,
                                             None, str(q["question"])))
    for window in make_windows(ws, lm_windows, encode, decode, prefix_tokens, target_tokens, seed):
        examples.append(RetrievalExample(window.example_id, "lm", window.prefix, window.target, None, window.doc_id))
    if not examples:
        raise RagopsError("no training examples (qa_examples and lm_examples are both 0, or the train split is empty)")
    order = np.random.default_rng([seed, 11]).permutation(len(examples))
    n_dev = int(round(dev_fraction * len(examples)))
    n_dev = min(n_dev, len(examples) - 1)
    dev = [examples[i] for i in sorted(order[:n_dev])]
    train = [examples[i] for i in sorted(order[n_dev:])]
    return train, dev


@contextlib.contextmanager
def evaluating(*modules: Any):
    """Modules in eval mode (no dropout) inside the block, their previous mode restored after."""
    previous = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, previous, strict=True):
            m.train(mode)


class RetrieverSetup:
    """The trainable retriever with the index it retrieves training candidates from."""

    def __init__(self, ws: Workspace, config: Any, towers: str, *, meter: CostMeter | None, device: str,
                 refresh_mode: str = "async", swap_after: int = 1, progress: bool = False) -> None:
        from ragops.retrieval.retriever import load_chunk_table, load_encoder
        from ragops.retrieval.trainable import TrainableRetriever
        from ragops.training.refresh import IndexRefresher

        self.ws, self.config = ws, config
        self.table: ChunkTable = load_chunk_table(ws.chunks)
        self.base_encoder = load_encoder(config.embed)
        self.retriever: TrainableRetriever = TrainableRetriever(self.base_encoder, towers, device=device, meter=meter)
        vectors = self._initial_vectors()
        self.refresher: IndexRefresher | None = None
        self.fixed_index = None
        if self.retriever.passages_trainable:
            self.refresher = IndexRefresher(
                self.table.texts, self.retriever.passage_model, vectors, factory="Flat", mode=refresh_mode,
                swap_after=swap_after, batch_size=config.embed.batch_size, meter=meter, progress=progress,
            )
        else:
            from ragops.retrieval.index import build_dense_index

            self.fixed_index = build_dense_index(vectors, "Flat")

    def _initial_vectors(self) -> np.ndarray:
        """The workspace's chunk embeddings (made by the same encoder: checked), else computed now."""
        from ragops.io import read_json

        meta_file = self.ws.embeddings_dir / "meta.json"
        if meta_file.exists():
            meta = read_json(meta_file)
            vectors = np.load(self.ws.embeddings_dir / "vectors.npy")
            if meta.get("fingerprint") == self.base_encoder.fingerprint and len(vectors) == len(self.table):
                return vectors
        return self.base_encoder.encode(self.table.texts, progress=False)

    @property
    def index(self) -> Any:
        return self.refresher.index if self.refresher is not None else self.fixed_index

    def query_vectors(self, queries: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad(), evaluating(self.retriever.query_model):
            return self.retriever.embed_queries(queries).cpu().numpy().astype(np.float32)

    def candidates(self, examples: list[RetrievalExample], k: int) -> list[list[int]]:
        """Chunk-table rows of the top-k chunks for each example from the current index (an lm
        window's own article excluded), best first."""
        vectors = self.query_vectors([e.query for e in examples])
        exclude = [{e.source_doc_id} if e.source_doc_id else set() for e in examples]
        excluded = self.table.exclude_rows(exclude, len(examples))
        total = int(self.index.ntotal)
        fetch = min(total, k + max((len(r) for r in excluded), default=0))
        _, rows = self.index.search(vectors, fetch)
        out = []
        for row, bad in zip(rows, excluded, strict=True):
            banned = set(bad.tolist())
            out.append([int(r) for r in row if r >= 0 and int(r) not in banned][:k])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"refresher": self.refresher.state_dict() if self.refresher is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.refresher is not None and state.get("refresher") is not None:
            self.refresher.load_state_dict(state["refresher"])

    def maybe_refresh(self, step: int, total_steps: int, every: int = 0, *, due: Callable[[int], bool] | None = None) -> dict[str, float]:
        """After optimizer step `step`: swap a finished background refresh in when due; start one every
        `every` steps, or at the steps where `due(step)` is true (a schedule, e.g. Atlas's
        `RefreshSchedule.due`). None after the last step: the final index is re-embedded anyway."""
        if self.refresher is None:
            return {}
        swapped = self.refresher.poll(step)
        start = due(step) if due is not None else bool(every) and step % every == 0
        if start and step < total_steps:
            self.refresher.start(step, self.retriever.passage_state())
        return {"train/index_version": float(self.refresher.version)} if swapped or start else {}


def write_trained_retriever(directory: Path, setup: RetrieverSetup, *, meter: CostMeter | None, progress: bool) -> dict[str, Any]:
    """`directory/query_encoder` (+ `passage_encoder`) and `directory/index`: every chunk embedded by the
    final passage encoder (re-embedded when it trained), indexed with the workspace's index settings."""
    import time

    from ragops.cost import forward_flops
    from ragops.io import path_hash
    from ragops.retrieval.embed import embed_texts
    from ragops.retrieval.index import build_dense_index, chunk_ids_hash, write_index

    if setup.refresher is not None:
        setup.refresher.finish()
    directory.mkdir(parents=True, exist_ok=True)
    written = setup.retriever.save(directory)
    passage = setup.retriever.passage_encoder()
    query = setup.retriever.query_encoder()
    started = time.perf_counter()
    if setup.retriever.passages_trainable:
        vectors, _ = embed_texts(setup.table.texts, passage, None, progress=progress)
        seconds = time.perf_counter() - started
        if meter is not None:
            tokenizer = passage.tokenizer
            tokens = sum(len(ids) for ids in tokenizer(setup.table.texts, truncation=True)["input_ids"])
            flops = forward_flops(setup.retriever.n_params, tokens)
            meter.add(index_refreshes=1, index_refresh_s=seconds, encoder_passes=len(setup.table.texts), encoder_flops=flops, flops=flops)
    else:
        vectors = np.load(setup.ws.embeddings_dir / "vectors.npy") if (setup.ws.embeddings_dir / "vectors.npy").exists() else passage.encode(setup.table.texts, progress=False)
    cfg = setup.config.index
    dense = build_dense_index(vectors, cfg.factory, cfg.ef_search, cfg.nprobe)
    meta = {
        "encoder": f"{setup.config.embed.model} (fine-tuned)", "fingerprint": passage.fingerprint, "query_fingerprint": query.fingerprint,
        "factory": cfg.factory, "ef_search": cfg.ef_search, "nprobe": cfg.nprobe, "towers": written["towers"],
        "chunk_ids_hash": chunk_ids_hash(setup.table.chunk_ids), "chunks_hash": path_hash(setup.ws.chunks),
    }
    return write_index(directory / "index", dense, None, meta)
