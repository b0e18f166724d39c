"""Prefect flows over the ragops stages (`flows.pipeline`) and their deployments (`flows.deploy`)."""
