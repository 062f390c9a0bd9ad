"""Where things live: `NVC_HOME`, the store URL, the Dagster home. Environment first, embedded defaults after."""

from __future__ import annotations

import os
from pathlib import Path


def nvc_home() -> Path:
    """`$NVC_HOME`, default `.nvc/` in the working directory; created on first use."""
    home = Path(os.environ.get("NVC_HOME") or ".nvc").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def dagster_home() -> Path:
    """`$DAGSTER_HOME`, default `$NVC_HOME/dagster`."""
    env = os.environ.get("DAGSTER_HOME")
    home = Path(env).expanduser().resolve() if env else nvc_home() / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    return home


def external_database_url() -> str | None:
    """`$NVC_DATABASE_URL` when set: the store lives on that PostgreSQL instead of the embedded one."""
    return os.environ.get("NVC_DATABASE_URL") or None
