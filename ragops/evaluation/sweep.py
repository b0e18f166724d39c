"""In-Context RALM stride x query-length sweep on held-out dev documents, and its plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ragops.cost import CostMeter
from ragops.evaluation.data import check_workspace_leakage, load_heldout
from ragops.evaluation.harness import evaluate_lm

if TYPE_CHECKING:
    from ragops.config import Config
    from ragops.lm.model import CausalLM
    from ragops.paths import Workspace

SWEEP_COLUMNS = ["stride", "query_length", "token_ppl", "word_ppl", "wall_s", "lm_tokens", "retrieval_calls"]


def run_sweep(
    ws: Workspace,
    config: Config,
    progress: bool = True,
    *,
    lm: CausalLM | None = None,
    retrievers: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """One row per (stride, query_length) of `config.sweep`: perplexities and cost on `max_docs` docs.

    Columns: stride, query_length, token_ppl, word_ppl, wall_s, lm_tokens (tokens run through the
    LM, reranking included), retrieval_calls. `df.attrs["closed_book"]` holds the plain LM's
    token_ppl / word_ppl on the same documents, the line every point should beat.
    """
    from tqdm.auto import tqdm

    from ragops.architectures import registry
    from ragops.evaluation.runner import build_architecture

    sweep = config.sweep
    cls = registry.resolve(sweep.architecture, config.architectures.get(sweep.architecture))
    base_options = config.architectures.get(sweep.architecture) or cls.Options()
    if not {"stride", "query_length"} <= set(type(base_options).model_fields):
        raise ValueError(f"sweep.architecture '{sweep.architecture}' has no stride/query_length options")
    docs = load_heldout(ws, sweep.split, sweep.max_docs)
    check_workspace_leakage(ws)
    shared_retrievers: dict[str, Any] = dict(retrievers or {})

    baseline = build_architecture("closed_book", ws, config, progress=False, lm=lm)
    lm = baseline.lm
    closed_metrics, _ = evaluate_lm(baseline, docs, CostMeter("inference"), config.eval, config.seed)

    rows = []
    points = [(s, q) for s in sweep.strides for q in sweep.query_lengths]
    for stride, query_length in tqdm(points, desc="sweep", unit="point", disable=not progress):
        options = base_options.model_copy(update={"stride": stride, "query_length": query_length})
        arch = build_architecture(sweep.architecture, ws, config, progress=False, lm=lm, retrievers=shared_retrievers, options=options)
        meter = CostMeter("inference")
        before = lm.counters.snapshot()
        start = time.perf_counter()
        with meter:
            metrics, _ = evaluate_lm(arch, docs, meter, config.eval, config.seed)
        shared_retrievers.update(arch.ctx.retrievers)
        rows.append(
            {
                "stride": stride,
                "query_length": query_length,
                "token_ppl": metrics["lm/token_ppl"],
                "word_ppl": metrics["lm/word_ppl"],
                "wall_s": time.perf_counter() - start,
                "lm_tokens": int(lm.counters.since(before)["tokens_forward"]),
                "retrieval_calls": int(meter.counters["retrieval_calls"]),
            }
        )
    table = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    table.attrs["closed_book"] = {"token_ppl": closed_metrics["lm/token_ppl"], "word_ppl": closed_metrics["lm/word_ppl"]}
    table.attrs["docs"] = [str(d) for d in docs["doc_id"]]
    return table


def plot_sweep(df: pd.DataFrame, png_path: str | Path, metric: str = "token_ppl", cost: str = "lm_tokens") -> Path:
    """Perplexity vs stride (log2 axis), one line per query length; LM tokens per point (dashed) on a
    second axis; the closed-book perplexity as a horizontal reference when `df.attrs` has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    twin = ax.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (query_length, group) in enumerate(sorted(df.groupby("query_length"), key=lambda g: g[0])):
        group = group.sort_values("stride")
        color = colors[i % len(colors)]
        ax.plot(group["stride"], group[metric], marker="o", color=color, label=f"query length {query_length}")
        twin.plot(group["stride"], group[cost], linestyle="--", marker="x", color=color, alpha=0.5)
    closed = df.attrs.get("closed_book", {}) if hasattr(df, "attrs") else {}
    if metric in closed:
        ax.axhline(closed[metric], color="grey", linestyle=":", label="closed book")
    if len(df):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(df["stride"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("stride (tokens between retrievals)")
    ax.set_ylabel(metric.replace("_", " "))
    twin.set_ylabel(f"{cost.replace('_', ' ')} (dashed)")
    ax.set_title("In-Context RALM: perplexity and cost vs retrieval stride")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
