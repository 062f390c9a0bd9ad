"""The store: practice registry, patients, recalls and quarantined rows in PostgreSQL.

Writes are bulk and idempotent: rows are `COPY`ed into a temporary staging table and merged with
`INSERT ... ON CONFLICT`, only touching rows whose content changed, all in one transaction per
practice and asset, so a killed run leaves the previous state and a re-run converges.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg.errors import InsufficientPrivilege, QueryCanceled
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from nvc_pipelines.calling import UK_TZ, CallSettings
from nvc_pipelines.config import statement_timeout_seconds
from nvc_pipelines.crypto import decrypt_credentials, encrypt_credentials
from nvc_pipelines.matching import DERIVED_PREFIX, DuplicatePair, find_duplicates, resolve_derived_identities
from nvc_pipelines.model import (
    Channel,
    ClinicalRecord,
    ContactPreferences,
    Patient,
    PatientStatus,
    Phone,
    PhoneType,
    PmsKind,
    Practice,
    ReadResult,
    Recall,
    RejectedRow,
)
from nvc_pipelines.store import calls
from nvc_pipelines.store.db import APP_LOGIN, APP_ROLE, StoreUnavailable, engine_for, ensure_database, store_urls
from nvc_pipelines.store.streams import PATIENTS, StreamSpec, merge_staged, stage_pages, stage_table
from nvc_pipelines.sync import next_cursor

_MIGRATED: set[str] = set()  # owner URLs already migrated by this process
_CHECKED: set[str] = set()  # application URLs whose role and schema this process checked
_REFUSALS = ("permission denied", "must be owner", "must be superuser", "must be member")


def mark_migrated(owner_url: str) -> None:
    """Record that the database at `owner_url` is at the newest revision (a copy of a migrated one),
    so `Store.open` skips the no-op upgrade."""
    _MIGRATED.add(str(make_url(owner_url).set(drivername="postgresql+psycopg")))


BULK_ROWS = 5000  # rows written at once after which the table's statistics are refreshed


class PracticeNotFound(LookupError):
    pass


class PracticeExists(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class WriteCounts:
    """What a sync did to the store; rows read = inserted + updated + unchanged + rejected."""

    inserted: int
    updated: int
    unchanged: int
    rejected: int
    deactivated: int = 0


@dataclass(frozen=True, slots=True)
class StreamState:
    cursor_at: datetime | None
    last_full_sync_at: datetime | None


@dataclass(frozen=True, slots=True)
class RecallState:
    """The database clock now, and the last recall computation's watermark, full run and fingerprint."""

    now: datetime
    computed_at: datetime | None
    last_full_at: datetime | None
    fingerprint: str | None


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("nvc_pipelines.store") / "migrations"))
    return cfg


@cache
def _revisions() -> tuple[str | None, frozenset[str]]:
    """The code's newest schema revision, and every revision it knows."""
    script = ScriptDirectory.from_config(_alembic_config())
    return script.get_current_head(), frozenset(r.revision for r in script.walk_revisions())


@contextmanager
def _transaction(engine: Engine, setting: str) -> Iterator[Connection]:
    """One transaction on `engine`, its failures turned into one line that says what to check."""
    try:
        with engine.begin() as conn:
            yield conn
    except OperationalError as exc:
        if isinstance(exc.orig, QueryCanceled) and "statement timeout" in str(exc.orig):
            raise StoreUnavailable(
                f"A store statement ran longer than NVC_STATEMENT_TIMEOUT_SECONDS ({statement_timeout_seconds()} s) "
                "and was cancelled; nothing of it was written. Check for locks or a stuck query "
                "(pg_stat_activity), or raise NVC_STATEMENT_TIMEOUT_SECONDS."
            ) from None
        raise StoreUnavailable(
            f"The store's PostgreSQL failed: {str(exc.orig).strip()}. Check the server and {setting}; "
            "nothing was written."
        ) from None
    except ProgrammingError as exc:
        message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if not isinstance(exc.orig, InsufficientPrivilege) or not message.startswith(_REFUSALS):
            raise
        raise StoreUnavailable(
            f"The store refused {engine.url.username}: {message}. Its rights come from the migrations: run "
            "`nvc store migrate` with NVC_OWNER_DATABASE_URL set (the owner's login); nothing was written."
        ) from None


def _json_default(value: Any) -> str:
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError(type(value))


def _patient_from_row(row: Any) -> Patient:
    return Patient(
        practice_id=row.practice_id,
        pms_patient_id=row.pms_patient_id,
        first_name=row.first_name,
        last_name=row.last_name,
        phones=[Phone(e, PhoneType(t)) for e, t in zip(row.phones, row.phone_types, strict=True)],
        date_of_birth=row.date_of_birth,
        email=row.email,
        address=row.address,
        last_eye_test_date=row.last_eye_test_date,
        last_clinical_test_date=row.last_clinical_test_date,
        risk_flags=list(row.risk_flags),
        unknown_risk_values=list(row.unknown_risk_values),
        clinical_notes=row.clinical_notes,
        pms_recall_due_date=row.pms_recall_due_date,
        source_updated_at=row.source_updated_at,
        status=PatientStatus(row.pms_status),
        status_date=row.status_date,
        contact=ContactPreferences(
            phone_recall=row.phone_recall,
            no_recall=row.no_recall,
            channels=None if row.contact_channels is None else frozenset(Channel(c) for c in row.contact_channels),
        ),
        guardian_name=row.guardian_name,
        name_review=row.name_review,
    )


def _settle_rejected_copies(cur: Any, spec: StreamSpec, kept: dict[str, tuple[int, RejectedRow]]) -> int:
    """A patient read twice in one paged read (edited in the PMS meanwhile), once valid and once
    rejected: the later copy is the one that counts. Drops the earlier staged row (returns how many)
    or the earlier rejection (from `kept`)."""
    if spec is not PATIENTS or not kept:
        return 0
    about: dict[str, int] = {}
    for page, row in kept.values():
        if row.identity is not None and row.identity.pms_patient_id:
            about[row.identity.pms_patient_id] = max(page, about.get(row.identity.pms_patient_id, -1))
    if not about:
        return 0
    stage = stage_table(spec)
    cur.execute(f"SELECT pms_patient_id, stage_page FROM {stage} WHERE pms_patient_id = ANY(%s)", (list(about),))
    dropped = 0
    for key, staged_page in cur.fetchall():
        if staged_page < about[key]:
            cur.execute(f"DELETE FROM {stage} WHERE pms_patient_id = %s", (key,))
            dropped += cur.rowcount
        elif staged_page > about[key]:
            for ref, (page, row) in list(kept.items()):
                if row.identity is not None and row.identity.pms_patient_id == key and page < staged_page:
                    del kept[ref]
    return dropped


class Store:
    """Plain-Python access to the store; the Dagster `StoreResource` and the CLI both go through it.

    Two logins: the application's (`engine`, role `nvc_service`: no superuser, owns nothing, member
    of `nvc_app` only) for everything the pipelines, sensors and the CLI do, and the owner's
    (`owner_engine`) for migrations and the administrative commands (see `begin_owner`)."""

    def __init__(self, engine: Engine, owner_engine: Engine | None = None, *, app_derived: bool = False):
        self.engine = engine
        self.owner_engine = owner_engine
        self._app_derived = app_derived

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

    @contextmanager
    def begin(self, practice_id: str | None = None) -> Iterator[Connection]:
        """One transaction as the application (`nvc_service`). With `practice_id`, it is scoped to that
        practice (`SET LOCAL nvc.practice_id`): row-level security then hides every other practice's
        rows and refuses writes into them. Without, it sees no practice's rows, only the views made
        for reads across practices (`practice_registry`, `outbox_due_rows`, `alert_log`)."""
        with _transaction(self.engine, "NVC_DATABASE_URL") as conn:
            if practice_id is not None:
                conn.execute(text("SELECT set_config('nvc.practice_id', :p, true)"), {"p": practice_id})
            yield conn

    @contextmanager
    def begin_owner(self) -> Iterator[Connection]:
        """One transaction as the owner, for migrations and administrative commands only: registering,
        disconnecting and grouping practices, rotating the key. The application never needs it."""
        if self.owner_engine is None:
            raise StoreUnavailable(
                "This is an administrative command: it needs the store owner's login, and this process has only "
                f"the application's ({self.engine.url.username}). Run it with NVC_OWNER_DATABASE_URL set."
            )
        with _transaction(self.owner_engine, "NVC_OWNER_DATABASE_URL") as conn:
            yield conn

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision as the owner (idempotent, serialised by an
        advisory lock)."""
        with self.begin_owner() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # --- practice registry -------------------------------------------------------------------------

    def add_practice(
        self,
        practice_id: str,
        display_name: str,
        pms_kind: PmsKind,
        settings: dict[str, str],
        credentials: dict[str, str],
        *,
        replace: bool = False,
    ) -> Practice:
        """Register a practice (or re-connect a disconnected one); `replace` updates a connected one."""
        blob = encrypt_credentials(practice_id, credentials) if credentials else None
        try:
            with self.begin_owner() as conn:
                existing = conn.execute(
                    text("SELECT pms_kind, status FROM practices WHERE practice_id = :id FOR UPDATE"),
                    {"id": practice_id},
                ).one_or_none()
                if existing is not None and existing.status == "connected" and not replace:
                    raise PracticeExists(
                        f"practice {practice_id!r} is already connected ({existing.pms_kind}); "
                        "pass --update to change its settings"
                    )
                conn.execute(
                    text(
                        "INSERT INTO practices (practice_id, display_name, pms_kind, settings, credentials) "
                        "VALUES (:id, :name, :kind, CAST(:settings AS jsonb), :creds) "
                        "ON CONFLICT (practice_id) DO UPDATE SET display_name = EXCLUDED.display_name, "
                        "pms_kind = EXCLUDED.pms_kind, settings = EXCLUDED.settings, "
                        "credentials = EXCLUDED.credentials, status = 'connected'"
                    ),
                    {
                        "id": practice_id,
                        "name": display_name,
                        "kind": str(pms_kind),
                        "settings": json.dumps(settings),
                        "creds": blob,
                    },
                )
        except IntegrityError:
            raise ValueError(
                f"practice id {practice_id!r} is not allowed: use 1-63 lower-case letters, digits, '-' or '_'"
            ) from None
        return self.get_practice(practice_id)

    def get_practice(self, practice_id: str) -> Practice:
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text("SELECT * FROM practices WHERE practice_id = :id"), {"id": practice_id}
            ).one_or_none()
        if row is None:
            raise PracticeNotFound(f"no practice {practice_id!r} is registered (see `nvc practice list`)")
        return Practice(
            row.practice_id,
            row.display_name,
            PmsKind(row.pms_kind),
            row.settings,
            row.status,
            row.connected_at,
        )

    def practice_credentials(self, practice_id: str) -> dict[str, str]:
        """Decrypted secrets, for a resource about to talk to the PMS; never log or return them further."""
        with self.begin(practice_id) as conn:
            blob = conn.execute(
                text("SELECT credentials FROM practices WHERE practice_id = :id"), {"id": practice_id}
            ).scalar_one_or_none()
        return decrypt_credentials(practice_id, blob)

    def list_practices(self) -> list[dict[str, Any]]:
        """The registry with per-practice counts, through the view made for the application's reads
        across practices (no settings, no credentials)."""
        with self.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT practice_id, display_name, pms_kind, status, group_id, connected_at, last_sync_at, patients "
                    "FROM practice_registry ORDER BY practice_id"
                )
            ).mappings()
            return [dict(r) for r in rows]

    def set_status(self, practice_id: str, status: str) -> None:
        with self.begin_owner() as conn:
            n = conn.execute(
                text("UPDATE practices SET status = :s WHERE practice_id = :id"),
                {"s": status, "id": practice_id},
            ).rowcount
        if not n:
            raise PracticeNotFound(f"no practice {practice_id!r} is registered")

    # --- patients ----------------------------------------------------------------------------------

    def write_patients(
        self,
        practice_id: str,
        source: str,
        result: ReadResult,
        run_id: str | None,
        *,
        full: bool = False,
        cursor_at: datetime | None = None,
        max_drop_share: float | None = None,
    ) -> WriteCounts:
        return self.write_stream(
            practice_id,
            PATIENTS,
            result.patients,
            result.rejected,
            source=source,
            source_ref=result.source_ref,
            run_id=run_id,
            full=full,
            cursor_at=cursor_at,
            max_drop_share=max_drop_share,
        )

    def write_stream(
        self,
        practice_id: str,
        spec: StreamSpec,
        records: Sequence[Any],
        rejected: Sequence[RejectedRow],
        *,
        source: str,
        source_ref: str = "",
        run_id: str | None,
        full: bool,
        cursor_at: datetime | None = None,
        max_drop_share: float | None = None,
        place_calls_at: datetime | None = None,
    ) -> WriteCounts:
        """Merge one read of a stream, its rejections and its cursor in one transaction.

        With `place_calls_at` (an intraday read), the households of the patients read are placed on
        the call list again in the same transaction, so what the practice changed today (a booking,
        a death, an opt-out) is never written without its effect on the list.

        A full read replaces the stream's quarantine and reconciles (marks missing rows inactive);
        an incremental read replaces only the rejections of the rows it re-read. The cursor is
        committed with the data it covers, so a killed run re-reads from the old cursor.
        """
        refs = {r.pms_patient_id for r in records} if place_calls_at is not None else None
        return self._write_read(
            practice_id,
            spec,
            [(records, rejected)],
            source=source,
            source_ref=source_ref,
            run_id=run_id,
            full=full,
            cursor_at=cursor_at,
            max_drop_share=max_drop_share,
            place_calls=(refs, place_calls_at) if place_calls_at is not None else None,
        )

    def write_stream_pages(
        self,
        practice_id: str,
        spec: StreamSpec,
        pages: Iterable[tuple[Sequence[Any], Sequence[RejectedRow]]],
        *,
        source: str,
        source_ref: str | Callable[[], str] = "",
        run_id: str | None,
        full: bool,
        max_drop_share: float | None = None,
    ) -> WriteCounts:
        """`write_stream` for a read that arrives page by page (`(records, rejected)` each): every page
        is `COPY`ed into the stage as it comes, so memory does not grow with the practice. One
        transaction still holds the whole read, its rejections and its cursor (the newest change
        stamp read), and a full read is judged by the volume check before anything is changed; a
        failure while paging (the PMS going away) rolls everything back.

        A record that comes back on a later page (edited in the PMS while the read paged through)
        counts once, as its later copy, whether that copy was valid or rejected."""
        return self._write_read(
            practice_id,
            spec,
            pages,
            source=source,
            source_ref=source_ref,
            run_id=run_id,
            full=full,
            cursor_at=None,
            max_drop_share=max_drop_share,
            stamp_cursor=True,
        )

    def _write_read(
        self,
        practice_id: str,
        spec: StreamSpec,
        pages: Iterable[tuple[Sequence[Any], Sequence[RejectedRow]]],
        *,
        source: str,
        source_ref: str | Callable[[], str],
        run_id: str | None,
        full: bool,
        cursor_at: datetime | None,
        max_drop_share: float | None,
        stamp_cursor: bool = False,
        place_calls: tuple[set[str] | None, datetime] | None = None,
    ) -> WriteCounts:
        kept: dict[str, tuple[int, RejectedRow]] = {}  # by row_ref: a row re-read on a later page counts once
        newest: list[datetime] = []

        def records() -> Iterator[Sequence[Any]]:
            for page_no, (page_records, page_rejected) in enumerate(pages):
                for row in page_rejected:
                    kept.pop(row.row_ref, None)
                    kept[row.row_ref] = (page_no, row)
                if stamp_cursor:
                    stamp = next_cursor(getattr(r, "source_updated_at", None) for r in page_records)
                    if stamp is not None and (not newest or stamp > newest[0]):
                        newest[:] = [stamp]
                yield page_records

        with self.begin(practice_id) as conn:
            with conn.connection.driver_connection.cursor() as cur:
                staged = stage_pages(cur, spec, records())
                staged -= _settle_rejected_copies(cur, spec, kept)
                counts = merge_staged(cur, spec, practice_id, staged, full=full, max_drop_share=max_drop_share)
            rejected = [row for _page, row in kept.values()]
            if callable(source_ref):  # known once the pages have been read
                source_ref = source_ref()
            if stamp_cursor:
                cursor_at = newest[0] if newest else None
            if counts.patients_touched:  # their recalls read these rows: recompute them
                conn.execute(
                    text(
                        "UPDATE patients SET change_seq = change_seq + 1 "
                        "WHERE practice_id = :p AND pms_patient_id = ANY(:ids)"
                    ),
                    {"p": practice_id, "ids": sorted(counts.patients_touched)},
                )
            stream_source = f"{source}:{spec.name}" if source else spec.name
            if full:
                conn.execute(
                    text("DELETE FROM rejected_rows WHERE practice_id = :p AND source = :s"),
                    {"p": practice_id, "s": stream_source},
                )
            elif rejected:
                conn.execute(
                    text("DELETE FROM rejected_rows WHERE practice_id = :p AND source = :s AND row_ref = ANY(:refs)"),
                    {"p": practice_id, "s": stream_source, "refs": [r.row_ref for r in rejected]},
                )
            if rejected:
                conn.execute(
                    text(
                        "INSERT INTO rejected_rows (practice_id, source, source_ref, row_ref, reason, raw, run_id) "
                        "VALUES (:p, :s, :ref, :row_ref, :reason, CAST(:raw AS jsonb), :run_id)"
                    ),
                    [
                        {
                            "p": practice_id,
                            "s": stream_source,
                            "ref": source_ref,
                            "row_ref": r.row_ref,
                            "reason": r.reason,
                            "raw": json.dumps(r.raw, default=_json_default),
                            "run_id": run_id,
                        }
                        for r in rejected
                    ],
                )
            conn.execute(
                text(
                    "INSERT INTO sync_cursors (practice_id, stream, cursor_at, last_full_sync_at) "
                    "VALUES (:p, :stream, :cursor, CASE WHEN :full THEN now() END) "
                    "ON CONFLICT (practice_id, stream) DO UPDATE SET "
                    "cursor_at = COALESCE(EXCLUDED.cursor_at, sync_cursors.cursor_at), "
                    "last_full_sync_at = COALESCE(EXCLUDED.last_full_sync_at, sync_cursors.last_full_sync_at), "
                    "last_sync_at = now()"
                ),
                {"p": practice_id, "stream": spec.name, "cursor": cursor_at, "full": full},
            )
            conn.execute(text("UPDATE practices SET last_sync_at = now() WHERE practice_id = :p"), {"p": practice_id})
            if place_calls is not None:
                refs, place_calls_at = place_calls
                calls.refresh_refs(conn, practice_id, refs or set(), place_calls_at)
            self.audit(
                conn,
                f"pipeline:{run_id}" if run_id else "pipeline",
                practice_id,
                f"sync_{spec.name}",
                run_id=run_id,
                detail={
                    "full": full,
                    "inserted": counts.inserted,
                    "updated": counts.updated,
                    "deactivated": counts.deactivated,
                    "rejected": len(rejected),
                },
            )
        self._analyze_after_bulk(spec.table, counts.inserted + counts.updated + counts.deactivated)
        return WriteCounts(counts.inserted, counts.updated, counts.unchanged, len(rejected), counts.deactivated)

    def stream_state(self, practice_id: str, stream: str) -> StreamState:
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text("SELECT cursor_at, last_full_sync_at FROM sync_cursors WHERE practice_id = :p AND stream = :s"),
                {"p": practice_id, "s": stream},
            ).one_or_none()
        return StreamState(row.cursor_at, row.last_full_sync_at) if row else StreamState(None, None)

    def load_patients(
        self, practice_id: str, *, include_merged: bool = False, only: Collection[str] | None = None
    ) -> list[Patient]:
        """Active patients (plus merged-away records when asked, for matching); only those PMS ids when
        `only` is given."""
        where = "(active OR merged_into IS NOT NULL)" if include_merged else "active"
        params: dict[str, Any] = {"p": practice_id}
        if only is not None:
            where += " AND pms_patient_id = ANY(:only)"
            params["only"] = list(only)
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(f"SELECT * FROM patients WHERE practice_id = :p AND {where} ORDER BY pms_patient_id"), params
            )
            return [_patient_from_row(r) for r in rows]

    def recall_state(self, practice_id: str) -> RecallState:
        """What the practice's recalls were last computed with, and the database's clock now."""
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text(
                    "SELECT now() AS now, c.cursor_at, c.last_full_sync_at, c.fingerprint FROM (SELECT 1) one "
                    "LEFT JOIN sync_cursors c ON c.practice_id = :p AND c.stream = 'recalls'"
                ),
                {"p": practice_id},
            ).one()
        return RecallState(row.now, row.cursor_at, row.last_full_sync_at, row.fingerprint)

    def recall_targets(self, practice_id: str, *, everyone: bool) -> dict[str, int]:
        """PMS id -> `change_seq` of the patients whose recall must be recomputed: every patient, or
        those whose data changed since their recall was computed (active or not: an inactive one's
        recall is removed)."""
        stale = "" if everyone else " AND change_seq <> recall_seq"
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(f"SELECT pms_patient_id, change_seq FROM patients WHERE practice_id = :p{stale}"),
                {"p": practice_id},
            )
            return dict(rows.tuples().all())

    def recall_target_batches(self, practice_id: str, *, everyone: bool, size: int = 5000) -> Iterator[dict[str, int]]:
        """`recall_targets` in batches of at most `size` (PMS id -> `change_seq`), streamed from one
        server-side cursor, so a practice's recalls are computed a batch at a time in constant memory."""
        stale = "" if everyone else " AND change_seq <> recall_seq"
        with self.begin(practice_id) as conn:
            rows = conn.execution_options(stream_results=True, max_row_buffer=size).execute(
                text(f"SELECT pms_patient_id, change_seq FROM patients WHERE practice_id = :p{stale}"),
                {"p": practice_id},
            )
            for batch in rows.partitions(size):
                yield dict(tuple(r) for r in batch)

    def finish_recalls(self, practice_id: str, *, fingerprint: str, full: bool, changed: int = 0) -> None:
        """Record that the practice's recalls were computed (with these rules; all of them when
        `full`), after the last batch of `write_recalls`; refreshes the table's statistics after a
        bulk change. A run killed before this recomputes from where the batches' marks left off."""
        with self.begin(practice_id) as conn:
            self._mark_recalls_computed(conn, practice_id, fingerprint, full)
        self._analyze_after_bulk("recalls", changed)

    @staticmethod
    def _mark_recalls_computed(conn: Connection, practice_id: str, fingerprint: str, full: bool) -> None:
        conn.execute(
            text(
                "INSERT INTO sync_cursors (practice_id, stream, cursor_at, last_full_sync_at, fingerprint) "
                "VALUES (:p, 'recalls', now(), CASE WHEN :full THEN now() END, :fp) "
                "ON CONFLICT (practice_id, stream) DO UPDATE SET cursor_at = EXCLUDED.cursor_at, "
                "last_full_sync_at = COALESCE(EXCLUDED.last_full_sync_at, sync_cursors.last_full_sync_at), "
                "fingerprint = EXCLUDED.fingerprint, last_sync_at = now()"
            ),
            {"p": practice_id, "full": full, "fp": fingerprint},
        )

    def write_recalls(
        self,
        practice_id: str,
        recalls: Iterable[Recall],
        *,
        scope: Collection[str] | None = None,
        seen: Mapping[str, int] | None = None,
        fingerprint: str | None = None,
        analyze: bool = True,
    ) -> int:
        """Replace the practice's recalls with `recalls` in one transaction (only those of the PMS ids in
        `scope` when given); returns how many were added, changed or removed. `seen` (PMS id ->
        `change_seq` read before computing) marks those patients' recalls as computed from that
        state, and `fingerprint` the rules used, in the same transaction."""
        rows = [
            (
                r.pms_patient_id,
                r.due_date,
                r.recall_source,
                r.rule,
                r.interval_months,
                r.reason,
                list(r.flags),
                list(r.inferred_flags),
                r.based_on,
                list(r.warnings),
                r.guideline_due_date,
            )
            for r in recalls
        ]
        with self.begin(practice_id) as conn:
            with conn.connection.driver_connection.cursor() as cur:
                cur.execute(
                    "CREATE TEMP TABLE stage_recalls (pms_patient_id text, due_date date, recall_source text, "
                    "rule text, interval_months int, reason text, flags text[], inferred_flags text[], based_on date, "
                    "warnings text[], guideline_due_date date) "
                    "ON COMMIT DROP"
                )
                with cur.copy("COPY stage_recalls FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cur.execute("ANALYZE stage_recalls")  # temp tables have no statistics: the joins need them
            in_scope = ""
            params: dict[str, Any] = {"p": practice_id}
            if scope is not None:
                in_scope = (
                    " AND r.patient_id IN (SELECT patient_id FROM patients WHERE practice_id = :p"
                    " AND pms_patient_id = ANY(:scope))"
                )
                params["scope"] = list(scope)
            removed = conn.execute(
                text(
                    "DELETE FROM recalls r WHERE r.practice_id = :p" + in_scope + " AND NOT EXISTS ("
                    " SELECT 1 FROM stage_recalls s JOIN patients pt ON pt.practice_id = :p "
                    " AND pt.pms_patient_id = s.pms_patient_id WHERE pt.patient_id = r.patient_id AND pt.active)"
                ),
                params,
            ).rowcount
            changed = conn.execute(
                text(
                    "INSERT INTO recalls (patient_id, practice_id, due_date, recall_source, rule, interval_months, "
                    "reason, flags, inferred_flags, based_on, warnings, guideline_due_date) "
                    "SELECT pt.patient_id, :p, s.due_date, s.recall_source, s.rule, s.interval_months, s.reason, "
                    "s.flags, s.inferred_flags, s.based_on, s.warnings, s.guideline_due_date FROM stage_recalls s "
                    "JOIN patients pt ON pt.practice_id = :p AND pt.pms_patient_id = s.pms_patient_id AND pt.active "
                    "ON CONFLICT (patient_id) DO UPDATE SET due_date = EXCLUDED.due_date, "
                    "recall_source = EXCLUDED.recall_source, rule = EXCLUDED.rule, "
                    "interval_months = EXCLUDED.interval_months, reason = EXCLUDED.reason, flags = EXCLUDED.flags, "
                    "inferred_flags = EXCLUDED.inferred_flags, based_on = EXCLUDED.based_on, "
                    "warnings = EXCLUDED.warnings, guideline_due_date = EXCLUDED.guideline_due_date, computed_at = now() "
                    "WHERE (recalls.due_date, recalls.recall_source, recalls.rule, recalls.interval_months, "
                    "recalls.reason, recalls.flags, recalls.inferred_flags, recalls.based_on, recalls.warnings, "
                    "recalls.guideline_due_date) IS DISTINCT FROM ("
                    "EXCLUDED.due_date, EXCLUDED.recall_source, EXCLUDED.rule, EXCLUDED.interval_months, "
                    "EXCLUDED.reason, EXCLUDED.flags, EXCLUDED.inferred_flags, EXCLUDED.based_on, EXCLUDED.warnings, "
                    "EXCLUDED.guideline_due_date)"
                ),
                {"p": practice_id},
            ).rowcount
            if seen:
                with conn.connection.driver_connection.cursor() as cur:
                    cur.execute("CREATE TEMP TABLE stage_seen (pms_patient_id text, seq bigint) ON COMMIT DROP")
                    with cur.copy("COPY stage_seen FROM STDIN") as copy:
                        for item in seen.items():
                            copy.write_row(item)
                    cur.execute("ANALYZE stage_seen")
                # Only ever raised to what was read: a bump committed meanwhile stays visible as due.
                conn.execute(
                    text(
                        "UPDATE patients p SET recall_seq = s.seq FROM stage_seen s WHERE p.practice_id = :p "
                        "AND p.pms_patient_id = s.pms_patient_id AND p.recall_seq < s.seq"
                    ),
                    {"p": practice_id},
                )
            if fingerprint is not None:
                self._mark_recalls_computed(conn, practice_id, fingerprint, scope is None)
            self.audit(
                conn,
                "pipeline",
                practice_id,
                "compute_recalls",
                detail={"changed": changed, "removed": removed, "scope": "all" if scope is None else len(scope)},
            )
        if analyze:
            self._analyze_after_bulk("recalls", changed + removed)
        return changed + removed

    def refresh_statistics(self, table: str) -> None:
        """ANALYZE a table the application bulk-writes (through the owner's `nvc_analyze`), between
        the batches of a long bulk write whose later statements depend on the rows written so far."""
        self._analyze_after_bulk(table, BULK_ROWS)

    def _analyze_after_bulk(self, table: str, rows: int) -> None:
        """Refresh the planner's statistics after a bulk write (a first sync, a big reconcile). Only a
        table's owner may ANALYZE it, so the application calls `nvc_analyze`, the owner's function that
        does only that, on only the tables it bulk-writes. Until autovacuum gets there, a practice's
        freshly loaded rows look like none to the planner, and the call list's gather was then planned
        as a nested loop that ran for minutes at 200,000 patients."""
        if rows < BULK_ROWS:
            return
        with self.begin() as conn:
            conn.execute(text("SELECT nvc_analyze(:t)"), {"t": table})

    def load_clinical_records(
        self, practice_id: str, only: Collection[str] | None = None
    ) -> dict[str, list[ClinicalRecord]]:
        """Active clinical records by PMS patient id (only those patients' when `only` is given)."""
        out: dict[str, list[ClinicalRecord]] = {}
        where, params = "", {"p": practice_id}
        if only is not None:
            where, params["only"] = " AND pms_patient_id = ANY(:only)", list(only)
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(f"SELECT * FROM clinical_records WHERE practice_id = :p AND active{where} ORDER BY exam_date"),
                params,
            )
            for r in rows:
                out.setdefault(r.pms_patient_id, []).append(
                    ClinicalRecord(
                        practice_id=r.practice_id,
                        pms_record_id=r.pms_record_id,
                        pms_patient_id=r.pms_patient_id,
                        exam_date=r.exam_date,
                        record_type=r.record_type,
                        flags=list(r.flags),
                        unknown_flags=list(r.unknown_flags),
                        notes=r.notes,
                        iop_right_mmhg=float(r.iop_right_mmhg) if r.iop_right_mmhg is not None else None,
                        iop_left_mmhg=float(r.iop_left_mmhg) if r.iop_left_mmhg is not None else None,
                        clinician=r.clinician,
                        source_updated_at=r.source_updated_at,
                    )
                )
        return out

    def rebuild_call_list(
        self,
        practice_id: str,
        today: date | None = None,
        *,
        now: datetime | None = None,
        settings: CallSettings | None = None,
    ) -> dict[str, Any]:
        """Place every due patient of the practice again (see `nvc_pipelines.calling`): listed on the
        entry of one number, or not listed with the reason. Replaced whole, in one transaction;
        returns people listed, entries, households and the due people not listed by reason.

        `today` decides who is due (default: today in the UK); `now`, when calls may be made."""
        now = now or datetime.now(UTC)
        today = today or now.astimezone(UK_TZ).date()
        with self.begin(practice_id) as conn:
            settings = settings or calls.practice_call_settings(conn, practice_id)
            counts = calls.rebuild(conn, practice_id, today=today, now=now, settings=settings)
            self.audit(conn, "pipeline", practice_id, "build_call_list", detail=counts)
        return counts

    def update_call_list(
        self, practice_id: str, *, settings: CallSettings, now: datetime | None = None, full: bool = False
    ) -> dict[str, Any]:
        """The nightly's call list: only the households whose placement may have changed since the last
        build are placed again (whole the first time, after a settings change, or when `full`); see
        `calls.update`. Returns the whole practice's counts, the mode and how many were placed again."""
        now = now or datetime.now(UTC)
        with self.begin(practice_id) as conn:
            counts = calls.update(conn, practice_id, now=now, settings=settings, full=full)
            self.audit(conn, "pipeline", practice_id, "build_call_list", detail=counts)
        return counts

    def call_list(self, practice_id: str, actor: str | None = None) -> list[dict[str, Any]]:
        """The people on the call list, one row each (most overdue first), with the number, whom to
        ask for and when; reading it as someone (`actor`) is recorded in the audit log."""
        with self.begin(practice_id) as conn:
            if actor:
                self.audit(conn, actor, practice_id, "read_call_list")
            rows = conn.execute(
                text(
                    "SELECT pt.pms_patient_id, pt.first_name, pt.last_name, c.phone, c.due_date, c.reason, c.ask_for, "
                    "c.earliest_call_at FROM call_list c JOIN patients pt USING (patient_id) "
                    "WHERE c.practice_id = :p AND c.listed ORDER BY c.due_date, pt.pms_patient_id"
                ),
                {"p": practice_id},
            ).mappings()
            return [dict(r) for r in rows]

    def call_list_view(self, practice_id: str, actor: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """`{"entries": [...], "not_listed": [...]}`: one entry per number to dial, and every due
        patient who is not on the list with the reason."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            if actor:
                self.audit(conn, actor, practice_id, "read_call_list")
            return calls.entries(conn, practice_id)

    def call_list_why(self, practice_id: str, pms_patient_id: str, actor: str | None = None) -> dict[str, Any]:
        """Why one patient is, or is not, on the call list."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            found = calls.why(conn, practice_id, pms_patient_id, datetime.now(UTC).astimezone(UK_TZ).date())
            if found is None:
                raise PracticeNotFound(f"practice {practice_id} has no patient {pms_patient_id!r}")
            if actor:
                self.audit(conn, actor, practice_id, "read_call_list", [pms_patient_id])
        return found

    def call_list_state(self, practice_id: str) -> dict[str, Any]:
        """When the list was last built and last brought up to date during the day, and checks made."""
        with self.begin(practice_id) as conn:
            return calls.state(conn, practice_id)

    def claim_call_list_refresh(self, practice_id: str, at: datetime) -> None:
        """Record that an intraday refresh was requested now, so the next sensor tick waits for it."""
        with self.begin(practice_id) as conn:
            calls.claim(conn, practice_id, at)

    def connected_practices(self) -> list[Practice]:
        return [self.get_practice(r["practice_id"]) for r in self.list_practices() if r["status"] == "connected"]

    def mark_call_list_refreshed(self, practice_id: str, at: datetime, *, ok: bool, error: str | None = None) -> None:
        with self.begin(practice_id) as conn:
            calls.mark_refreshed(conn, practice_id, at, ok=ok, error=error)

    def call_list_entry(self, practice_id: str, phone: str, *, miss: bool | None = None) -> dict[str, Any]:
        """Who is on the entry of `phone` (and who on it is not listed); `miss` counts a pre-dial check."""
        with self.begin(practice_id) as conn:
            if miss is not None:
                calls.count_check(conn, practice_id, miss=miss)
            return calls.entry_for(conn, practice_id, phone)

    def call_list_violations(self, practice_id: str) -> list[dict[str, Any]]:
        with self.begin(practice_id) as conn:
            return calls.violations(conn, practice_id)

    def lift_contact_suppression(self, practice_id: str, pms_patient_id: str, actor: str, why: str) -> list[str]:
        """Let a patient who asked not to be called (or was reported deceased on a call) be called
        again: audited, and their household placed again at once. Returns the reasons lifted."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            patient_id = conn.execute(
                text(
                    "SELECT COALESCE(merged_into, patient_id) FROM patients WHERE practice_id = :p "
                    "AND pms_patient_id = :ref"
                ),
                {"p": practice_id, "ref": pms_patient_id},
            ).scalar_one_or_none()
            if patient_id is None:
                raise PracticeNotFound(f"practice {practice_id} has no patient {pms_patient_id!r}")
            lifted = calls.lift(conn, practice_id, pms_patient_id, actor, why)
            if not lifted:
                raise ValueError(f"patient {pms_patient_id} of {practice_id} has no call suppression to lift")
            self.audit(
                conn,
                actor,
                practice_id,
                "lift_contact_suppression",
                [pms_patient_id],
                detail={"lifted": lifted, "why": why},
            )
            calls.refresh_patient(conn, practice_id, patient_id, datetime.now(UTC))
        return lifted

    def recall_summary(self, practice_id: str, today: date) -> dict[str, Any]:
        with self.begin(practice_id) as conn:
            row = (
                conn.execute(
                    text(
                        "SELECT count(*) AS total, count(*) FILTER (WHERE due_date <= :today) AS due_now, "
                        "count(*) FILTER (WHERE due_date > :today AND due_date <= :today + 30) AS due_30_days, "
                        "count(*) FILTER (WHERE recall_source = 'pms') AS from_pms, "
                        "count(*) FILTER (WHERE recall_source = 'computed') AS computed, "
                        "count(*) FILTER (WHERE inferred_flags <> '{}') AS with_inferred_flags, "
                        "count(*) FILTER (WHERE 'pms_later_than_guideline' = ANY(warnings)) AS pms_later_than_guideline, "
                        "(SELECT count(*) FROM patients WHERE practice_id = :p AND active) AS active_patients "
                        "FROM recalls WHERE practice_id = :p"
                    ),
                    {"p": practice_id, "today": today},
                )
                .mappings()
                .one()
            )
            by_rule = conn.execute(
                text("SELECT rule, count(*) FROM recalls WHERE practice_id = :p GROUP BY rule ORDER BY rule"),
                {"p": practice_id},
            ).all()
            return {**row, "by_rule": dict(by_rule)}

    def recall_warnings(self, practice_id: str) -> list[dict[str, Any]]:
        """Patients whose PMS recall date (which wins) is later than the guideline's, for review."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(
                    "SELECT pt.pms_patient_id, pt.first_name, pt.last_name, r.due_date AS pms_due_date, "
                    "r.guideline_due_date, r.flags, r.warnings FROM recalls r JOIN patients pt USING (patient_id) "
                    "WHERE r.practice_id = :p AND r.warnings <> '{}' ORDER BY r.due_date - r.guideline_due_date DESC, "
                    "pt.pms_patient_id"
                ),
                {"p": practice_id},
            ).mappings()
            return [dict(r) for r in rows]

    # --- what the data-quality checks read -----------------------------------------------------------

    def quality_rows(
        self, practice_id: str, kind: str, since: datetime | None = None, *, size: int = 50_000
    ) -> Iterator[list[dict[str, Any]]]:
        """The rows a check validates, `size` at a time from one server-side cursor: active patients,
        active appointments, or recalls with their patient's state; only those written after `since`
        when given (the nightly's changed rows). In chunks, so validating a whole practice holds one
        chunk, never the practice."""
        queries = {
            "patients": "SELECT pms_patient_id, first_name, last_name, phones, date_of_birth, last_eye_test_date, "
            "risk_flags FROM patients WHERE practice_id = :p AND active",
            "appointments": "SELECT pms_appointment_id, pms_patient_id, starts_at, ends_at, status FROM appointments "
            "WHERE practice_id = :p AND active",
            "recalls": "SELECT pt.pms_patient_id, r.due_date, r.recall_source, r.rule, r.interval_months, r.based_on, "
            "pt.active AS patient_active FROM recalls r JOIN patients pt ON pt.patient_id = r.patient_id "
            "WHERE r.practice_id = :p",
        }
        changed = {
            "patients": " AND updated_at > :since",
            "appointments": " AND updated_at > :since",
            "recalls": " AND (r.computed_at > :since OR pt.updated_at > :since)",
        }
        sql = queries[kind] + (changed[kind] if since is not None else "")
        with self.begin(practice_id) as conn:
            rows = conn.execution_options(stream_results=True, max_row_buffer=size).execute(
                text(sql), {"p": practice_id, "since": since}
            )
            for chunk in rows.mappings().partitions(size):
                yield [dict(r) for r in chunk]

    # The whole-practice invariants of each check, as SQL aggregates (name -> rows that break it), and
    # the query that shows a few of those rows. They are what a changed-only nightly cannot see in the
    # rows it validates: a share, a duplicate, a reference to a row that changed elsewhere, or a rule
    # that the calendar breaks (an age passing 120).
    _INVARIANTS: dict[str, dict[str, tuple[str, str]]] = {
        "patients": {
            "unique_identity": (
                "SELECT count(*) - count(DISTINCT pms_patient_id) FROM patients WHERE practice_id = :p AND active",
                "SELECT pms_patient_id FROM patients WHERE practice_id = :p AND active GROUP BY pms_patient_id "
                "HAVING count(*) > 1",
            ),
            "birth_in_past_and_age_under_120": (
                "SELECT count(*) FROM patients WHERE practice_id = :p AND active AND date_of_birth IS NOT NULL "
                "AND (:today - date_of_birth < 0 OR :today - date_of_birth > :max_age_days)",
                "SELECT pms_patient_id, first_name, last_name, date_of_birth FROM patients WHERE practice_id = :p "
                "AND active AND date_of_birth IS NOT NULL "
                "AND (:today - date_of_birth < 0 OR :today - date_of_birth > :max_age_days)",
            ),
            "uncallable": (
                "SELECT count(*) FILTER (WHERE cardinality(phones) = 0) FROM patients WHERE practice_id = :p AND active",
                "SELECT pms_patient_id, first_name, last_name, phones FROM patients WHERE practice_id = :p AND active "
                "AND cardinality(phones) = 0",
            ),
        },
        "appointments": {
            "patient_exists": (
                "SELECT count(*) FROM appointments a WHERE a.practice_id = :p AND a.active AND NOT EXISTS ("
                "SELECT 1 FROM patients pt WHERE pt.practice_id = :p AND pt.pms_patient_id = a.pms_patient_id)",
                "SELECT a.pms_appointment_id, a.pms_patient_id, a.starts_at, a.status FROM appointments a "
                "WHERE a.practice_id = :p AND a.active AND NOT EXISTS (SELECT 1 FROM patients pt "
                "WHERE pt.practice_id = :p AND pt.pms_patient_id = a.pms_patient_id)",
            ),
        },
        "recalls": {
            "patient_active": (
                "SELECT count(*) FROM recalls r JOIN patients pt ON pt.patient_id = r.patient_id "
                "WHERE r.practice_id = :p AND NOT pt.active",
                "SELECT pt.pms_patient_id, r.due_date, r.recall_source, r.rule FROM recalls r "
                "JOIN patients pt ON pt.patient_id = r.patient_id WHERE r.practice_id = :p AND NOT pt.active",
            ),
        },
    }

    def quality_invariants(
        self, practice_id: str, kind: str, today: date, examples: int = 20
    ) -> tuple[dict[str, int], int, dict[str, list[dict[str, Any]]]]:
        """The whole practice's invariants for one check: rows breaking each (by name), the number of
        rows the check covers, and up to `examples` of the breaking rows for each that is broken."""
        params = {"p": practice_id, "today": today, "max_age_days": int(120 * 365.25)}
        table = {"patients": "patients", "appointments": "appointments", "recalls": "recalls"}[kind]
        active = "" if kind == "recalls" else " AND active"
        with self.begin(practice_id) as conn:
            counts = {
                name: int(conn.execute(text(sql), params).scalar_one())
                for name, (sql, _) in self._INVARIANTS[kind].items()
            }
            total = conn.execute(
                text(f"SELECT count(*) FROM {table} WHERE practice_id = :p{active}"), params
            ).scalar_one()
            shown = {
                name: [
                    dict(r)
                    for r in conn.execute(
                        text(f"{self._INVARIANTS[kind][name][1]} LIMIT {examples}"), params
                    ).mappings()
                ]
                for name, n in counts.items()
                if n
            }
        return counts, int(total), shown

    def check_mark(self, practice_id: str, name: str) -> tuple[datetime | None, str | None, datetime | None, datetime]:
        """What check `name` last validated up to: (mark, its fingerprint, the practice's last full read
        of patients, the database's clock now)."""
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text(
                    f"SELECT ({calls._SAFE_MARK}) AS now, c.cursor_at, c.fingerprint, f.last_full_sync_at FROM (SELECT 1) one "
                    "LEFT JOIN sync_cursors c ON c.practice_id = :p AND c.stream = :s "
                    "LEFT JOIN sync_cursors f ON f.practice_id = :p AND f.stream = 'patients'"
                ),
                {"p": practice_id, "s": f"check:{name}"},
            ).one()
        return row.cursor_at, row.fingerprint, row.last_full_sync_at, row.now

    def advance_check_mark(self, practice_id: str, name: str, at: datetime, fingerprint: str) -> None:
        """Check `name` has validated every row written before `at` with the suite `fingerprint`."""
        with self.begin(practice_id) as conn:
            conn.execute(
                text(
                    "INSERT INTO sync_cursors (practice_id, stream, cursor_at, fingerprint) VALUES (:p, :s, :at, :fp) "
                    "ON CONFLICT (practice_id, stream) DO UPDATE SET cursor_at = EXCLUDED.cursor_at, "
                    "fingerprint = EXCLUDED.fingerprint, last_sync_at = now()"
                ),
                {"p": practice_id, "s": f"check:{name}", "at": at, "fp": fingerprint},
            )

    def all_patient_ids(self, practice_id: str) -> set[str]:
        with self.begin(practice_id) as conn:
            return set(
                conn.execute(
                    text("SELECT pms_patient_id FROM patients WHERE practice_id = :p"), {"p": practice_id}
                ).scalars()
            )

    def oldest_waiting_writeback(self, practice_id: str) -> datetime | None:
        """When the practice's oldest booking or note still on its way to the PMS was written to the
        outbox (None when nothing waits)."""
        with self.begin(practice_id) as conn:
            return conn.execute(
                text("SELECT min(created_at) FROM outbox WHERE practice_id = :p AND status IN ('pending', 'sent')"),
                {"p": practice_id},
            ).scalar_one()

    def last_successful_sync(self, practice_id: str, stream: str = "patients") -> datetime | None:
        with self.begin(practice_id) as conn:
            return conn.execute(
                text("SELECT last_sync_at FROM sync_cursors WHERE practice_id = :p AND stream = :s"),
                {"p": practice_id, "s": stream},
            ).scalar_one_or_none()

    # --- practice groups (multi-location) ---------------------------------------------------------

    def add_group(self, group_id: str, display_name: str) -> None:
        try:
            with self.begin_owner() as conn:
                conn.execute(
                    text(
                        "INSERT INTO practice_groups (group_id, display_name) VALUES (:g, :n) "
                        "ON CONFLICT (group_id) DO UPDATE SET display_name = EXCLUDED.display_name"
                    ),
                    {"g": group_id, "n": display_name},
                )
        except IntegrityError:
            raise ValueError(
                f"group id {group_id!r} is not allowed: use 1-63 lower-case letters, digits, '-' or '_'"
            ) from None

    def set_group(self, practice_id: str, group_id: str | None) -> None:
        with self.begin_owner() as conn:
            if (
                group_id is not None
                and not conn.execute(text("SELECT 1 FROM practice_groups WHERE group_id = :g"), {"g": group_id}).first()
            ):
                raise PracticeNotFound(f"no group {group_id!r}: create it with `nvc group create`")
            if not conn.execute(
                text("UPDATE practices SET group_id = :g WHERE practice_id = :p"), {"g": group_id, "p": practice_id}
            ).rowcount:
                raise PracticeNotFound(f"no practice {practice_id!r} is registered")

    def groups(self) -> list[dict[str, Any]]:
        with self.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT g.group_id, g.display_name, coalesce(array_agg(p.practice_id ORDER BY p.practice_id) "
                    "FILTER (WHERE p.practice_id IS NOT NULL), '{}') AS practices FROM practice_groups g "
                    "LEFT JOIN practice_registry p ON p.group_id = g.group_id GROUP BY g.group_id ORDER BY g.group_id"
                )
            ).mappings()
            return [dict(r) for r in rows]

    def group_practices(self, group_id: str) -> list[str]:
        for group in self.groups():
            if group["group_id"] == group_id:
                return list(group["practices"])
        raise PracticeNotFound(f"no group {group_id!r} (see `nvc group list`)")

    # --- matching, duplicates, merges ------------------------------------------------------------

    def remap_derived_identities(self, practice_id: str, result: ReadResult) -> int:
        """Give id-less incoming rows the identity of the stored patient they match (phone plus name
        or date of birth); a row that then repeats an identity is rejected as a duplicate."""
        if not any(p.pms_patient_id.startswith(DERIVED_PREFIX) for p in result.patients):
            return 0
        mapping = resolve_derived_identities(result.patients, self.load_patients(practice_id, include_merged=True))
        if not mapping:
            return 0
        kept: list[Patient] = []
        seen: set[str] = set()
        for p in result.patients:
            p.pms_patient_id = mapping.get(p.pms_patient_id, p.pms_patient_id)
            if p.pms_patient_id in seen:
                result.rejected.append(RejectedRow(p.pms_patient_id, "duplicate of another row (same patient)", {}))
                continue
            seen.add(p.pms_patient_id)
            kept.append(p)
        result.patients[:] = kept
        return len(mapping)

    def duplicates(self, practice_id: str) -> list[DuplicatePair]:
        return find_duplicates(self.load_patients(practice_id))

    def _patient_ids(self, conn: Connection, practice_id: str, refs: Sequence[str]) -> list[int]:
        rows = dict(
            conn.execute(
                text(
                    "SELECT pms_patient_id, patient_id FROM patients "
                    "WHERE practice_id = :p AND pms_patient_id = ANY(:refs) FOR UPDATE"
                ),
                {"p": practice_id, "refs": list(refs)},
            ).all()
        )
        missing = [r for r in refs if r not in rows]
        if missing:
            raise PracticeNotFound(f"practice {practice_id} has no patient {', '.join(missing)}")
        return [rows[r] for r in refs]

    def merge_patients(self, practice_id: str, keep: str, merged: str, actor: str) -> int:
        """Merge `merged` into `keep`: the merged record goes inactive and points at `keep`, which then
        carries its phones and appointments too; nothing is deleted, and `undo_merge` reverses it."""
        if keep == merged:
            raise ValueError("a patient cannot be merged into itself")
        with self.begin(practice_id) as conn:
            keep_id, merged_id = self._patient_ids(conn, practice_id, [keep, merged])
            state = conn.execute(
                text("SELECT patient_id, merged_into, active FROM patients WHERE patient_id = ANY(:ids)"),
                {"ids": [keep_id, merged_id]},
            ).all()
            if any(r.merged_into is not None for r in state):
                raise ValueError("one of these patients is already merged; undo that merge first")
            conn.execute(
                text(
                    "UPDATE patients SET merged_into = :k, active = false, updated_at = now(), "
                    "change_seq = change_seq + 1 WHERE patient_id = :m"
                ),
                {"k": keep_id, "m": merged_id},
            )
            conn.execute(
                text("UPDATE patients SET merged_into = :k WHERE merged_into = :m"), {"k": keep_id, "m": merged_id}
            )
            merge_id = conn.execute(
                text(
                    "INSERT INTO patient_merges (practice_id, keep_patient_id, merged_patient_id, merged_by) "
                    "VALUES (:p, :k, :m, :actor) RETURNING merge_id"
                ),
                {"p": practice_id, "k": keep_id, "m": merged_id, "actor": actor},
            ).scalar_one()
            self.audit(conn, actor, practice_id, "merge", [keep, merged], detail={"merge_id": merge_id})
        return merge_id

    def undo_merge(self, practice_id: str, merge_id: int, actor: str) -> None:
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text(
                    "SELECT m.*, k.pms_patient_id AS keep_ref, o.pms_patient_id AS merged_ref FROM patient_merges m "
                    "JOIN patients k ON k.patient_id = m.keep_patient_id "
                    "JOIN patients o ON o.patient_id = m.merged_patient_id "
                    "WHERE m.merge_id = :id AND m.practice_id = :p FOR UPDATE OF m"
                ),
                {"id": merge_id, "p": practice_id},
            ).one_or_none()
            if row is None:
                raise PracticeNotFound(f"practice {practice_id} has no merge {merge_id}")
            if row.undone_at is not None:
                raise ValueError(f"merge {merge_id} was already undone")
            conn.execute(
                text(
                    "UPDATE patients SET merged_into = NULL, active = true, updated_at = now(), "
                    "change_seq = change_seq + 1 WHERE patient_id = :m"
                ),
                {"m": row.merged_patient_id},
            )
            conn.execute(
                text("UPDATE patient_merges SET undone_at = now(), undone_by = :a WHERE merge_id = :id"),
                {"a": actor, "id": merge_id},
            )
            self.audit(
                conn, actor, practice_id, "unmerge", [row.keep_ref, row.merged_ref], detail={"merge_id": merge_id}
            )

    # --- audit -------------------------------------------------------------------------------------

    @staticmethod
    def audit(
        conn: Connection,
        actor: str,
        practice_id: str,
        action: str,
        record_refs: Sequence[str] = (),
        run_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append to the audit log inside the caller's transaction (so it commits with the access)."""
        conn.execute(
            text(
                "INSERT INTO audit_log (actor, practice_id, action, record_refs, run_id, detail) "
                "VALUES (:actor, :p, :action, :refs, :run, CAST(:detail AS jsonb))"
            ),
            {
                "actor": actor,
                "p": practice_id,
                "action": action,
                "refs": list(record_refs),
                "run": run_id,
                "detail": json.dumps(detail or {}, default=_json_default),
            },
        )

    def audit_entries(self, practice_id: str, limit: int = 200) -> list[dict[str, Any]]:
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text("SELECT * FROM audit_log WHERE practice_id = :p ORDER BY audit_id DESC LIMIT :n"),
                {"p": practice_id, "n": limit},
            ).mappings()
            return [dict(r) for r in rows]

    # --- export ------------------------------------------------------------------------------------

    def export_practice(self, practice_id: str, patient_ref: str | None = None) -> dict[str, Any]:
        """Everything held about one practice's patients (or one patient: `patient_ref` is a PMS id),
        in the documented export shape."""
        self.get_practice(practice_id)
        if patient_ref is not None and patient_ref not in self.all_patient_ids(practice_id):
            raise PracticeNotFound(f"practice {practice_id} has no patient {patient_ref!r}")
        with self.begin(practice_id) as conn:
            patients = (
                conn.execute(
                    text(
                        "SELECT pt.*, r.due_date AS recall_due_date, r.recall_source, r.rule AS recall_rule, "
                        "r.reason AS recall_reason, r.inferred_flags, m.pms_patient_id AS merged_into_id "
                        "FROM patients pt LEFT JOIN recalls r ON r.patient_id = pt.patient_id "
                        "LEFT JOIN patients m ON m.patient_id = pt.merged_into "
                        "WHERE pt.practice_id = :p AND (CAST(:one AS text) IS NULL OR pt.pms_patient_id = :one) "
                        "ORDER BY pt.pms_patient_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            appointments = (
                conn.execute(
                    text(
                        "SELECT pms_appointment_id, pms_patient_id, starts_at, ends_at, status, appointment_type, "
                        "clinician, notes, nvc_reference, active FROM appointments WHERE practice_id = :p "
                        "AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) "
                        "ORDER BY starts_at, pms_appointment_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            clinical = (
                conn.execute(
                    text(
                        "SELECT pms_record_id, pms_patient_id, exam_date, record_type, flags, unknown_flags, notes, "
                        "iop_right_mmhg, iop_left_mmhg, clinician, active FROM clinical_records WHERE practice_id = :p "
                        "AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) "
                        "ORDER BY exam_date, pms_record_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            call_events = (
                conn.execute(
                    text(
                        "SELECT pms_patient_id, kind, outcome, phone, recall_due_date, occurred_at, actor "
                        "FROM call_events WHERE practice_id = :p AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) "
                        "ORDER BY event_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            contact_suppressions = (
                conn.execute(
                    text(
                        "SELECT pms_patient_id, reason, created_at, lifted_at, lifted_by, lift_reason "
                        "FROM contact_suppressions WHERE practice_id = :p "
                        "AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) ORDER BY suppression_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            rejected = (
                conn.execute(
                    text(
                        "SELECT source, source_ref, row_ref, reason, raw, rejected_at FROM rejected_rows "
                        "WHERE practice_id = :p AND CAST(:one AS text) IS NULL ORDER BY rejected_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )

        def iso(value: Any) -> Any:
            if isinstance(value, Decimal):
                return float(value)
            return value.isoformat() if isinstance(value, date | datetime) else value

        data = {
            "practice_id": practice_id,
            "patients": [
                {
                    "pms_patient_id": p["pms_patient_id"],
                    "first_name": p["first_name"],
                    "last_name": p["last_name"],
                    "date_of_birth": iso(p["date_of_birth"]),
                    "email": p["email"],
                    "address": p["address"],
                    "phones": list(p["phones"]),
                    "last_eye_test_date": iso(p["last_eye_test_date"]),
                    "last_clinical_test_date": iso(p["last_clinical_test_date"]),
                    "risk_flags": list(p["risk_flags"]),
                    "unknown_risk_values": list(p["unknown_risk_values"]),
                    "clinical_notes": p["clinical_notes"],
                    "recall_due_date": iso(p["recall_due_date"]),
                    "recall_source": p["recall_source"],
                    "recall_rule": p["recall_rule"],
                    "recall_reason": p["recall_reason"],
                    "inferred_flags": list(p["inferred_flags"] or []),
                    "active": p["active"],
                    "merged_into": p["merged_into_id"],
                    "status": p["pms_status"],
                    "status_date": iso(p["status_date"]),
                    "phone_recall": p["phone_recall"],
                    "no_recall": p["no_recall"],
                    "contact_channels": None if p["contact_channels"] is None else list(p["contact_channels"]),
                    "guardian_name": p["guardian_name"],
                }
                for p in patients
            ],
            "appointments": [
                {k: iso(float(v) if isinstance(v, Decimal) else v) for k, v in a.items()} for a in appointments
            ],
            "clinical_records": [
                {
                    k: (float(v) if isinstance(v, Decimal) else list(v) if isinstance(v, list) else iso(v))
                    for k, v in c.items()
                }
                for c in clinical
            ],
            "call_events": [{k: iso(v) for k, v in e.items()} for e in call_events],
            "contact_suppressions": [{k: iso(v) for k, v in c.items()} for c in contact_suppressions],
            "rejected_rows": [{k: iso(v) for k, v in r.items()} for r in rejected],
        }
        if patient_ref is not None:
            data["patient"] = patient_ref
        return data
