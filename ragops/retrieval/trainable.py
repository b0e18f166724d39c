"""A dual-encoder retriever that can be fine-tuned: the gradient path through sentence-transformers.

`TrainableRetriever` holds a query tower and a passage tower (sentence-transformers models):

- `towers="shared"`: one model for both (REALM, REPLUG LSR, AAR): training changes the passage
  embeddings too, so the index goes stale and must be refreshed (`ragops.training.refresh`);
- `towers="query_side"`: an untied, trainable copy for queries and the frozen original for
  passages (Atlas's query-side fine-tuning): the workspace index stays valid, nothing to refresh.

`embed_queries` / `embed_passages` return L2-normalised torch tensors with a gradient (the
passage tower only when it is trainable), so `scores = q @ p.T` are cosines. Cost: every text
through a tower is one encoder pass; FLOPs are 2·params per token forward, 3x that with backward.

`save(dir)` writes `query_encoder/` (and `passage_encoder/` when untied) with `save_pretrained`;
`load_trained_encoders(dir)` and `ragops.retrieval.retriever.load_retriever(..., artifact_dir=...)`
bring them back for evaluation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ragops.cost import forward_flops
from ragops.errors import RagopsError

if TYPE_CHECKING:
    import torch

    from ragops.cost import CostMeter
    from ragops.retrieval.embed import Encoder

Towers = Literal["shared", "query_side"]
QUERY_DIR = "query_encoder"
PASSAGE_DIR = "passage_encoder"


class TrainableRetriever:
    def __init__(self, encoder: Encoder, towers: Towers = "shared", *, device: str | None = None, meter: CostMeter | None = None) -> None:
        """`encoder` is the workspace's `Encoder` (its SentenceTransformer is copied, never trained in place)."""
        if towers not in ("shared", "query_side"):
            raise RagopsError(f"towers '{towers}': expected shared or query_side")
        self.towers = towers
        self.spec = encoder.spec
        self.batch_size = encoder.batch_size
        self.query_model = copy.deepcopy(encoder.model)
        if device:
            self.query_model.to(device)
        if towers == "shared":
            self.passage_model = self.query_model
        else:
            self.passage_model = copy.deepcopy(encoder.model)
            if device:
                self.passage_model.to(device)
            for p in self.passage_model.parameters():
                p.requires_grad_(False)
            self.passage_model.eval()
        self.meter = meter
        self.n_params = int(sum(p.numel() for p in self.query_model.parameters()))

    # --- what the training loop sees ------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"query_encoder": self.query_model}

    @property
    def trainable_parameters(self) -> int:
        return int(sum(p.numel() for p in self.query_model.parameters() if p.requires_grad))

    @property
    def passages_trainable(self) -> bool:
        return self.towers == "shared"

    # --- embeddings with a gradient --------------------------------------------------------------------
    def _embed(self, model: Any, texts: list[str], backward: bool) -> torch.Tensor:
        import torch

        features = model.preprocess(list(texts))
        device = next(model.parameters()).device
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        tokens = int(features["attention_mask"].sum()) if "attention_mask" in features else 0
        out = model(features)["sentence_embedding"]
        if self.meter is not None:
            flops = forward_flops(self.n_params, tokens) * (3.0 if backward else 1.0)
            self.meter.add(encoder_passes=len(texts), encoder_flops=flops, flops=flops)
        return torch.nn.functional.normalize(out, dim=-1)

    def embed_queries(self, texts: list[str]) -> torch.Tensor:
        return self._embed(self.query_model, texts, backward=self.query_model.training)

    def embed_passages(self, texts: list[str]) -> torch.Tensor:
        """Passage embeddings; with a gradient only when the passage tower is trained (shared towers)."""
        import torch

        if self.passages_trainable:
            return self._embed(self.passage_model, texts, backward=self.passage_model.training)
        with torch.no_grad():
            return self._embed(self.passage_model, texts, backward=False)

    # --- inference wrappers ---------------------------------------------------------------------------
    def query_encoder(self) -> Encoder:
        """The query tower as a plain (inference) `Encoder`."""
        from ragops.retrieval.embed import Encoder

        return Encoder(self.query_model, f"{self.spec}+tuned-query", batch_size=self.batch_size)

    def passage_encoder(self) -> Encoder:
        from ragops.retrieval.embed import Encoder

        suffix = "+tuned" if self.passages_trainable else ""
        return Encoder(self.passage_model, f"{self.spec}{suffix}", batch_size=self.batch_size)

    def passage_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the passage tower's weights (a refresh snapshot)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.passage_model.state_dict().items()}

    def save(self, directory: str | Path) -> dict[str, str]:
        """`query_encoder/` and, when untied, `passage_encoder/` in sentence-transformers format."""
        directory = Path(directory)
        self.query_model.save_pretrained(str(directory / QUERY_DIR))
        written = {"query": QUERY_DIR, "towers": self.towers}
        if not self.passages_trainable:
            self.passage_model.save_pretrained(str(directory / PASSAGE_DIR))
            written["passage"] = PASSAGE_DIR
        return written


def load_trained_encoders(directory: str | Path, *, device: str = "auto", batch_size: int = 64) -> tuple[Encoder, Encoder | None]:
    """(query encoder, passage encoder or None when the towers are shared) saved by `TrainableRetriever.save`."""
    from ragops.retrieval.embed import Encoder

    directory = Path(directory)
    if not (directory / QUERY_DIR).is_dir():
        raise RagopsError(f"{directory}: no trained query encoder ({QUERY_DIR}/ missing)")
    query = Encoder.load(str(directory / QUERY_DIR), device=device, batch_size=batch_size)
    passage = Encoder.load(str(directory / PASSAGE_DIR), device=device, batch_size=batch_size) if (directory / PASSAGE_DIR).is_dir() else None
    return query, passage
