"""Real services for the tests that drive Dagster as ops do: `dagster dev` (webserver + daemon) on a free
loopback port, on the persistent dagster-postgres instance in the embedded store, as `nvc dev` starts it."""

from nvc_pipelines.application.devserver import REPO, dagster_dev, free_port

__all__ = ["REPO", "dagster_dev", "free_port"]
