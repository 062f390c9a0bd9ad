"""Connection URLs and engines for the store and the Dagster instance, embedded or external."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL, make_url

from nvc_pipelines.config import external_database_url, owner_database_url, statement_timeout_seconds
from nvc_pipelines.store.embedded import server_url

STORE_DATABASE = "nvc"
DAGSTER_DATABASE = "dagster"
APP_LOGIN = "nvc_service"  # the application's login role, created by migration 0014
APP_ROLE = "nvc_app"  # the group role the row-level security policies and grants name


class StoreUnavailable(RuntimeError):
    """The store's PostgreSQL cannot be reached; the message says what to check."""


def _base_url() -> URL:
    """The server's URL with the most rights known: Dagster's storage needs to create its tables."""
    external = owner_database_url() or external_database_url()
    return make_url(external) if external else server_url()


@dataclass(frozen=True, slots=True)
class StoreUrls:
    """Where the application logs in, and where the owner does (None: this process has no owner
    login, so it neither migrates nor runs administrative commands)."""

    app: URL
    owner: URL | None
    app_derived: bool  # the app's URL is the owner's with the user swapped (say so when it is refused)


def _psycopg(url: URL | str) -> URL:
    return make_url(url).set(drivername="postgresql+psycopg")


def _as_app(owner: URL) -> URL:
    return owner.set(username=APP_LOGIN, password=None)


def store_urls(url: URL | str | None = None, owner_url: URL | str | None = None) -> StoreUrls:
    """The store's two logins (psycopg 3 driver, used for COPY).

    With no `url`, `NVC_DATABASE_URL` and `NVC_OWNER_DATABASE_URL` are read (embedded server when
    neither is set). A URL given alone is the owner's, and the application logs in as `nvc_service`
    on the same server and database without a password (the embedded server and tests: local trust
    authentication), unless that URL's user is `nvc_service` itself: then it is the application's,
    and this process has no owner login (a run pod)."""
    if url is None:
        url, owner_url = external_database_url(), owner_url or owner_database_url()
    if url is None:
        owner = _psycopg(owner_url) if owner_url else _psycopg(server_url().set(database=STORE_DATABASE))
        return StoreUrls(_as_app(owner), owner, app_derived=True)
    given = _psycopg(url)
    if owner_url is not None:
        return StoreUrls(given, _psycopg(owner_url), app_derived=False)
    if given.username == APP_LOGIN:
        return StoreUrls(given, None, app_derived=False)
    return StoreUrls(_as_app(given), given, app_derived=True)


def store_url() -> URL:
    """The owner's store URL (the application's when this process has no owner login)."""
    urls = store_urls()
    return urls.owner or urls.app


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
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database or "")))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(
            f"Cannot reach the store's PostgreSQL at {admin.render_as_string(hide_password=True)}: "
            f"{str(exc).strip()}. Check that the server is running and NVC_DATABASE_URL (NVC_OWNER_DATABASE_URL) "
            "is right."
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


_ENGINES: dict[str, Engine] = {}


def engine_for(url_text: str) -> Engine:
    """One pooled engine per URL per process, its sessions bounded (see `connect_args`)."""
    engine = _ENGINES.get(url_text)
    if engine is None:
        engine = _ENGINES[url_text] = create_engine(
            url_text, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args()
        )
    return engine


def dispose_engines() -> None:
    """Close this process's pooled connections (an engine disposed still works: it opens new ones).
    A process that opens many databases in turn (the tests: one per test) would otherwise keep every
    pool's idle sessions and run the server out of connection slots."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


def driver(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy one: `COPY` and raw cursors need it."""
    raw = conn.connection.driver_connection
    if raw is None:
        raise RuntimeError("the store connection is closed")
    return raw  # type: ignore[no-any-return]  # SQLAlchemy types the driver's connection as Any


def rows_differ(columns: Sequence[str], stored: str, incoming: str) -> str:
    """SQL that is true when row `stored` and row `incoming` differ in any of `columns`, NULLs
    compared as values: an upsert that skips unchanged rows writes (and locks) nothing for them."""
    return (
        f"({', '.join(f'{stored}.{c}' for c in columns)}) IS DISTINCT FROM "
        f"({', '.join(f'{incoming}.{c}' for c in columns)})"
    )


def copy_rows(cur: psycopg.Cursor[Any], table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """`COPY` `rows` into `table`'s `columns` in PostgreSQL's binary format; returns how many.

    Each column is written as the table's own type, declared once (`Copy.set_types`): otherwise
    psycopg looks up a dumper for every value and scans every list for its element type, which was
    the larger part of a staging `COPY`'s Python time, paid per row by a full sync. A value must
    therefore be its column's Python type: a `date` for a date, a `Decimal` for a numeric, an aware
    `datetime` for a timestamptz."""
    cur.execute(
        "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped",
        (table,),
    )
    types = dict(cur.fetchall())
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    written = 0
    with cur.copy(statement) as copy:
        copy.set_types([types[c] for c in columns])
        write = copy.write_row
        for row in rows:
            write(row)
            written += 1
    return written
