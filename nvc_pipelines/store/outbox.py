"""The outbox: bookings and call notes on their way to the PMS, and the worklist of those that need action.

What a row's state means and when it changes is `nvc_pipelines.writeback`'s; here are the statements.
Reads across practices go through the owner's views `outbox_due_rows` and `outbox_states` (ids,
states and times only), every other statement through a transaction scoped to the row's practice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, text

from nvc_pipelines.model import CallOutcome
from nvc_pipelines.store import call_events
from nvc_pipelines.store.alerts import insert_keyed_alert
from nvc_pipelines.store.base import StoreBase
from nvc_pipelines.store.erasure import PatientErased, lock_erasures

# Rows that ended without reaching the PMS and wait for an operator (retry or dismiss).
NEEDS_ACTION = ("failed", "dead_letter", "timed_out")
_NEEDS_ACTION_SQL = "status IN ('failed', 'dead_letter', 'timed_out')"
# A booking whose appointment has started: never worth sending (the SQL reads the row's payload).
_STARTED_SQL = "kind = 'booking' AND CAST(payload->>'starts_at' AS timestamptz) <= now()"


@dataclass(frozen=True, slots=True)
class OutboxAdded:
    """The outbox row an idempotency key names: just added (`created`), or the one added before with
    that key (its `kind` and patient, for the caller to tell a repeat from a clash)."""

    outbox_id: int
    created: bool
    kind: str
    pms_patient_id: str


class OutboxMixin(StoreBase):
    """The outbox's rows and their states."""

    def oldest_waiting_writeback(self, practice_id: str) -> datetime | None:
        """When the practice's oldest booking or note still on its way to the PMS was written to the
        outbox (None when nothing waits)."""
        with self.begin(practice_id) as conn:
            oldest: datetime | None = conn.execute(
                text("SELECT min(created_at) FROM outbox WHERE practice_id = :p AND status IN ('pending', 'sent')"),
                {"p": practice_id},
            ).scalar_one()
            return oldest

    def writeback_health(self) -> dict[str, tuple[datetime | None, int]]:
        """Every practice with writebacks waiting or needing action: (oldest waiting to be sent, how
        many need action), in one read of the view `outbox_health` (a practice with neither is absent)."""
        with self.begin() as conn:
            rows = conn.execute(text("SELECT practice_id, oldest_waiting, needs_action FROM outbox_health"))
            return {r.practice_id: (r.oldest_waiting, int(r.needs_action)) for r in rows}

    # --- adding rows -------------------------------------------------------------------------------

    def add_booking_row(
        self,
        practice_id: str,
        key: str,
        pms_patient_id: str,
        payload: dict[str, Any],
        *,
        erased: Callable[[str], bool] | None = None,
    ) -> OutboxAdded:
        """Add a booking (once per key); when new, the patient's household is placed on the call list
        again in the same transaction (booked: off the list at once)."""

        def off_the_list(conn: Connection, outbox_id: int) -> None:
            patient_id = conn.execute(
                text(
                    "SELECT COALESCE(merged_into, patient_id) FROM patients WHERE practice_id = :p "
                    "AND pms_patient_id = :r"
                ),
                {"p": practice_id, "r": pms_patient_id},
            ).scalar_one_or_none()
            if patient_id is not None:
                call_events.refresh_patient(conn, practice_id, patient_id, datetime.now(UTC))

        return self._add_outbox_row(practice_id, "booking", key, pms_patient_id, payload, off_the_list, erased)

    def add_call_event_row(
        self,
        practice_id: str,
        kind: str,
        key: str,
        pms_patient_id: str,
        payload: dict[str, Any],
        *,
        outcome: CallOutcome,
        occurred_at: datetime,
        phone: str | None,
        actor: str,
        erased: Callable[[str], bool] | None = None,
    ) -> OutboxAdded:
        """Add a call attempt or outcome's note (once per key); when new, its effect on the call list
        (`call_events.record_event`) commits with it."""

        def apply(conn: Connection, outbox_id: int) -> None:
            call_events.record_event(
                conn,
                practice_id,
                kind=kind,
                pms_patient_id=pms_patient_id,
                outcome=outcome,
                occurred_at=occurred_at,
                phone=phone,
                outbox_id=outbox_id,
                actor=actor,
                now=datetime.now(UTC),
            )

        return self._add_outbox_row(practice_id, kind, key, pms_patient_id, payload, apply, erased)

    def _add_outbox_row(
        self,
        practice_id: str,
        kind: str,
        key: str,
        pms_patient_id: str,
        payload: dict[str, Any],
        on_insert: Callable[[Connection, int], None],
        erased: Callable[[str], bool] | None = None,
    ) -> OutboxAdded:
        """Add one outbox row (once per idempotency key); `on_insert(conn, outbox_id)` runs in the same
        transaction when the row is new, so its effect commits with it or not at all.

        Under the practice's lock on erasures (`lock_erasures`): an erasure under way commits first,
        one that starts waits for this row and deletes it. `erased(pms_patient_id)`, asked under the
        lock, refuses a patient erased already (`PatientErased`): nothing of theirs is recorded."""
        with self.begin(practice_id) as conn:
            lock_erasures(conn, practice_id, shared=True)
            if erased is not None and erased(pms_patient_id):
                raise PatientErased(
                    f"patient {pms_patient_id} of practice {practice_id} was erased (GDPR): nothing of theirs is "
                    "recorded or written to the PMS"
                )
            row = conn.execute(
                text(
                    "INSERT INTO outbox (practice_id, kind, idempotency_key, pms_patient_id, payload) "
                    "VALUES (:p, :k, :key, :pid, CAST(:payload AS jsonb)) "
                    "ON CONFLICT (practice_id, idempotency_key) DO NOTHING RETURNING outbox_id"
                ),
                {"p": practice_id, "k": kind, "key": key, "pid": pms_patient_id, "payload": json.dumps(payload)},
            ).scalar_one_or_none()
            if row is not None:
                on_insert(conn, row)
                conn.execute(text("NOTIFY nvc_outbox"))
                self.audit(conn, "outbox", practice_id, f"outbox_{kind}", [pms_patient_id], detail={"key": key})
                return OutboxAdded(row, True, kind, pms_patient_id)
            existing = conn.execute(
                text(
                    "SELECT outbox_id, kind, pms_patient_id FROM outbox WHERE practice_id = :p AND idempotency_key = :k"
                ),
                {"p": practice_id, "k": key},
            ).one()
        return OutboxAdded(existing.outbox_id, False, existing.kind, existing.pms_patient_id)

    # --- delivering --------------------------------------------------------------------------------

    def due_outbox_practices(self, now: datetime) -> dict[str, str]:
        """Practices with rows due at `now` (or bookings waiting whose appointment has started) -> the
        due rows' ids, retries and attempts, through the view `outbox_due_rows`."""
        with self.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT practice_id, "
                    "string_agg(outbox_id || '.' || retries || '.' || attempts, ',' ORDER BY outbox_id) AS fp "
                    "FROM outbox_due_rows WHERE next_attempt_at <= :now OR (status = 'pending' "
                    "AND kind = 'booking' AND starts_at <= :now) GROUP BY practice_id"
                ),
                {"now": now},
            ).all()
        return {r.practice_id: r.fp for r in rows}

    def outbox_dismissed_since(self, since: datetime | None) -> dict[str, datetime]:
        """Practices with rows dismissed after `since` -> the latest dismissal (view `outbox_states`)."""
        with self.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT practice_id, max(dismissed_at) AS latest FROM outbox_states WHERE dismissed_at IS NOT NULL "
                    "AND (CAST(:since AS timestamptz) IS NULL OR dismissed_at > :since) GROUP BY practice_id"
                ),
                {"since": since},
            ).all()
        return {r.practice_id: r.latest for r in rows}

    def time_out_started_bookings(self, practice_id: str) -> Sequence[Row[Any]]:
        """End as `timed_out` every booking not yet in the PMS whose appointment has started; rows another
        run is delivering right now (`sent`, lease not expired) are left to that run. Returns their ids
        and kinds."""
        with self.begin(practice_id) as conn:
            return conn.execute(
                text(
                    "UPDATE outbox SET status = 'timed_out', problem = 'appointment_started', "
                    "last_error = 'the appointment started before the booking reached the PMS'"
                    " || CASE WHEN status = 'sent' THEN '; an attempt may have reached it: check the diary' ELSE '' END"
                    " || COALESCE(' (last attempt: ' || last_error || ')', ''), "
                    "finished_at = now(), updated_at = now() "
                    "WHERE practice_id = :p AND (status = 'pending' OR (status = 'sent' AND next_attempt_at <= now())) "
                    f"AND {_STARTED_SQL} RETURNING outbox_id, kind"
                ),
                {"p": practice_id},
            ).all()

    def claim_outbox_rows(self, practice_id: str, limit: int) -> Sequence[Row[Any]]:
        """Claim up to `limit` due rows (status `sent`, attempts + 1, a two-minute lease) in their own
        committed transaction; rows another run holds are skipped, so no row is delivered twice at once."""
        with self.begin(practice_id) as conn:
            return conn.execute(
                text(
                    "UPDATE outbox o SET status = 'sent', attempts = o.attempts + 1, sent_at = now(), "
                    "updated_at = now(), next_attempt_at = now() + interval '2 minutes' "
                    "WHERE o.outbox_id IN (SELECT outbox_id FROM outbox WHERE practice_id = :p "
                    f"  AND status IN ('pending', 'sent') AND next_attempt_at <= now() AND NOT ({_STARTED_SQL}) "
                    "  ORDER BY outbox_id LIMIT :n FOR UPDATE SKIP LOCKED) "
                    "RETURNING o.*"
                ),
                {"p": practice_id, "n": limit},
            ).all()

    def finish_outbox_row(self, practice_id: str, outbox_id: int, status: str, **values: Any) -> None:
        """Set a claimed row's status and columns (`values`); a confirmed one is audited as written to
        the PMS, and a confirmed or needs-action one is finished."""
        sets = ", ".join(f"{k} = :{k}" for k in values)
        with self.begin(practice_id) as conn:
            if status == "confirmed":
                self.audit(conn, "writeback", practice_id, "write_to_pms", detail={"outbox_id": outbox_id})
            conn.execute(
                text(
                    f"UPDATE outbox SET status = :status, updated_at = now(){', ' + sets if sets else ''}"
                    + (", finished_at = now()" if status in ("confirmed", *NEEDS_ACTION) else "")
                    + " WHERE outbox_id = :id"
                ),
                {"status": status, "id": outbox_id, **values},
            )

    def fail_open_outbox_rows(self, practice_id: str, problem: str, reason: str) -> int:
        """End every pending or sent row of the practice as failed; returns how many."""
        with self.begin(practice_id) as conn:
            return conn.execute(
                text(
                    "UPDATE outbox SET status = 'failed', problem = :pr, last_error = :why, finished_at = now(), "
                    "updated_at = now() WHERE practice_id = :p AND status IN ('pending', 'sent')"
                ),
                {"p": practice_id, "pr": problem, "why": reason},
            ).rowcount

    # --- the worklist ------------------------------------------------------------------------------

    def claim_outbox_alerts(
        self, practice_id: str, alert: Callable[[Row[Any]], tuple[str, str, str, str]]
    ) -> tuple[list[Row[Any]], list[int]]:
        """Claim the rows that came to need action and have not been alerted (under a row lock, so two
        runs never alert twice), and record one keyed alert for each in the same transaction:
        `alert(row)` gives its (key, job name, message, severity). Returns the rows (by id) and the
        ids of the alerts recorded (a key seen before records none)."""
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(
                    "UPDATE outbox SET alerted_at = now() "
                    f"WHERE practice_id = :p AND {_NEEDS_ACTION_SQL} AND alerted_at IS NULL "
                    "RETURNING outbox_id, kind, idempotency_key, status, problem, attempts, retries"
                ),
                {"p": practice_id},
            ).all()
            rows = sorted(rows, key=lambda r: r.outbox_id)
            ids: list[int] = []
            for row in rows:
                alert_id = insert_keyed_alert(conn, practice_id, *alert(row))
                if alert_id is not None:
                    ids.append(alert_id)
        return rows, ids

    def outbox_row_practice(self, outbox_id: int) -> str | None:
        """The practice an outbox row belongs to (the view `outbox_states`)."""
        with self.begin() as conn:
            return conn.execute(
                text("SELECT practice_id FROM outbox_states WHERE outbox_id = :id"), {"id": outbox_id}
            ).scalar_one_or_none()

    def retry_outbox_row(
        self, practice_id: str, outbox_id: int, actor: str, check: Callable[[Row[Any]], None]
    ) -> Row[Any]:
        """Put a row back to `pending` (attempts from 0, alertable again), audited, once `check(row)`
        (the row locked, with its `starts_at` and its practice's status) has not raised."""
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text(
                    "SELECT o.*, CAST(o.payload->>'starts_at' AS timestamptz) AS starts_at, "
                    "p.status AS practice_status "
                    "FROM outbox o JOIN practices p USING (practice_id) WHERE o.outbox_id = :id FOR UPDATE OF o"
                ),
                {"id": outbox_id},
            ).one()
            check(row)
            conn.execute(
                text(
                    "UPDATE outbox SET status = 'pending', attempts = 0, retries = retries + 1, "
                    "next_attempt_at = now(), alerted_at = NULL, finished_at = NULL, updated_at = now() "
                    "WHERE outbox_id = :id"
                ),
                {"id": outbox_id},
            )
            conn.execute(text("NOTIFY nvc_outbox"))
            self.audit(
                conn,
                actor,
                practice_id,
                "outbox_retry",
                [row.pms_patient_id],
                detail={"outbox_id": outbox_id, "was": row.status, "problem": row.problem},
            )
        return row

    def dismiss_outbox_row(
        self, practice_id: str, outbox_id: int, why: str, actor: str, check: Callable[[Row[Any]], None]
    ) -> Row[Any]:
        """Take a row off the worklist for good with the reason, audited, once `check(row)` (the row
        locked) has not raised."""
        with self.begin(practice_id) as conn:
            row = conn.execute(text("SELECT * FROM outbox WHERE outbox_id = :id FOR UPDATE"), {"id": outbox_id}).one()
            check(row)
            conn.execute(
                text(
                    "UPDATE outbox SET status = 'dismissed', dismissed_at = now(), dismissed_by = :by, "
                    "dismissed_why = :why, updated_at = now() WHERE outbox_id = :id"
                ),
                {"id": outbox_id, "by": actor, "why": why},
            )
            self.audit(
                conn,
                actor,
                practice_id,
                "outbox_dismiss",
                [row.pms_patient_id],
                detail={"outbox_id": outbox_id, "was": row.status, "problem": row.problem, "why": why},
            )
        return row

    def outbox_rows(
        self, practice_id: str, status: str | None = None, *, needs_action: bool = False
    ) -> list[dict[str, Any]]:
        """The practice's outbox rows (one status, the worklist, or all), oldest first."""
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(
                    "SELECT outbox_id, kind, idempotency_key, pms_patient_id, status, attempts, retries, problem, "
                    "last_error, pms_record_id, created_at, finished_at, dismissed_at, dismissed_by, dismissed_why, "
                    "CAST(payload->>'starts_at' AS timestamptz) AS starts_at FROM outbox WHERE practice_id = :p "
                    "AND (CAST(:s AS text) IS NULL OR status = :s) "
                    f"AND (NOT :na OR {_NEEDS_ACTION_SQL}) ORDER BY outbox_id"
                ),
                {"p": practice_id, "s": status, "na": needs_action},
            ).mappings()
            return [dict(r) for r in rows]

    def outbox_needs_action_counts(self) -> Sequence[Row[Any]]:
        """Every practice's worklist by status: (practice_id, status, n, oldest finish, ids), through
        the view `outbox_states` (no patient data)."""
        with self.begin() as conn:
            return conn.execute(
                text(
                    "SELECT practice_id, status, count(*) AS n, min(finished_at) AS oldest, "
                    f"array_agg(outbox_id ORDER BY outbox_id) AS ids FROM outbox_states WHERE {_NEEDS_ACTION_SQL} "
                    "GROUP BY practice_id, status ORDER BY practice_id, status"
                )
            ).all()
