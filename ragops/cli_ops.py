"""Operational commands of the `ragops` CLI: `server` (Prefect server + scheduled deployments),
`ui` (MLflow UI on the project's store) and `compare` (the architecture comparison table).

Imported at the bottom of `ragops.cli`, which owns `app`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Annotated, Optional

import typer
from rich.table import Table

from ragops.cli import app, console, err_console


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C (SIGINT) and SIGTERM both stop the command, and with it the servers it started.
    SIGINT is re-armed explicitly: a process started in the background by a non-interactive shell
    inherits it ignored."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _latest_compare_url(base_url: str, experiment: str) -> str | None:
    from ragops.compare import mlflow_compare_url
    from ragops.ops.mlflow_compare import collect_runs

    try:
        df = collect_runs(experiment)
    except Exception:  # noqa: BLE001 - nothing logged yet
        return None
    if df.empty:
        return None
    return mlflow_compare_url(base_url, list(df["run_id"]), [df.attrs["experiment_id"]])


def _link(text: str) -> None:
    """Print a line that holds a URL or a path: never hard-wrapped (a wrapped link cannot be
    clicked or copied), the terminal folds it if it must."""
    console.print(text, soft_wrap=True)


@app.command()
def server(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", help="Prefect server port.")] = 4200,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on. Beyond 127.0.0.1 it needs an auth string: PREFECT_SERVER_API_AUTH_STRING=user:password (clients: PREFECT_API_AUTH_STRING).")] = "127.0.0.1",
    ui_port: Annotated[Optional[int], typer.Option("--ui-port", help="Also start the MLflow UI on this port.")] = None,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the scheduled deployments (refresh nightly, evaluate weekly).")] = True,
) -> None:
    """Start a Prefect server on 127.0.0.1 (state in .prefect/), register and serve the deployments
    from params.yaml (orchestration.deployments). Ctrl-C stops everything it started.

    The server answers only its own origins and host names, checks CSRF tokens, and refuses to
    listen beyond loopback without an auth string. Served flow runs refuse a workspace other than
    this one and a corpus source outside it (or params.yaml's ingest.source)."""
    from ragops.errors import RagopsError
    from ragops.ops.servers import prefect_server_security, running_server, start_mlflow_server, start_prefect_server, stop_all

    ws, config = ctx.obj.load(params_optional=True)
    auth_string = os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or None
    prefect_server_security(host, port, auth_string)  # refuse an unauthenticated public bind before anything starts
    if running := running_server(ws, "prefect"):
        raise RagopsError(f"a ragops Prefect server for {ws.root} is already running at {running} (stop it with Ctrl-C in its shell)")
    started = []
    with _interruptible():
        try:
            _link(f"starting the Prefect server on {host}:{port} (state: {ws.root / '.prefect'}) …")
            prefect = start_prefect_server(ws, port=port, host=host, auth_string=auth_string)
            started.append(prefect)
            _link(f"[bold green]Prefect UI[/]: {prefect.url}   (deployments: {prefect.url}/deployments, log: {prefect.log_path})")
            if ui_port:
                mlflow_ui = start_mlflow_server(ws, port=ui_port)
                started.append(mlflow_ui)
                _link(f"[bold green]MLflow UI[/]: {mlflow_ui.url}   (log: {mlflow_ui.log_path})")
            api = f"{prefect.url}/api"
            _link(f"other shells: [cyan]export PREFECT_API_URL={api}[/]  (then: prefect deployment ls)")
            os.environ["PREFECT_API_URL"] = api  # for the flow-run processes the runner starts
            if auth_string:
                os.environ["PREFECT_API_AUTH_STRING"] = auth_string  # this process is a client of its own server
            if serve:
                from prefect.settings import PREFECT_API_URL, temporary_settings

                from ragops.ops.deploy import serve_deployments

                with temporary_settings(updates={PREFECT_API_URL: api}):
                    serve_deployments(config, ws.root, params=ctx.obj.params, profile=ctx.obj.profile)
            else:
                console.print("Ctrl-C to stop")
                while all(s.process.poll() is None for s in started):
                    time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            console.print("stopping …")
            stop_all(*started)
            console.print("stopped")


@app.command()
def ui(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the project's store (mlruns/mlflow.db, artifacts in mlruns/artifacts),
    on 127.0.0.1 only. Prints the compare page of the latest pipeline run's architectures."""
    from ragops.ops.servers import start_mlflow_server

    ws, config = ctx.obj.load(params_optional=True)
    with _interruptible():
        console.print(f"starting the MLflow UI on 127.0.0.1:{port} …")
        mlflow_ui = start_mlflow_server(ws, port=port)
        try:
            _link(f"[bold green]MLflow UI[/]: {mlflow_ui.url}   (log: {mlflow_ui.log_path})")
            compare_url = _latest_compare_url(mlflow_ui.url, config.tracking.experiment)
            if compare_url:
                _link(f"compare the latest architectures: {compare_url}")
            console.print("Ctrl-C to stop")
            while mlflow_ui.process.poll() is None:
                time.sleep(1)
            err_console.print(f"[red]the MLflow server exited[/] (log: {mlflow_ui.log_path})", soft_wrap=True)
        except KeyboardInterrupt:
            pass
        finally:
            mlflow_ui.stop()


def _difference_cell(row: dict) -> str:
    from ragops.compare.analysis import format_difference

    counts = f"  {row['a_better']}/{row['n']} better" if row.get("n") else ""
    return format_difference(row) + counts


def print_comparison(summary: dict) -> None:
    rows = summary.get("display") or []
    if not rows:
        console.print(summary.get("message") or "no architecture results to compare (run: ragops evaluate)")
        return
    confidence = int(round(100 * summary.get("confidence", 0.95)))
    table = Table(title=f"architectures (quality with {confidence}% bootstrap CI)")
    table.add_column("metric")
    for row in rows:
        table.add_column(f"{row['architecture']}\n[dim]{row.get('group', row.get('family', ''))}[/]", justify="right")
    keys = [k for k in rows[0] if "/" in k]
    front = set((summary.get("pareto") or {}).get("inference", {}).get("front") or [])
    for key in keys:
        style = "dim" if key.startswith(("train/", "inference/")) else None
        table.add_row(key, *[row.get(key, "—") for row in rows], style=style)
    table.add_row("Pareto (quality vs inference cost)", *["yes" if row["architecture"] in front else "" for row in rows])
    console.print(table)
    paired = summary.get("paired_vs_baseline") or []
    if paired:
        diffs = Table(title=f"paired differences vs the baseline (A − B on the same items, {confidence}% CI; n.s. = interval includes 0)")
        for column in ("A", "B", "metric", "A − B [CI]  items where A is better"):
            diffs.add_column(column)
        for row in paired:
            diffs.add_row(row["a"], row["b"], row["metric"], _difference_cell(row))
        console.print(diffs)
    champion = summary.get("champion")
    if champion:
        console.print(f"[bold]champion[/]: {champion['architecture']} — {champion['reason']}")
    for message in summary.get("messages") or []:
        console.print(f"[yellow]{message}[/]")


@app.command()
def compare(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run even if the evaluation results are unchanged.")] = False,
    print_only: Annotated[bool, typer.Option("--print-only", help="Only print the comparison the compare stage last wrote (no MLflow, no registry).")] = False,
) -> None:
    """Compare the enabled architectures from their evaluation results: quality (with CIs), paired
    differences, training and inference cost, Pareto plots in artifacts/compare/, and the champion
    registered in the MLflow model registry."""
    from ragops import stages

    ws, config = ctx.obj.load()
    if print_only:
        summary = stages.read_comparison(ws)
    else:
        from ragops.ops.lock import workspace_lock

        with workspace_lock(ws, config.orchestration.lock_timeout_s, what="ragops compare"):
            summary = stages.compare(ws, config, force=force).summary
    print_comparison(summary)
    for path in summary.get("files") or []:
        if path.endswith((".png", ".html")):
            _link(f"plot: {path}")


@app.command()
def report(
    ctx: typer.Context,
    black_box_only: Annotated[Optional[bool], typer.Option("--black-box-only/--any-lm", help="My LM is only reachable through an API: recommend black-box methods only (default: params.yaml report.black_box_only).")] = None,
    max_train_hours: Annotated[Optional[float], typer.Option("--max-train-hours", min=0, help="Training budget in measured wall-clock hours.")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option("--max-latency-ms", min=0, help="Latency budget: mean wall-clock ms per question.")] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="Quality to optimise (default: report.metric, else champion.metric), e.g. identify/f1, lm/token_ppl.")] = None,
) -> None:
    """Which architecture should I ship? One self-contained HTML page and a Markdown version
    (artifacts/report/): the families side by side, quality with CIs, training and inference cost,
    latency, Pareto fronts, paired comparisons, and the recommendation for your constraints."""
    from ragops import stages

    ws, config = ctx.obj.load()
    summary = stages.report(ws, config, black_box_only=black_box_only, max_train_hours=max_train_hours,
                            max_latency_ms=max_latency_ms, metric=metric).summary
    rec = summary["recommendation"]
    for line in recommendation_lines(rec):
        console.print(line, soft_wrap=True)
    for path in summary.get("files") or []:
        _link(f"report: {path}")


def recommendation_lines(rec: dict) -> list[str]:
    head = f"[bold]recommended[/]: {rec['architecture']}" if rec["architecture"] else "[bold red]no recommendation[/]"
    lines = [f"{head} ({rec['metric']}) — {rec['reason']}"]
    lines += [f"  excluded {name}: {why}" for name, why in rec["excluded"].items()]
    return lines
