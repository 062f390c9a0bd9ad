"""Connection URLs and engines for the store and the Dagster instance, embedded or external."""

from __future__ import annotations

from functools import cache

import psycopg
from psycopg import sql
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url

from nvc_pipelines.config import external_database_url, statement_timeout_seconds
from nvc_pipelines.store.embedded import server_url

STORE_DATABASE = "nvc"
DAGSTER_DATABASE = "dagster"


class StoreUnavailable(RuntimeError):
    """The store's PostgreSQL cannot be reached; the message says what to check."""


def _base_url() -> URL:
    external = external_database_url()
    return make_url(external) if external else server_url()


def store_url() -> URL:
    """The store database with the psycopg 3 driver (used for COPY)."""
    external = external_database_url()
    url = make_url(external) if external else server_url().set(database=STORE_DATABASE)
    return url.set(drivername="postgresql+psycopg")


def dagster_storage_url() -> URL:
    """The Dagster instance's database on the same server, spelt with psycopg2 as dagster-postgres needs."""
    return _base_url().set(drivername="postgresql+psycopg2", database=DAGSTER_DATABASE)


def ensure_database(url: URL) -> None:
    """Create `url`'s database if it does not exist (connecting to the server's `postgres` database)."""
    admin = url.set(drivername="postgresql", database="postgres")
    conninfo = admin.render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(
            f"Cannot reach the store's PostgreSQL at {admin.render_as_string(hide_password=True)}: "
            f"{str(exc).strip()}. Check that the server is running and NVC_DATABASE_URL is right."
        ) from None


# The server checks every few seconds that the client of a running query is still there, so a killed
# `nvc sync` or run process does not leave its query running for minutes (PostgreSQL 14+); TCP
# keepalives do the same across a network that drops the connection silently.
CLIENT_CHECK_SECONDS = 5


def connect_args() -> dict[str, object]:
    options = (
        f"-c client_connection_check_interval={CLIENT_CHECK_SECONDS}s "
        f"-c statement_timeout={statement_timeout_seconds()}s"
    )
    return {"options": options, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
            "keepalives_count": 3}  # fmt: skip


@cache
def engine_for(url_text: str) -> Engine:
    """One pooled engine per URL per process, its sessions bounded (see `connect_args`)."""
    return create_engine(url_text, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args())
