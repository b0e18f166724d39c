"""The `ragops` command line: one sub-command per stage, and `ragops run` for the whole pipeline.

DVC stages call these same commands (see dvc.yaml); Prefect tasks call the same functions in
`ragops.stages`. Run `ragops --help` for the list.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from ragops.config import EVAL_TASKS
from ragops.errors import RagopsError, UsageError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="ragops",
    help=(
        "Build, train, evaluate and compare retrieval-augmented generation (RAG) architectures, "
        "and see what each one costs.\n\n"
        "Pipeline: ingest → validate → split → chunk → embed → index → eval-retrieval → prepare-lm → "
        "train <architecture> → evaluate <architecture> → compare. `ragops run` runs them all; each stage skips itself "
        "when its inputs are unchanged. Configuration: params.yaml (profiles: smoke, default, full)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass
class State:
    workspace: Path
    params: Path | None
    profile: str | None

    def load(self, *, params_optional: bool = False):
        """(Workspace, Config). `params_optional`: a workspace without params.yaml runs on the code's
        defaults (for commands that compute nothing from them); an explicit --params must exist."""
        from ragops.params import load_config
        from ragops.paths import Workspace

        ws = Workspace(self.workspace)
        return ws, load_config(self.params or ws.params, self.profile, missing_ok=params_optional and self.params is None)


@app.callback()
def main_options(
    ctx: typer.Context,
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Project folder (holds params.yaml, data/, artifacts/, mlruns/).")] = Path("."),
    params: Annotated[Optional[Path], typer.Option("--params", help="Configuration file (default: <workspace>/params.yaml).")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile from params.yaml: smoke, default or full (default: params.yaml's `profile`).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    from ragops.env import configure_environment

    configure_environment(workspace)
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
    )
    logging.getLogger("ragops").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Third-party INFO chatter (GX's temporary docs site, MLflow's migrations) hides our progress.
    for noisy in ("great_expectations", "mlflow", "alembic", "httpx", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = State(workspace, params, profile)


def _report(outcome, label: str | None = None) -> None:
    """One line per stage; `label` names what ran (e.g. `evaluate closed_book`) when the stage name alone does not."""
    status = "[yellow]unchanged, skipped[/]" if outcome.skipped else "[green]done[/]"
    scalars = [(k, v) for k, v in outcome.summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    scalars = [(k, v) for k, v in scalars if not k.endswith(("_ci_low", "_ci_high"))]
    stats = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars[:8])
    console.print(f"[bold]{label or outcome.stage}[/]: {status}" + (f"  ({stats})" if stats else ""))


def _label(key: str) -> str:
    """`evaluate@closed_book` (an outcome key) -> `evaluate closed_book`."""
    return key.replace("@", " ")


@contextlib.contextmanager
def _holding_workspace(ws, config, what: str) -> Iterator[None]:
    """Single-stage commands (and the DVC stages that call them) write the workspace too: they
    take its lock like `ragops run` does, so they never rewrite artifacts under a running pipeline.
    Waits `orchestration.lock_timeout_s`, then fails with one line naming the holder."""
    from ragops.ops.lock import workspace_lock

    with workspace_lock(ws, config.orchestration.lock_timeout_s, what=what):
        yield


def _known_architectures(config, names: list[str] | None, command: str) -> list[str]:
    """`names` (default: the enabled ones), each configured in params.yaml; else one line, exit 2."""
    from ragops.architectures import registry

    for name in names or []:
        if name not in config.architectures:
            configured = ", ".join(config.architectures) or "none"
            where = "registered but not configured in params.yaml `architectures:`" if name in registry.names() else "unknown architecture"
            raise UsageError(f"ragops {command} {name}: {where} (configured: {configured}; see `ragops architectures`)")
    return list(names or config.enabled_architectures())


def _check_source(source: str | None) -> None:
    if source is not None and not source.strip():
        raise UsageError("--source is empty: give a folder of documents or 'default' (leave it out for params.yaml's ingest.source)")


def _stage_command(name: str, help_text: str):
    def command(
        ctx: typer.Context,
        force: Annotated[bool, typer.Option("--force", "-f", help="Re-run even if inputs are unchanged.")] = False,
    ) -> None:
        from ragops import stages

        ws, config = ctx.obj.load()
        with _holding_workspace(ws, config, f"ragops {name.replace('_', '-')}"):
            _report(stages.DATA_STAGES[name](ws, config, force=force))
        if name == "eval_retrieval":
            print_retrieval_table(ws)

    command.__doc__ = help_text
    command.__name__ = name
    return command


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[Optional[str], typer.Option("--source", "-s", help="A folder of .txt/.md/.html/.jsonl files, or 'default' for the embedded Wikipedia summaries (default: params.yaml ingest.source).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run even if inputs are unchanged.")] = False,
) -> None:
    """Read the corpus into data/corpus.parquet (normalised, de-duplicated) and version it with DVC (data.dvc)."""
    from ragops import stages

    _check_source(source)
    ws, config = ctx.obj.load()
    with _holding_workspace(ws, config, "ragops ingest"):
        _report(stages.ingest(ws, config, source=source, force=force))


for _name, _help in [
    ("validate", "Great Expectations gate on the corpus: stops the pipeline if it fails."),
    ("split", "Build the benchmark: held-out documents (perplexity) and QA tasks (describe/identify, your questions, or derived define/cloze) split train/dev/test."),
    ("chunk", "Split indexed documents into sentence-aware token windows (size/overlap in params.yaml), then validate them."),
    ("embed", "Embed chunks with the encoder (cached by content hash: only new or edited chunks are computed)."),
    ("index", "Build the FAISS index (factory string in params.yaml) and the BM25 index beside it, atomically."),
    ("eval_retrieval", "Evaluate BM25, dense and hybrid retrieval on the benchmark: recall@k, MRR, nDCG, latency."),
    ("prepare_lm", "Prepare the language model once (convert the packaged SmolLM2 GGUF to safetensors)."),
]:
    app.command(name=_name.replace("_", "-"), help=_help)(_stage_command(_name, _help))


@app.command()
def train(
    ctx: typer.Context,
    architectures: Annotated[Optional[list[str]], typer.Argument(help="Architectures to train (default: all enabled).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Retrain even if the trained artifacts match the settings.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Ignore (delete) a resumable checkpoint and start over.")] = False,
) -> None:
    """Train architectures that fine-tune something into artifacts/models/<architecture> (resumes a killed training)."""
    from ragops import stages

    ws, config = ctx.obj.load()
    names = _known_architectures(config, architectures, "train")
    with _holding_workspace(ws, config, "ragops train"):
        for name in names:
            _report(stages.train_architecture(ws, config, name, force=force, restart=restart), f"train {name}")


@app.command()
def evaluate(
    ctx: typer.Context,
    architectures: Annotated[Optional[list[str]], typer.Argument(help="Architectures to train (if needed) and evaluate (default: all enabled).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run even if inputs are unchanged.")] = False,
) -> None:
    """Train (if the architecture trains) and evaluate architectures on the shared harness."""
    from ragops import stages

    ws, config = ctx.obj.load()
    names = _known_architectures(config, architectures, "evaluate")
    with _holding_workspace(ws, config, "ragops evaluate"):
        for name in names:
            _report(stages.train_architecture(ws, config, name), f"train {name}")
            _report(stages.evaluate_architecture(ws, config, name, force=force), f"evaluate {name}")
    print_architecture_table(ws, names)


@app.command()
def sweep(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run even if inputs are unchanged.")] = False,
) -> None:
    """In-Context RALM sweep over retrieval stride × query length on a dev subset (not part of `run`: costly)."""
    from ragops import stages

    ws, config = ctx.obj.load()
    with _holding_workspace(ws, config, "ragops sweep"):
        outcome = stages.sweep(ws, config, force=force)
    _report(outcome)
    console.print(f"plot: {ws.plots_dir / 'sweep.png'}", soft_wrap=True)


@app.command()
def run(
    ctx: typer.Context,
    source: Annotated[Optional[str], typer.Option("--source", "-s", help="Corpus folder (default: params.yaml ingest.source).")] = None,
    prefect: Annotated[bool, typer.Option("--prefect", help="Run as the Prefect `pipeline` flow instead of in-process.")] = False,
) -> None:
    """Run the whole pipeline: data plane, every enabled architecture, comparison. Unchanged stages are skipped."""
    _check_source(source)
    ws, config = ctx.obj.load()
    from ragops.ops.lock import workspace_lock
    from ragops.pipeline import stale_dvc_yaml

    stale = stale_dvc_yaml(ws.root, config)
    if stale:
        logging.getLogger("ragops").warning("%s", stale)
    if prefect:
        import os

        from ragops.ops.servers import running_server

        # Talk to a running `ragops server` rather than starting an ephemeral one on its database.
        server = running_server(ws, "prefect")
        if server is not None and "PREFECT_API_URL" not in os.environ:
            os.environ["PREFECT_API_URL"] = f"{server.rstrip('/')}/api"
        from ragops.ops.flows import pipeline

        pipeline(workspace=str(ws.root), params=str(ctx.obj.params or ws.params), profile=ctx.obj.profile, source=source)
    else:
        from ragops import stages

        with workspace_lock(ws, config.orchestration.lock_timeout_s, what="ragops run"):
            outcomes = stages.run_pipeline(ws, config, source=source)
        for key, outcome in outcomes.items():
            _report(outcome, _label(key))
    print_retrieval_table(ws)
    print_architecture_table(ws, config.enabled_architectures())


@app.command()
def pipeline(
    ctx: typer.Context,
    write: Annotated[bool, typer.Option("--write", help="Write dvc.yaml from the pipeline's definition.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 when dvc.yaml is not the generated one.")] = False,
) -> None:
    """Show the pipeline (stages, the code each depends on); `--write` generates dvc.yaml from it."""
    from ragops import pipeline as definition
    from ragops.io import atomic_file

    ws, config = ctx.obj.load()
    text = definition.dvc_yaml(config)
    target = ws.root / "dvc.yaml"
    if write:
        with atomic_file(target) as handle:
            handle.write(text)
        console.print(f"wrote {target} ({len(config.enabled_architectures())} architectures)")
        return
    if check:
        stale = definition.stale_dvc_yaml(ws.root, config) if target.exists() else f"{target}: missing (run `ragops pipeline --write`)"
        if stale:
            err_console.print(f"error: {stale}")
            raise typer.Exit(1)
        console.print(f"{target}: up to date")
        return
    table = Table(title="pipeline (ragops run, the Prefect flows and dvc.yaml run these, in this order)")
    for column in ("stage", "depends on code"):
        table.add_column(column)
    for stage in definition.DATA_STAGES:
        table.add_row(stage, ", ".join(definition.STAGE_CODE[stage]))
    for name in config.enabled_architectures():
        code = definition.architecture_code(config, name)
        table.add_row(f"train@{name}", ", ".join(code["train"]))
        table.add_row(f"evaluate@{name}", "same + " + ", ".join(definition.EVALUATION_CODE))
    table.add_row("compare", ", ".join(definition.STAGE_CODE["compare"]))
    console.print(table)


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="What to search for.")],
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 5,
    retriever: Annotated[str, typer.Option("--retriever", "-r", help="bm25, dense or hybrid.")] = "hybrid",
) -> None:
    """Query the built index."""
    from ragops.retrieval.retriever import load_retriever

    ws, config = ctx.obj.load()
    if retriever not in ("bm25", "dense", "hybrid"):
        raise RagopsError(f"--retriever: unknown retriever '{retriever}' (choose bm25, dense or hybrid)")
    result = load_retriever(ws, config, retriever).search([query], k)
    table = Table(title=f"{retriever} top-{k} for {query!r}")
    for column in ("rank", "score", "chunk", "text"):
        table.add_column(column)
    hits = len(result.chunk_ids[0])  # fewer than k when BM25 matches fewer chunks; scores are padded
    for rank, (cid, score, text) in enumerate(zip(result.chunk_ids[0], result.scores[0][:hits], result.texts[0], strict=True), 1):
        table.add_row(str(rank), f"{score:.3f}", cid, text[:120].replace("\n", " — "))
    console.print(table)


@app.command(name="architectures")
def list_architectures() -> None:
    """List the registered architectures with their family and fine-tuning class."""
    from ragops.architectures import registry

    table = Table(title="registered architectures")
    for column in ("name", "family", "fine-tunes"):
        table.add_column(column)
    for name in registry.names():
        cls = registry.get(name)
        table.add_row(name, cls.family, cls.finetune)
    console.print(table)


@app.command(name="config")
def show_config(ctx: typer.Context) -> None:
    """Print the resolved configuration (params.yaml with the active profile applied)."""
    import yaml

    _, config = ctx.obj.load()
    console.print(yaml.safe_dump(config.model_dump(by_alias=True, mode="json"), sort_keys=False))


def print_retrieval_table(ws) -> None:
    from ragops.io import read_json

    path = ws.metrics_file("retrieval")
    if not path.exists():
        return
    from ragops.retrieval.evaluate import retrieval_table
    from ragops.stages import tuned_retrieval_metrics

    tuned = tuned_retrieval_metrics(ws, [p.name for p in sorted(ws.artifacts.joinpath("models").glob("*")) if p.is_dir()])
    console.print(retrieval_table({**read_json(path), **tuned}))


#: Cost rows of the architecture table, after the quality metrics.
COST_ROWS = (
    "train/wall_s", "inference/wall_s", "inference/qa/wall_s_per_1k_questions", "inference/lm/wall_s_per_1k_tokens",
    "inference/flops", "inference/tokens_prompt", "inference/qa/cost_usd_per_1k_questions",
)


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def architecture_tables(rows: dict[str, dict[str, float]], width: int = 100) -> list[Table]:
    """The architecture comparison for the terminal: one row per metric, one column per
    architecture, each quality cell its value over its 95% CI (two short lines). Metric names are
    never wrapped or cut; when the architectures do not all fit in `width` columns, they are split
    over several tables, each repeating the metric column."""
    keys = sorted({k for m in rows.values() for k in m if "/" in k and not k.endswith(("_ci_low", "_ci_high"))
                   and k.split("/")[0] in EVAL_TASKS})
    costs = [key for key in COST_ROWS if any(key in m for m in rows.values())]
    cells: dict[str, list[str]] = {}
    for name, metrics in rows.items():
        column = []
        for key in keys:
            value = metrics.get(key)
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            text = "—" if value is None else _number(value)
            if value is not None and low is not None and high is not None:
                text += f"\n[dim][{_number(low)}, {_number(high)}][/]"
            column.append(text)
        column += [f"{metrics[key]:.4g}" if key in metrics else "—" for key in costs]
        cells[name] = column
    labels = keys + costs
    label_width = max([len("metric"), *(len(k) for k in labels)])

    def cell_width(name: str) -> int:
        lines = [line.replace("[dim]", "").replace("[/]", "") for text in cells[name] for line in text.split("\n")]
        return max([len(name), *(len(line) for line in lines)])

    # Rich draws a box: 1 border + (1 padding + text + 1 padding + 1 border) per column.
    groups: list[list[str]] = [[]]
    used = 1 + label_width + 3
    for name in rows:
        need = cell_width(name) + 3
        if groups[-1] and used + need > width:
            groups.append([])
            used = 1 + label_width + 3
        groups[-1].append(name)
        used += need
    tables = []
    for number, group in enumerate(groups, 1):
        title = "architectures (95% bootstrap CI)" + (f" ({number}/{len(groups)})" if len(groups) > 1 else "")
        table = Table(title=title)
        table.add_column("metric", no_wrap=True, min_width=label_width)
        for name in group:
            table.add_column(name, justify="right", no_wrap=True)
        for index, key in enumerate(labels):
            style = "dim" if key in costs else None
            table.add_row(key, *[cells[name][index] for name in group], style=style)
        tables.append(table)
    return tables


def print_architecture_table(ws, names: list[str]) -> None:
    from ragops.io import read_json

    rows = {name: read_json(ws.metrics_file(name)) for name in names if ws.metrics_file(name).exists()}
    if not rows:
        return
    for table in architecture_tables(rows, width=console.width):
        console.print(table)


def main() -> None:
    """Entry point: user errors are one line on stderr and exit code 1, never a traceback."""
    try:
        app()
    except RagopsError as error:
        from rich.markup import escape

        # Escaped: messages quote user text and limits in brackets ("[wanted: ...]"), not markup.
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


# Operational commands (server, ui, compare) live in their own module.
try:
    import ragops.cli_ops  # noqa: E402,F401
except ModuleNotFoundError as _error:  # pragma: no cover - only while the module is absent
    if _error.name != "ragops.cli_ops":
        raise
