"""`nvc`: the operators' shell interface. A thin face over `nvc_pipelines.application.app`; the Dagster UI stays the main one."""

from nvc_pipelines.application.cli.base import main

__all__ = ["main"]
