"""What every family of the store shares: the two logins, their transactions, the errors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from psycopg.errors import InsufficientPrivilege, QueryCanceled
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from nvc_pipelines.config import statement_timeout_seconds
from nvc_pipelines.model import Patient, Practice
from nvc_pipelines.store.db import StoreUnavailable

_REFUSALS = ("permission denied", "must be owner", "must be superuser", "must be member")

BULK_ROWS = 5000  # rows written at once after which the table's statistics are refreshed


class PracticeNotFound(LookupError):
    @classmethod
    def unregistered(cls, practice_id: str) -> PracticeNotFound:
        """The one error for a practice id nobody registered, whichever command was given it."""
        return cls(f"no practice {practice_id!r} is registered (see `nvc practice list`)")


class PracticeExists(ValueError):
    pass


def _timed_out() -> StoreUnavailable:
    return StoreUnavailable(
        f"A store statement ran longer than NVC_STATEMENT_TIMEOUT_SECONDS ({statement_timeout_seconds()} s) "
        "and was cancelled; nothing of it was written. Check for locks or a stuck query "
        "(pg_stat_activity), or raise NVC_STATEMENT_TIMEOUT_SECONDS."
    )


@contextmanager
def _transaction(engine: Engine, setting: str) -> Iterator[Connection]:
    """One transaction on `engine`, its failures turned into one line that says what to check."""
    try:
        with engine.begin() as conn:
            yield conn
    except OperationalError as exc:
        if isinstance(exc.orig, QueryCanceled) and "statement timeout" in str(exc.orig):
            raise _timed_out() from None
        raise StoreUnavailable(
            f"The store's PostgreSQL failed: {str(exc.orig).strip()}. Check the server and {setting}; "
            "nothing was written."
        ) from None
    except QueryCanceled as exc:  # from the psycopg cursor under the transaction (COPY, the bulk merges)
        if "statement timeout" not in str(exc):
            raise
        raise _timed_out() from None
    except ProgrammingError as exc:
        message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if not isinstance(exc.orig, InsufficientPrivilege) or not message.startswith(_REFUSALS):
            raise
        raise StoreUnavailable(
            f"The store refused {engine.url.username}: {message}. Its rights come from the migrations: run "
            "`nvc store migrate` with NVC_OWNER_DATABASE_URL set (the owner's login); nothing was written."
        ) from None


def json_default(value: Any) -> str:
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError(type(value))


class StoreBase:
    """The two logins and their transactions, which every family of the store builds on.

    Two logins: the application's (`engine`, role `nvc_service`: no superuser, owns nothing, member
    of `nvc_app` only) for everything the pipelines, sensors and the CLI do, and the owner's
    (`owner_engine`) for migrations and the administrative commands (see `begin_owner`). Each
    statement of a family names the login it needs, so moving it between modules never changes it."""

    def __init__(self, engine: Engine, owner_engine: Engine | None = None, *, app_derived: bool = False):
        self.engine = engine
        self.owner_engine = owner_engine
        self._app_derived = app_derived

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

    if TYPE_CHECKING:  # one family's methods that others call; `Store` composes them all

        @staticmethod
        def audit(
            conn: Connection,
            actor: str,
            practice_id: str,
            action: str,
            record_refs: Sequence[str] = (),
            run_id: str | None = None,
            detail: dict[str, Any] | None = None,
        ) -> None: ...

        def get_practice(self, practice_id: str) -> Practice: ...

        def list_practices(self) -> list[dict[str, Any]]: ...

        def load_patients(self, practice_id: str) -> list[Patient]: ...

        def has_patient(self, practice_id: str, pms_patient_id: str) -> bool: ...
