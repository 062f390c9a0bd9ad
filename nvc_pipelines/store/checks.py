"""What the data-quality checks read: the rows to validate, the whole-practice invariants, the marks."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

from sqlalchemy import text

from nvc_pipelines.store import call_updates
from nvc_pipelines.store.base import StoreBase
from nvc_pipelines.store.db import driver

# What each check validates: active patients, active appointments, recalls with their patient's id.
_ROWS = {
    "patients": "SELECT pms_patient_id, first_name, last_name, phones, date_of_birth, last_eye_test_date, "
    "risk_flags FROM patients WHERE practice_id = :p AND active",
    "appointments": "SELECT pms_appointment_id, pms_patient_id, starts_at, ends_at, status FROM appointments "
    "WHERE practice_id = :p AND active",
    "recalls": "SELECT pt.pms_patient_id, r.due_date, r.recall_source, r.rule, r.interval_months, r.based_on "
    "FROM recalls r JOIN patients pt ON pt.patient_id = r.patient_id "
    "WHERE r.practice_id = :p",
}
# Only those written after the check's mark (`:since`): a range of each table's (practice, time)
# index (migration 0020), not a scan of the practice.
_CHANGED = {
    "patients": " AND updated_at > :since",
    "appointments": " AND updated_at > :since",
    # Two filtered scans, then the join for those few: an OR across the join joined every row.
    "recalls": " AND r.patient_id IN (SELECT patient_id FROM recalls WHERE practice_id = :p "
    "AND computed_at > :since UNION SELECT patient_id FROM patients WHERE practice_id = :p "
    "AND updated_at > :since)",
}


def rows_sql(kind: str, *, changed: bool) -> str:
    """The statement `quality_rows` reads a check's rows with (`:p`, and `:since` when `changed`)."""
    return _ROWS[kind] + (_CHANGED[kind] if changed else "")


class ChecksMixin(StoreBase):
    """The validity checks' reads and their marks (`sync_cursors` streams `check:NAME`)."""

    def quality_rows(
        self, practice_id: str, kind: str, since: datetime | None = None, *, size: int = 50_000
    ) -> Iterator[list[tuple[Any, ...]]]:
        """The rows a check validates, `size` at a time from one server-side cursor: active patients,
        active appointments, or recalls with their patient's PMS id; only those written after `since`
        when given (the nightly's changed rows). In chunks, so validating a whole practice holds one
        chunk, never the practice.

        Each row is the driver's tuple, its values in the order of `rows_sql`'s columns (the order
        `quality.ROW_COLUMNS` names them in): making dictionaries of 200,000 appointments' rows took
        about 1.5 s of a full check."""
        statement = text(rows_sql(kind, changed=since is not None))
        with self.begin(practice_id) as conn, driver(conn).cursor(name=f"quality_{kind}") as cur:
            cur.execute(str(statement.compile(dialect=conn.dialect)), {"p": practice_id, "since": since})
            while chunk := cur.fetchmany(size):
                yield chunk

    # The whole-practice invariants of each check, counted in one pass over the check's rows (a
    # column per invariant, and `total`, the rows the check covers), and for each the query that shows
    # a few of the rows breaking it. They are what a changed-only nightly cannot see in the rows it
    # validates: a share, a duplicate, a reference to a row that changed elsewhere, or a rule that the
    # calendar breaks (an age passing 120).
    _COUNTS: dict[str, str] = {
        # No count of repeated identities: the key (practice_id, pms_patient_id) is unique in the table,
        # so it could never find one, and counting distinct ids sorted the practice (0.1 s at 200,000).
        "patients": "SELECT count(*) AS total, "
        "count(*) FILTER (WHERE date_of_birth IS NOT NULL AND (:today - date_of_birth < 0 "
        "OR :today - date_of_birth > :max_age_days)) AS birth_in_past_and_age_under_120, "
        "count(*) FILTER (WHERE cardinality(phones) = 0) AS uncallable "
        "FROM patients WHERE practice_id = :p AND active",
        # (practice_id, pms_patient_id) is unique, so the LEFT JOIN adds no rows: one hash join.
        "appointments": "SELECT count(*) AS total, count(*) FILTER (WHERE pt.patient_id IS NULL) AS patient_exists "
        "FROM appointments a LEFT JOIN patients pt ON pt.practice_id = :p AND pt.pms_patient_id = a.pms_patient_id "
        "WHERE a.practice_id = :p AND a.active",
        # The practice's recalls are counted alone, and only its inactive patients are joined to theirs (a
        # join of every recall hashed the practice).
        "recalls": "SELECT (SELECT count(*) FROM recalls WHERE practice_id = :p) AS total, (SELECT count(*) "
        "FROM patients pt JOIN recalls r ON r.patient_id = pt.patient_id WHERE pt.practice_id = :p AND NOT pt.active) "
        "AS patient_active",
    }
    _EXAMPLES: dict[str, dict[str, str]] = {
        "patients": {
            "birth_in_past_and_age_under_120": "SELECT pms_patient_id, first_name, last_name, date_of_birth "
            "FROM patients WHERE practice_id = :p AND active AND date_of_birth IS NOT NULL "
            "AND (:today - date_of_birth < 0 OR :today - date_of_birth > :max_age_days)",
            "uncallable": "SELECT pms_patient_id, first_name, last_name, phones FROM patients "
            "WHERE practice_id = :p AND active AND cardinality(phones) = 0",
        },
        "appointments": {
            "patient_exists": "SELECT a.pms_appointment_id, a.pms_patient_id, a.starts_at, a.status FROM appointments a "
            "WHERE a.practice_id = :p AND a.active AND NOT EXISTS (SELECT 1 FROM patients pt "
            "WHERE pt.practice_id = :p AND pt.pms_patient_id = a.pms_patient_id)",
        },
        "recalls": {
            "patient_active": "SELECT pt.pms_patient_id, r.due_date, r.recall_source, r.rule FROM recalls r "
            "JOIN patients pt ON pt.patient_id = r.patient_id WHERE r.practice_id = :p AND NOT pt.active",
        },
    }

    # Invariants counted only when a check validates every row (a full read of the patients, at least
    # weekly; a forced full sync; a new suite): each costs a pass over the practice that a nightly
    # should not pay. A recall whose patient is gone: the table checks no key since migration 0022,
    # and erasure deletes both (0.14-0.36 s at 200,000 patients, a hash anti-join of the practice).
    _EVERY_ROW_COUNTS: dict[str, tuple[str, str, str]] = {
        "recalls": (
            "patient_exists",
            "SELECT count(*) FROM recalls r WHERE r.practice_id = :p "
            "AND NOT EXISTS (SELECT 1 FROM patients pt WHERE pt.patient_id = r.patient_id)",
            "SELECT r.patient_id, r.due_date, r.recall_source, r.rule FROM recalls r WHERE r.practice_id = :p "
            "AND NOT EXISTS (SELECT 1 FROM patients pt WHERE pt.patient_id = r.patient_id)",
        ),
    }

    def quality_invariants(
        self, practice_id: str, kind: str, today: date, examples: int = 20, *, every_row: bool = False
    ) -> tuple[dict[str, int], int, dict[str, list[dict[str, Any]]]]:
        """The whole practice's invariants for one check: rows breaking each (by name), the number of
        rows the check covers, and up to `examples` of the breaking rows for each that is broken;
        with `every_row`, those counted only when a check validates every row too."""
        params = {"p": practice_id, "today": today, "max_age_days": int(120 * 365.25)}
        with self.begin(practice_id) as conn:
            row = dict(conn.execute(text(self._COUNTS[kind]), params).mappings().one())
            total = int(row.pop("total"))
            counts = {name: int(row[name]) for name in self._EXAMPLES[kind]}
            queries = dict(self._EXAMPLES[kind])
            if every_row and kind in self._EVERY_ROW_COUNTS:
                name, count, rows = self._EVERY_ROW_COUNTS[kind]
                counts[name] = int(conn.execute(text(count), params).scalar_one())
                queries[name] = rows
            shown = {
                name: [dict(r) for r in conn.execute(text(f"{queries[name]} LIMIT {examples}"), params).mappings()]
                for name, n in counts.items()
                if n
            }
        return counts, total, shown

    def check_mark(self, practice_id: str, name: str) -> tuple[datetime | None, str | None, datetime | None, datetime]:
        """What check `name` last validated up to: (mark, its fingerprint, the practice's last full read
        of patients, the database's clock now)."""
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text(
                    f"SELECT ({call_updates._SAFE_MARK}) AS now, c.cursor_at, c.fingerprint, f.last_full_sync_at FROM (SELECT 1) one "
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
