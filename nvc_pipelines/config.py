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


def owner_database_url() -> str | None:
    """`$NVC_OWNER_DATABASE_URL` when set: the owner's login (migrations, administrative commands);
    `NVC_DATABASE_URL` is then the application's (`nvc_service`). See docs/security.md."""
    return os.environ.get("NVC_OWNER_DATABASE_URL") or None


DEFAULT_STATEMENT_TIMEOUT_SECONDS = 1800


def statement_timeout_seconds() -> int:
    """`$NVC_STATEMENT_TIMEOUT_SECONDS` (default 1800): the longest one store statement may run.

    The biggest statement of a 200,000-patient sync takes seconds; one running for half an hour is
    stuck (a lock, a bad plan), and is cancelled with an error naming this setting."""
    raw = os.environ.get("NVC_STATEMENT_TIMEOUT_SECONDS") or str(DEFAULT_STATEMENT_TIMEOUT_SECONDS)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"NVC_STATEMENT_TIMEOUT_SECONDS must be a whole number of seconds, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"NVC_STATEMENT_TIMEOUT_SECONDS must be at least 1, got {value}")
    return value
