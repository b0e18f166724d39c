"""Deployments of the ragops flows (defined in `ragops.ops.deploy`):

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --workspace .
"""


from ragops.ops.deploy import build_deployments, deployment_name, flows, main, serve_deployments  # noqa: F401

if __name__ == "__main__":
    main()
