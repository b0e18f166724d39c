"""Sentence embeddings with a content-hash cache.

`Encoder` wraps a sentence-transformers model (the packaged all-MiniLM-L6-v2 by default) and
always returns float32, L2-normalised vectors. `EmbeddingCache` stores vectors keyed by the
sha256 of the exact embedded text, under a folder named after the encoder's fingerprint, so that
re-embedding a corpus after a few edits only computes the edited chunks. `embed_texts` ties the
two together and processes its input in fixed blocks of input positions, so that a corpus
embedded in shards (`shard_ranges`) gives bit-identical vectors to a one-shot run.

torch and sentence-transformers are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ragops.errors import RagopsError
from ragops.io import atomic_file, atomic_path

log = logging.getLogger(__name__)

#: Input positions processed together by `embed_texts` (sorted by length inside a block).
DEFAULT_BLOCK_SIZE = 1024


def chunk_embedding_text(title: str, text: str) -> str:
    """What is embedded (and BM25-indexed, and shown to the LM) for a chunk: title line, then text."""
    title = (title or "").strip()
    text = text or ""
    return f"{title}\n{text}" if title else text


def text_key(text: str) -> str:
    """Cache key of one embedded text: sha256 of its exact UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RagopsError(f"embed.device: '{device}' requested but CUDA is not available (use 'auto' or 'cpu')")
    return device


class Encoder:
    """A sentence-transformers model that returns float32, L2-normalised numpy vectors."""

    def __init__(self, model: Any, spec: str = "custom", *, batch_size: int = 64, fingerprint: str | None = None) -> None:
        self.model = model  # the SentenceTransformer (fine-tuning code trains it in place)
        self.spec = spec
        self.batch_size = int(batch_size)
        self._fingerprint = fingerprint
        self._fingerprint_lock = threading.Lock()

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        spec: str = "default",
        device: str = "auto",
        threads: int | None = None,
        max_seq_length: int | None = None,
        batch_size: int = 64,
    ) -> Encoder:
        """'default' = the packaged all-MiniLM-L6-v2; else a sentence-transformers name or local path."""
        from ragops.resources import resolve_encoder

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        location = resolve_encoder(spec)
        resolved_device = resolve_device(device)
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(location, device=resolved_device)
        except Exception as error:  # noqa: BLE001 - many loader failure types; report one line
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RagopsError(f"embed.model: cannot load encoder '{spec}' from {location} ({reason})") from None
        if max_seq_length:
            model.max_seq_length = int(max_seq_length)
        return cls(model, spec, batch_size=batch_size)

    # --- properties -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        if dim is None:  # pragma: no cover - unusual models
            dim = int(self.encode(["dimension probe"], progress=False).shape[1])
        return int(dim)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def max_seq_length(self) -> int | None:
        return self.model.max_seq_length

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def fingerprint(self) -> str:
        """Stable id of (weights, tokenizer, max_seq_length, L2 normalisation); cached until `refresh_fingerprint`."""
        if self._fingerprint is None:
            with self._fingerprint_lock:
                if self._fingerprint is None:
                    self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def refresh_fingerprint(self) -> str:
        """Recompute the fingerprint (call after training the model in place)."""
        self._fingerprint = None
        return self.fingerprint

    def _compute_fingerprint(self) -> str:
        import torch

        digest = hashlib.sha256()
        header = {
            "class": type(self.model).__name__,
            "modules": [type(module).__name__ for module in self.model],
            "tokenizer": type(self.tokenizer).__name__ if self.tokenizer is not None else None,
            "vocab": len(self.tokenizer) if self.tokenizer is not None else None,
            "max_seq_length": self.max_seq_length,
            "normalize": "l2",
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(str(tensor.dtype).encode())
                flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        return digest.hexdigest()[:32]

    # --- encoding -----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], *, progress: bool = True, batch_size: int | None = None) -> np.ndarray:
        """float32 [len(texts), dim], L2-normalised, rows in input order.

        Texts are sorted by length (stable, longest first) and cut into batches, so each batch is
        padded to similar lengths; the output is put back in input order.
        """
        texts = list(texts)
        batch_size = int(batch_size or self.batch_size)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([-len(text) for text in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), desc="Embedding", unit="text", disable=not progress, leave=False)
        try:
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                vectors = self.model.encode(
                    [texts[i] for i in rows],
                    batch_size=len(rows),
                    show_progress_bar=False,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                )
                out[rows] = np.asarray(vectors, dtype=np.float32)
                bar.update(len(rows))
        finally:
            bar.close()
        return out

    def __repr__(self) -> str:
        return f"Encoder(spec={self.spec!r}, dim={self.dim}, device={self.device!r}, max_seq_length={self.max_seq_length})"


class EmbeddingCache:
    """Append-only, content-addressed vector store under `root/<fingerprint>/`.

    Each `put` writes one shard: `<name>.npy` (float32 [n, dim]) then `<name>.keys` (one sha256
    per line), each atomically. A shard counts only once its `.keys` file exists and agrees with
    its `.npy` row count, so a crash mid-write leaves at most an ignored orphan. Shards are never
    modified, so any number of processes may read while others append (`refresh` picks up shards
    written by others since opening).
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        if not fingerprint or "/" in fingerprint:
            raise RagopsError(f"embedding cache: invalid fingerprint '{fingerprint}'")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[int, int]] = {}  # key -> (shard number, row)
        self._shards: list[np.ndarray] = []
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self.dim: int | None = None
        self.refresh()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def refresh(self) -> int:
        """Load shards not seen yet; returns how many keys were added."""
        added = 0
        with self._lock:
            for keys_file in sorted(self.dir.glob("*.keys")):
                name = keys_file.stem
                if name in self._loaded:
                    continue
                vectors_file = keys_file.with_suffix(".npy")
                try:
                    keys = keys_file.read_text(encoding="ascii").split()
                    vectors = np.load(vectors_file, mmap_mode="r")
                except (OSError, ValueError) as error:
                    log.warning("embedding cache: skipping unreadable shard %s (%s)", keys_file, error)
                    continue
                if vectors.ndim != 2 or vectors.shape[0] != len(keys) or vectors.dtype != np.float32:
                    log.warning("embedding cache: skipping inconsistent shard %s", keys_file)
                    continue
                if self.dim is None:
                    self.dim = int(vectors.shape[1])
                elif vectors.shape[1] != self.dim:
                    log.warning("embedding cache: skipping shard %s with dim %d != %d", keys_file, vectors.shape[1], self.dim)
                    continue
                number = len(self._shards)
                self._shards.append(np.asarray(vectors))
                self._loaded.add(name)
                for row, key in enumerate(keys):
                    if key not in self._index:
                        self._index[key] = (number, row)
                        added += 1
        return added

    def get(self, key: str) -> np.ndarray | None:
        where = self._index.get(key)
        if where is None:
            return None
        return np.array(self._shards[where[0]][where[1]], dtype=np.float32)

    def get_many(self, keys: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors [n, dim] with zeros where missing, found mask [n])."""
        found = np.array([key in self._index for key in keys], dtype=bool)
        if self.dim is None:
            return None, found
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            if found[i]:
                number, row = self._index[key]
                out[i] = self._shards[number][row]
        return out, found

    def put_many(self, keys: Sequence[str], vectors: np.ndarray) -> int:
        """Append the keys not cached yet as one new shard; returns how many were written."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"put_many: {len(keys)} keys but vectors of shape {vectors.shape}")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise RagopsError(f"embedding cache {self.dir}: vectors of dim {vectors.shape[1]}, cache holds dim {self.dim}")
        fresh: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self._index and key not in fresh:
                fresh[key] = i
        if not fresh:
            return 0
        rows = np.fromiter(fresh.values(), dtype=np.int64, count=len(fresh))
        block = np.ascontiguousarray(vectors[rows])
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with atomic_path(self.dir / f"{name}.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, block)
        with atomic_file(self.dir / f"{name}.keys") as handle:  # the commit marker: written last
            handle.write("\n".join(fresh) + "\n")
        with self._lock:
            if self.dim is None:
                self.dim = int(block.shape[1])
            number = len(self._shards)
            self._shards.append(block)
            self._loaded.add(name)
            for row, key in enumerate(fresh):
                self._index.setdefault(key, (number, row))
        return len(fresh)

    def compact(self) -> int:
        """Merge all shards into one (safe for readers that open afterwards); returns the key count."""
        with self._lock:
            old = [self.dir / f"{name}.{suffix}" for name in self._loaded for suffix in ("keys", "npy")]
            keys = list(self._index)
            vectors = (
                np.stack([self._shards[n][r] for n, r in self._index.values()]).astype(np.float32)
                if keys
                else None
            )
            self._index.clear()
            self._shards.clear()
            self._loaded.clear()
        if keys:
            self.put_many(keys, vectors)
        for path in old:
            if path.stem not in self._loaded:
                path.unlink(missing_ok=True)
        return len(keys)

    def stats(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "keys": len(self._index), "shards": len(self._shards), "dim": self.dim}


def shard_ranges(n: int, n_shards: int, block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, int]]:
    """Split rows [0, n) into at most `n_shards` contiguous, non-empty (start, end) ranges.

    Boundaries fall on multiples of `block_size` (the `embed_texts` block), so embedding each
    range separately with the same block size and concatenating gives exactly the vectors of a
    one-shot `embed_texts` run. Fewer ranges come back when there are fewer blocks than shards.
    """
    if n < 0 or n_shards < 1 or block_size < 1:
        raise ValueError(f"shard_ranges: need n >= 0, n_shards >= 1, block_size >= 1 (got {n}, {n_shards}, {block_size})")
    n_blocks = -(-n // block_size)
    if n_blocks == 0:
        return []
    n_shards = min(n_shards, n_blocks)
    base, extra = divmod(n_blocks, n_shards)
    ranges, block = [], 0
    for shard in range(n_shards):
        count = base + (1 if shard < extra else 0)
        start, block = block * block_size, block + count
        ranges.append((start, min(block * block_size, n)))
    return ranges


def embed_texts(
    texts: Sequence[str],
    encoder: Encoder,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Vectors for `texts` in input order (float32, L2-normalised), taking what the cache has.

    Input positions are processed in blocks of `block_size`; inside a block the texts to compute
    are sorted by length and batched (see `Encoder.encode`), and written to the cache as one shard
    as soon as the block is done, so an interrupted run resumes where it stopped.
    Stats: total, cached (rows served from the cache), computed (texts encoded), seconds,
    texts_per_s (total / seconds) and computed_per_s.
    """
    texts = list(texts)
    started = time.perf_counter()
    if cache is not None and cache.fingerprint != encoder.fingerprint:
        raise RagopsError(
            f"embedding cache {cache.dir} belongs to encoder {cache.fingerprint}, not {encoder.fingerprint} ('{encoder.spec}')"
        )
    dim = encoder.dim
    out = np.zeros((len(texts), dim), dtype=np.float32)
    keys = [text_key(text) for text in texts]
    done = np.zeros(len(texts), dtype=bool)
    if cache is not None and texts:
        cached, done = cache.get_many(keys)
        if cached is not None:
            if cached.shape[1] != dim:
                raise RagopsError(f"embedding cache {cache.dir}: dim {cached.shape[1]} != encoder dim {dim}")
            out[done] = cached[done]
    n_cached = int(done.sum())
    computed: dict[str, int] = {}  # key -> row holding its vector (duplicates within this call)
    n_todo = len(texts) - n_cached
    bar = tqdm(total=n_todo, desc="Embedding", unit="text", disable=not progress or n_todo == 0, leave=False)
    try:
        for start in range(0, len(texts), block_size):
            todo, todo_keys, copies = [], [], []
            for i in range(start, min(start + block_size, len(texts))):
                if done[i]:
                    continue
                source = computed.get(keys[i])
                if source is not None:
                    copies.append((i, source))  # same text seen earlier in this call
                    continue
                computed[keys[i]] = i
                todo.append(i)
                todo_keys.append(keys[i])
            if todo:
                vectors = encoder.encode([texts[i] for i in todo], progress=False)
                out[todo] = vectors
                done[todo] = True
                if cache is not None:
                    cache.put_many(todo_keys, vectors)
            for i, source in copies:
                out[i] = out[source]
                done[i] = True
            bar.update(len(todo) + len(copies))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    stats = {
        "total": len(texts),
        "cached": n_cached,
        "computed": len(computed),
        "seconds": round(seconds, 4),
        "texts_per_s": round(len(texts) / seconds, 2) if seconds > 0 else 0.0,
        "computed_per_s": round(len(computed) / seconds, 2) if seconds > 0 else 0.0,
    }
    return out, stats
