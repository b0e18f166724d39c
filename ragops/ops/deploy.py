"""Deployments of the ragops flows, from `orchestration.deployments` in params.yaml.

    refresh:  {cron: "0 3 * * *", timezone: UTC}   # nightly: re-ingest and re-index if the corpus changed
    evaluate: {cron: "0 4 * * 0", timezone: UTC}   # weekly: retrain and re-evaluate every architecture

Each key names a flow of `ragops.ops.flows` (refresh, evaluate or pipeline); `parameters` are merged
over `{workspace, params, profile}`; `active: false` registers the schedule paused. Schedules only
fire against a real Prefect server (not the ephemeral one): `ragops server` starts one and serves
these deployments; or, with a server already running,

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --workspace .
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ragops import __version__
from ragops.errors import ConfigError, RagopsError

DEPLOYMENT_TAG = "ragops"


def flows() -> dict[str, Any]:
    from ragops.ops.flows import evaluate, pipeline, refresh

    return {"refresh": refresh, "evaluate": evaluate, "pipeline": pipeline}


def deployment_name(key: str) -> str:
    return f"ragops-{key}"


def build_deployments(config, workspace: str | Path, *, params: str | Path | None = None, profile: str | None = None) -> list:
    """One RunnerDeployment per `orchestration.deployments` entry: a cron schedule (with its
    timezone, paused unless `active`), default parameters, one run at a time (a run that would
    overlap a running one of the same deployment is cancelled, not queued)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    known = flows()
    deployments = []
    for key, spec in config.orchestration.deployments.items():
        if key not in known:
            raise ConfigError(f"params.yaml: orchestration.deployments.{key}: no such flow (choose from {', '.join(known)})")
        flow = known[key]
        accepted = set(inspect.signature(flow.fn).parameters)
        unknown = set(spec.parameters) - accepted
        if unknown:
            raise ConfigError(
                f"params.yaml: orchestration.deployments.{key}.parameters: unknown parameter(s) {', '.join(sorted(unknown))} "
                f"(flow '{key}' takes {', '.join(sorted(accepted))})"
            )
        parameters = {"workspace": str(Path(workspace).resolve())}
        if params:
            parameters["params"] = str(Path(params).resolve())
        if profile:
            parameters["profile"] = profile
        parameters.update(spec.parameters)
        deployments.append(
            flow.to_deployment(
                name=deployment_name(key),
                schedules=[Cron(spec.cron, timezone=spec.timezone, active=spec.active)],
                parameters=parameters,
                tags=[DEPLOYMENT_TAG, key],
                description=f"ragops {key}: {(flow.description or '').strip().splitlines()[0] if flow.description else ''}",
                version=__version__,
                concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def serve_deployments(
    config,
    workspace: str | Path,
    *,
    params: str | Path | None = None,
    profile: str | None = None,
    extra: list | tuple = (),
    limit: int | None = None,
) -> None:
    """Register the deployments (plus `extra` ones) on the Prefect server at PREFECT_API_URL and
    poll for their scheduled runs until interrupted (Ctrl-C / SIGINT). Schedules stay active
    after shutdown (`pause_on_shutdown=False`). Also creates the `ragops-workspace` global
    concurrency limit (1 slot) that every ragops flow run takes."""
    from prefect import serve

    from ragops.ops.orchestration import ensure_global_limit

    if not api_url():
        raise RagopsError(
            "no Prefect server: schedules never fire on the ephemeral server. Start one with `ragops server` "
            "(or set PREFECT_API_URL=http://127.0.0.1:<port>/api for a running `prefect server start`)"
        )
    ensure_global_limit(1)
    deployments = [*build_deployments(config, workspace, params=params, profile=profile), *extra]
    serve(*deployments, pause_on_shutdown=False, limit=limit)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from ragops.ops.orchestration import load

    parser = argparse.ArgumentParser(description="Serve the ragops deployments against PREFECT_API_URL.")
    parser.add_argument("--workspace", default=".")
    parser.add_argument("--params", default=None)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    _, config = load(args.workspace, args.params, args.profile)
    serve_deployments(config, args.workspace, params=args.params, profile=args.profile)


