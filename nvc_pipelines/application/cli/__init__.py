"""`nvc`: the operators' shell interface. A thin face over `nvc_pipelines.application.app`; the Dagster UI stays the main one.

`base` holds the `main` group; each other module registers its commands on it, so importing them here is
what makes every command exist.
"""

from nvc_pipelines.application.cli import calls, ops, outbox, practices, records  # noqa: F401  (registers the commands)
from nvc_pipelines.application.cli.base import main

__all__ = ["main"]
