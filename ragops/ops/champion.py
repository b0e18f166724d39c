"""The registered `champion` model: a small MLflow pyfunc that carries one architecture's card.

Kept apart from `ragops.compare` so that importing the comparison functions does not import
MLflow; MLflow pickles this class by reference, so loading the model needs ragops installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow.pyfunc import PythonModel


class ArchitectureCard(PythonModel):
    """What is registered is the *recipe*: the architecture, its options, the LM, encoder, index
    and chunking it was evaluated with, its scores and source run (card.json). `predict` returns
    the card, one row per input row; `ragops evaluate <architecture>` rebuilds the system itself.
    """

    def load_context(self, context) -> None:
        self.card = json.loads(Path(context.artifacts["card"]).read_text(encoding="utf-8"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ARG002
        row = {"architecture": self.card["architecture"], "card": json.dumps(self.card, sort_keys=True)}
        return pd.DataFrame([row] * max(len(model_input), 1))
