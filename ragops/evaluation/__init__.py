"""The evaluation harness: metrics, the shared prompt, `run_architecture`, the In-Context RALM sweep.

Names are imported lazily so `import ragops.evaluation.metrics` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalResult", "build_architecture", "plot_sweep", "run_architecture", "run_sweep"]


def __getattr__(name: str) -> Any:
    if name in ("EvalResult", "build_architecture", "run_architecture"):
        from ragops.evaluation import runner

        return getattr(runner, name)
    if name in ("run_sweep", "plot_sweep"):
        from ragops.evaluation import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'ragops.evaluation' has no attribute '{name}'")
