"""Deployable entry points of the ragops Prefect flows (defined in `ragops.ops.flows`).

    python -m flows.pipeline [workspace] [profile]      # the whole pipeline once
    prefect deploy flows/pipeline.py:evaluate ...       # or serve them: `ragops server`
"""

from ragops.ops.flows import (  # noqa: F401 - re-exported entry points
    REFRESH_STAGES,
    STAGE_TASKS,
    architectures_flow,
    embed_shards,
    evaluate,
    pipeline,
    refresh,
)

if __name__ == "__main__":
    import sys

    pipeline(workspace=sys.argv[1] if len(sys.argv) > 1 else ".", profile=sys.argv[2] if len(sys.argv) > 2 else None)
