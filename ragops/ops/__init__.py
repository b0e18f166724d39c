"""Operations: workspace locking, local servers (Prefect, MLflow) and Prefect orchestration helpers.

Nothing here is imported by the stage functions; the flows, the CLI and the tests use it.
"""
