"""Index refresh: re-embed the indexed chunks with the current passage encoder and swap the index in.

While a retriever trains with shared towers, the chunk embeddings in the index go stale: they
were computed by an older encoder. REPLUG LSR recomputes them every T steps *asynchronously*
(training keeps retrieving from the stale index meanwhile); Atlas on a schedule. `IndexRefresher`
does both:

- `start(step, snapshot)`: re-embed every chunk with a copy of the passage encoder holding
  `snapshot` (its weights at `step`), then build a FAISS index of the configured factory. In
  `sync` mode this happens now and the new index is in use when `start` returns; in `async` mode
  a background thread does it while training goes on with the stale index.
- `poll(step)`: the swap. An asynchronous refresh started at step s is swapped in at step
  s + `swap_after`, waiting for the worker if it is not done by then: a fixed step, not "whenever
  the thread finishes", so a seeded run is reproducible (and a resumed one identical).
- The swap is one assignment (`self.index`, `self.vectors`, `self.version`): a search sees the
  old index or the new one, never a half-built one.
- `state_dict()` / `load_state_dict()`: the current index version and its vectors, and a pending
  refresh's snapshot, so a run killed mid-refresh resumes with the stale index in use and the
  refresh restarted from the same weights (the run completes as if uninterrupted).

Every refresh is counted (`index_refreshes`) and timed (`index_refresh_s`, the worker's wall
time; `waited_s` is the part training spent blocked on it), and its encoder passes are charged.
Intermediate indexes live in memory only; the trained architecture writes the final one.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ragops.cost import forward_flops

if TYPE_CHECKING:
    from ragops.cost import CostMeter

Mode = Literal["sync", "async"]


@dataclass
class _Pending:
    started: int
    swap_step: int
    snapshot: dict[str, Any]
    thread: threading.Thread | None = None
    result: tuple[np.ndarray, Any, float] | None = None
    error: BaseException | None = None


class IndexRefresher:
    def __init__(
        self,
        texts: list[str],
        passage_model: Any,
        initial_vectors: np.ndarray,
        *,
        factory: str = "Flat",
        ef_search: int | None = 64,
        nprobe: int | None = 16,
        mode: Mode = "async",
        swap_after: int = 1,
        batch_size: int = 64,
        meter: CostMeter | None = None,
        progress: bool = False,
    ) -> None:
        """`passage_model`: the (training) SentenceTransformer whose architecture is copied once for
        the worker; `initial_vectors`: the embeddings of `texts` the training starts from (version 0)."""
        from ragops.retrieval.index import build_dense_index

        if mode not in ("sync", "async"):
            raise ValueError(f"refresh mode '{mode}': expected sync or async")
        if len(initial_vectors) != len(texts):
            raise ValueError(f"IndexRefresher: {len(initial_vectors)} vectors for {len(texts)} texts")
        self.texts = list(texts)
        self.factory, self.ef_search, self.nprobe = factory, ef_search, nprobe
        self.mode = mode
        self.swap_after = max(1, int(swap_after))
        self.batch_size = batch_size
        self.meter = meter
        self.progress = progress
        self._worker_model = copy.deepcopy(passage_model).to("cpu").eval()
        for p in self._worker_model.parameters():
            p.requires_grad_(False)
        self._n_params = int(sum(p.numel() for p in self._worker_model.parameters()))
        self.vectors = np.ascontiguousarray(initial_vectors, dtype=np.float32)
        self.index = build_dense_index(self.vectors, factory, ef_search, nprobe)
        self.version = 0
        self.refreshes = 0
        self.seconds = 0.0
        self.waited_s = 0.0
        self.pending: _Pending | None = None

    # --- the work ---------------------------------------------------------------------------------
    def _reembed(self, snapshot: dict[str, Any]) -> tuple[np.ndarray, Any, float]:
        import torch

        from ragops.retrieval.index import build_dense_index

        started = time.perf_counter()
        self._worker_model.load_state_dict(snapshot)
        self._worker_model.eval()
        with torch.no_grad():
            vectors = self._worker_model.encode(
                self.texts, batch_size=self.batch_size, show_progress_bar=self.progress,
                convert_to_numpy=True, normalize_embeddings=True,
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = build_dense_index(vectors, self.factory, self.ef_search, self.nprobe)
        return vectors, index, time.perf_counter() - started

    def _charge(self, seconds: float) -> None:
        self.refreshes += 1
        self.seconds += seconds
        if self.meter is not None:
            tokenizer = getattr(self._worker_model, "tokenizer", None)
            tokens = sum(len(ids) for ids in tokenizer(self.texts, truncation=True)["input_ids"]) if tokenizer is not None else 0
            flops = forward_flops(self._n_params, tokens)
            self.meter.add(index_refreshes=1, index_refresh_s=seconds, encoder_passes=len(self.texts), encoder_flops=flops, flops=flops)

    def _swap(self, vectors: np.ndarray, index: Any) -> None:
        # One assignment each, index last: searches see the old index or the new one.
        self.vectors = vectors
        self.version += 1
        self.index = index

    # --- schedule ----------------------------------------------------------------------------------
    def start(self, step: int, snapshot: dict[str, Any]) -> None:
        """Begin a refresh from the passage-encoder weights `snapshot` (taken at `step`)."""
        if self.pending is not None:
            self.finish()  # one refresh at a time: the previous one is swapped in first
        if self.mode == "sync":
            vectors, index, seconds = self._reembed(snapshot)
            self._charge(seconds)
            self._swap(vectors, index)
            return
        pending = _Pending(started=step, swap_step=step + self.swap_after, snapshot=snapshot)

        def work() -> None:
            try:
                pending.result = self._reembed(snapshot)
            except BaseException as error:  # noqa: BLE001 - re-raised in the training thread
                pending.error = error

        pending.thread = threading.Thread(target=work, name="ragops-index-refresh", daemon=True)
        self.pending = pending
        pending.thread.start()

    def poll(self, step: int) -> bool:
        """Swap a pending refresh in when `step` reached its swap step. True when a swap happened."""
        if self.pending is None or step < self.pending.swap_step:
            return False
        self.finish()
        return True

    def finish(self) -> None:
        """Wait for a pending refresh and swap it in (also at the end of training)."""
        pending = self.pending
        if pending is None:
            return
        started = time.perf_counter()
        if pending.thread is not None:
            pending.thread.join()
        self.waited_s += time.perf_counter() - started
        self.pending = None
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        vectors, index, seconds = pending.result
        self._charge(seconds)
        self._swap(vectors, index)

    # --- resumable state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "vectors": self.vectors if self.version > 0 else None,  # version 0 = the vectors training began with
            "refreshes": self.refreshes, "seconds": self.seconds,
            "pending": None if self.pending is None else {
                "started": self.pending.started, "swap_step": self.pending.swap_step, "snapshot": self.pending.snapshot,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ragops.retrieval.index import build_dense_index

        if state["version"] > 0:
            self.vectors = np.ascontiguousarray(state["vectors"], dtype=np.float32)
            self.index = build_dense_index(self.vectors, self.factory, self.ef_search, self.nprobe)
        self.version = int(state["version"])
        self.refreshes, self.seconds = int(state["refreshes"]), float(state["seconds"])
        pending = state.get("pending")
        if pending is not None:
            # Killed mid-refresh: the stale index stays in use; the refresh restarts from the same weights.
            self.start(int(pending["started"]), pending["snapshot"])
            if self.pending is not None:
                self.pending.swap_step = int(pending["swap_step"])

    def stats(self) -> dict[str, float]:
        return {"index_refreshes": self.refreshes, "index_refresh_s": round(self.seconds, 3),
                "index_refresh_waited_s": round(self.waited_s, 3), "index_version": self.version}
