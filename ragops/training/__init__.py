"""The training substrate every trained architecture shares.

- `loop`: one flat training loop (AdamW, warm-up + decay, gradient accumulation and clipping,
  seeded, CPU or CUDA), dev evaluation with early stopping, resumable checkpoints, a wall-clock
  guard, and a `report(step, metrics)` callback the stage layer turns into MLflow loss curves.
- `checkpoint`: atomic, settings-checked checkpoint files.
- `data`: training examples from the benchmark's train split and train-split articles only,
  behind a leakage gate.
- `refresh`: re-embedding the indexed chunks with the current document encoder and swapping the
  FAISS index in, synchronously or in the background (REPLUG LSR, Atlas).
- `teachers`: cached LM-likelihood scores of (example, passage) pairs for retriever distillation.

Modules here import torch lazily at call time where they can; none imports MLflow or Prefect.
"""
