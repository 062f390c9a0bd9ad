"""The store: one `Store` composed of a mixin per family of tables, each in its own module.

The store owns the schema: every SQL statement the application runs lives in this package (a
family's module, `calls`, `streams`, the migrations), so a change of a table is read and made in one
place; the rest of the core keeps its rules and calls typed `Store` methods, and where a rule must
run inside a statement's transaction (a row locked, a hash from the row read) it is passed in as a
plain function of the row.
Writes are bulk and idempotent: rows are `COPY`ed into a temporary staging table and merged with
`INSERT ... ON CONFLICT`, only touching rows whose content changed, all in one transaction per
practice and asset, so a killed run leaves the previous state and a re-run converges.

| family | module |
|---|---|
| logins, transactions, errors | `base` |
| registry, settings, credentials, groups | `practices` |
| synced streams, rejections, cursors | `patients` (merging in `streams`) |
| recalls | `recalls` |
| call list | `call_list` (rules and SQL in `calls`) |
| data-quality checks | `checks` |
| matching, duplicates, merges | `merges` |
| outbox and its worklist | `outbox` |
| alerts | `alerts` |
| GOC checks of clinicians | `clinicians` |
| erasure and suppressions | `erasure` |
| export | `export` |
| audit log | `audit` |
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from nvc_pipelines.store.alerts import AlertsMixin
from nvc_pipelines.store.audit import AuditMixin
from nvc_pipelines.store.base import BULK_ROWS, PracticeExists, PracticeNotFound
from nvc_pipelines.store.call_list import CallListMixin
from nvc_pipelines.store.checks import ChecksMixin
from nvc_pipelines.store.clinicians import CliniciansMixin
from nvc_pipelines.store.db import APP_LOGIN, APP_ROLE, StoreUnavailable, engine_for, ensure_database, store_urls
from nvc_pipelines.store.erasure import ErasureMixin
from nvc_pipelines.store.export import ExportMixin
from nvc_pipelines.store.merges import MergesMixin
from nvc_pipelines.store.outbox import OutboxMixin
from nvc_pipelines.store.patients import PatientsMixin, StreamState, WriteCounts
from nvc_pipelines.store.practices import PracticesMixin
from nvc_pipelines.store.recalls import RecallsMixin, RecallState

__all__ = [
    "BULK_ROWS",
    "PracticeExists",
    "PracticeNotFound",
    "RecallState",
    "Store",
    "StoreUnavailable",
    "StreamState",
    "WriteCounts",
    "mark_migrated",
]

_MIGRATED: set[str] = set()  # owner URLs already migrated by this process
_CHECKED: set[str] = set()  # application URLs whose role and schema this process checked


def mark_migrated(owner_url: str) -> None:
    """Record that the database at `owner_url` is at the newest revision (a copy of a migrated one),
    so `Store.open` skips the no-op upgrade."""
    _MIGRATED.add(str(make_url(owner_url).set(drivername="postgresql+psycopg")))


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("nvc_pipelines.store") / "migrations"))
    return cfg


@cache
def _revisions() -> tuple[str | None, frozenset[str]]:
    """The code's newest schema revision, and every revision it knows."""
    script = ScriptDirectory.from_config(_alembic_config())
    return script.get_current_head(), frozenset(r.revision for r in script.walk_revisions())


class Store(
    PracticesMixin,
    PatientsMixin,
    RecallsMixin,
    CallListMixin,
    ChecksMixin,
    MergesMixin,
    OutboxMixin,
    AlertsMixin,
    CliniciansMixin,
    ErasureMixin,
    ExportMixin,
    AuditMixin,
):
    """Plain-Python access to the store; the Dagster `StoreResource` and the CLI both go through it.

    Each family of tables is a mixin in its own module (see the table above); this class adds
    opening, checking and migrating the database. Two logins: the application's (`engine`, role
    `nvc_service`: no superuser, owns nothing, member of `nvc_app` only) for everything the
    pipelines, sensors and the CLI do, and the owner's (`owner_engine`) for migrations and the
    administrative commands (see `begin_owner`)."""

    @classmethod
    def open(cls, url: URL | str | None = None, *, owner_url: URL | str | None = None, migrate: bool = True) -> Store:
        """Open the store (default: `NVC_DATABASE_URL` and `NVC_OWNER_DATABASE_URL`, or the embedded
        server; see `store_urls`), creating and migrating its database when this process has the owner's
        login, and checking that the application's login is neither a superuser nor behind the schema."""
        urls = store_urls(url, owner_url)
        owner_engine = None
        if urls.owner is not None:
            ensure_database(urls.owner)
            owner_engine = engine_for(urls.owner.render_as_string(hide_password=False))
        app_text = urls.app.render_as_string(hide_password=False)
        store = cls(engine_for(app_text), owner_engine, app_derived=urls.app_derived)
        if migrate and owner_engine is not None and str(owner_engine.url) not in _MIGRATED:
            store.migrate()
            _MIGRATED.add(str(owner_engine.url))
        if app_text not in _CHECKED:
            store._check_app_login()
            _CHECKED.add(app_text)
        return store

    def _check_app_login(self) -> None:
        """Refuse to run the application as a superuser, as a role that bypasses row-level security, or
        against a schema its code does not know, with a line that says what to set."""
        user = self.engine.url.username
        try:
            with self.engine.connect() as conn:
                role = conn.execute(
                    text(
                        "SELECT rolsuper, rolbypassrls, "
                        "to_regrole(:app) IS NOT NULL AND pg_has_role(current_user, :app, 'USAGE') AS app, "
                        "to_regclass('public.alembic_version') IS NOT NULL AS migrated FROM pg_roles "
                        "WHERE rolname = current_user"
                    ),
                    {"app": APP_ROLE},
                ).one()
                version = (
                    conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
                    if role.migrated and role.app
                    else None
                )
        except OperationalError as exc:
            hint = (
                f" The application logs in as {APP_LOGIN} on the owner's server and database, without a password; "
                f"where the server asks for one, set NVC_DATABASE_URL to {APP_LOGIN}'s login and "
                "NVC_OWNER_DATABASE_URL to the owner's (docs/security.md)."
                if self._app_derived
                else " Check NVC_DATABASE_URL."
            )
            raise StoreUnavailable(
                f"Cannot log in to the store as the application's role {user}: {str(exc.orig).strip()}.{hint}"
            ) from None
        if role.rolsuper or role.rolbypassrls:
            raise StoreUnavailable(
                f"The application would log in to the store as {user}, a superuser or a role that bypasses "
                f"row-level security. Set NVC_DATABASE_URL to the login of {APP_LOGIN} (created by the migrations) "
                "and NVC_OWNER_DATABASE_URL to the owner's (docs/security.md)."
            )
        if not role.app or version is None:
            raise StoreUnavailable(
                f"The store's schema is not set up for the application's role {user}: run the migrations as the "
                "owner (`nvc store migrate` with NVC_OWNER_DATABASE_URL set), and make sure that role is "
                f"{APP_LOGIN} or a member of {APP_ROLE}."
            )
        head, known = _revisions()
        if version != head and version in known:  # older than the code (a newer one: a run of the last release)
            raise StoreUnavailable(
                f"The store's schema is at revision {version}, this code needs {head}: run "
                "`nvc store migrate` with NVC_OWNER_DATABASE_URL set (the owner's login), then retry."
            )

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision as the owner (idempotent, serialised by an
        advisory lock)."""
        with self.begin_owner() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
