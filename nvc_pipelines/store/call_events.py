"""What changes the call list between builds: a call's outcome recorded with its effect (a
suppression, a number set aside, an attempt counted), a household placed again at once after a
booking or an intraday read, and an operator lifting a suppression. Runs inside the caller's
practice-scoped transaction, as `calls` does, so an outcome and the list it changes commit together.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.calling import SUPPRESSING, UK_TZ
from nvc_pipelines.model import CallOutcome
from nvc_pipelines.store.calls import household, kept_ids, practice_call_settings, rebuild


def record_event(
    conn: Connection,
    practice_id: str,
    *,
    kind: str,
    pms_patient_id: str,
    outcome: CallOutcome,
    occurred_at: datetime,
    phone: str | None,
    outbox_id: int | None,
    actor: str,
    now: datetime,
) -> dict[str, Any]:
    """Record what a call came to and apply its effect on the list in this same transaction:
    suppress (asked not to be called, deceased), set the number aside (wrong number), count the
    attempt or snooze; then place the patient's household again."""
    patient = conn.execute(
        text(
            "SELECT pt.patient_id, COALESCE(pt.merged_into, pt.patient_id) AS kept_id, pt.phones, "
            "(SELECT r.due_date FROM recalls r WHERE r.patient_id = COALESCE(pt.merged_into, pt.patient_id)) AS due, "
            "(SELECT c.phone FROM call_list c WHERE c.patient_id = COALESCE(pt.merged_into, pt.patient_id) "
            " AND c.listed) AS listed_phone "
            "FROM patients pt WHERE pt.practice_id = :p AND pt.pms_patient_id = :ref"
        ),
        {"p": practice_id, "ref": pms_patient_id},
    ).one_or_none()
    dialled: str | None = phone or (
        (patient.listed_phone or (patient.phones[0] if patient.phones else None)) if patient is not None else None
    )
    event_id = conn.execute(
        text(
            "INSERT INTO call_events (practice_id, pms_patient_id, kind, outcome, phone, recall_due_date, occurred_at, "
            "outbox_id, actor) VALUES (:p, :ref, :kind, :outcome, :phone, :due, :at, :outbox, :actor) RETURNING event_id"
        ),
        {
            "p": practice_id,
            "ref": pms_patient_id,
            "kind": kind,
            "outcome": str(outcome),
            "phone": dialled,
            "due": patient.due if patient else None,
            "at": occurred_at,
            "outbox": outbox_id,
            "actor": actor,
        },
    ).scalar_one()
    if outcome in SUPPRESSING:
        conn.execute(
            text(
                "INSERT INTO contact_suppressions (practice_id, pms_patient_id, reason, event_id) "
                "VALUES (:p, :ref, :reason, :event) "
                "ON CONFLICT (practice_id, pms_patient_id, reason) WHERE lifted_at IS NULL DO NOTHING"
            ),
            {"p": practice_id, "ref": pms_patient_id, "reason": str(outcome), "event": event_id},
        )
    if patient is None:
        return {"event_id": event_id, "phone": dialled, "placed": None}
    return {
        "event_id": event_id,
        "phone": dialled,
        "placed": refresh_patient(conn, practice_id, patient.kept_id, now, dialled),
    }


def refresh_patient(
    conn: Connection, practice_id: str, patient_id: int, now: datetime, extra_phone: str | None = None
) -> dict[str, Any]:
    """Place one patient's household again (whoever is listed on any of their numbers, and on `extra_phone`)."""
    return _refresh_ids(conn, practice_id, {patient_id}, now, {extra_phone} if extra_phone else set())


def refresh_refs(conn: Connection, practice_id: str, refs: Collection[str], now: datetime) -> dict[str, Any] | None:
    """Place again the households of the patients with these PMS ids (read just now from the PMS):
    a booking, a death or an opt-out the practice recorded today takes them off the list at once."""
    if not refs:
        return None
    ids = kept_ids(conn, practice_id, refs)
    return _refresh_ids(conn, practice_id, ids, now, set()) if ids else None


def _refresh_ids(
    conn: Connection, practice_id: str, ids: set[int], now: datetime, extra_phones: set[str]
) -> dict[str, Any]:
    """Place these (kept) patients again, with whoever is listed on any of their numbers or of records merged
    into them: their households' entries are rebuilt whole."""
    scope = household(conn, practice_id, ids)
    scope.phones |= extra_phones
    settings = practice_call_settings(conn, practice_id)
    today = now.astimezone(UK_TZ).date()
    return rebuild(conn, practice_id, today=today, now=now, settings=settings, scope=scope)


def lift(conn: Connection, practice_id: str, pms_patient_id: str, actor: str, why: str) -> list[str]:
    """Lift a patient's open suppressions (theirs and those of records merged into them); returns
    the reasons lifted."""
    rows = conn.execute(
        text(
            "UPDATE contact_suppressions s SET lifted_at = now(), lifted_by = :actor, lift_reason = :why "
            "WHERE s.practice_id = :p AND s.lifted_at IS NULL AND s.pms_patient_id IN ("
            " SELECT pt.pms_patient_id FROM patients pt WHERE pt.practice_id = :p AND (pt.pms_patient_id = :ref"
            " OR pt.merged_into = (SELECT patient_id FROM patients WHERE practice_id = :p AND pms_patient_id = :ref)))"
            " RETURNING s.reason"
        ),
        {"p": practice_id, "ref": pms_patient_id, "actor": actor, "why": why},
    ).scalars()
    return sorted(set(rows))
