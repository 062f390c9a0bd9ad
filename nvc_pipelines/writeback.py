"""The outbox and its delivery into a PMS: exactly once, never lost, failures spelt out.

Rows move `pending -> sent -> confirmed`. A row is marked `sent` (and committed) before the PMS is
called, so a crash mid-call leaves evidence; every attempt goes through the client's
lookup-before-create, which finds a write whose response was lost. Transient failures go back to
`pending` with exponential backoff; after `MAX_ATTEMPTS` the row is `dead_letter`. A refusal that
retrying cannot fix (slot taken, patient gone, practice disconnected, invalid clinician) ends as
`failed` with its reason for ops to act on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import text

from nvc_pipelines.model import BookingRequest, CallOutcome, NoteKind, PatientNote
from nvc_pipelines.normalise import InvalidValue, normalise_phone, nvc_marker, parse_pms_datetime
from nvc_pipelines.retry import OUTBOX_MAX_ATTEMPTS, outbox_backoff, outbox_retries
from nvc_pipelines.store import calls

# The policy (which problems wait for a later attempt, and how long) is `nvc_pipelines.retry`'s.
MAX_ATTEMPTS = OUTBOX_MAX_ATTEMPTS


class OutboxError(ValueError):
    """An outbox entry that cannot be accepted (the message says why)."""


class Writer(Protocol):
    def create_appointment(self, booking: BookingRequest) -> Any: ...

    def add_note(self, note: PatientNote) -> Any: ...


@dataclass(slots=True)
class DeliveryReport:
    confirmed: int = 0
    already_there: int = 0
    retry_later: int = 0
    failed: int = 0
    dead_lettered: int = 0
    latencies_seconds: list[float] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


def _payload_booking(
    starts_at: datetime, minutes: int, appointment_type: str, clinician_ref: str | None, notes: str | None
) -> dict[str, Any]:
    if minutes < 5 or minutes > 240:
        raise OutboxError(f"appointment length {minutes} minutes is not plausible (5-240)")
    if starts_at.tzinfo is None:
        raise OutboxError("booking start must carry a time zone")
    return {
        "starts_at": starts_at.astimezone(UTC).isoformat(),
        "ends_at": (starts_at + timedelta(minutes=minutes)).astimezone(UTC).isoformat(),
        "appointment_type": appointment_type,
        "clinician_ref": clinician_ref,
        "notes": notes,
    }


def add_booking(
    store: Any,
    practice_id: str,
    idempotency_key: str,
    pms_patient_id: str,
    starts_at: datetime | str,
    minutes: int = 30,
    appointment_type: str = "eye_test",
    clinician_ref: str | None = None,
    notes: str | None = None,
) -> tuple[int, bool]:
    """Record a booking made on a call; returns (outbox id, created). The same key twice is one booking."""
    try:
        nvc_marker(idempotency_key)
        start = starts_at if isinstance(starts_at, datetime) else parse_pms_datetime(starts_at, "start")
    except InvalidValue as exc:
        raise OutboxError(str(exc)) from None
    payload = _payload_booking(start, minutes, appointment_type, clinician_ref, notes)

    def off_the_list(conn: Any, outbox_id: int) -> None:  # booked: the household is placed again at once
        patient_id = conn.execute(
            text(
                "SELECT COALESCE(merged_into, patient_id) FROM patients WHERE practice_id = :p AND pms_patient_id = :r"
            ),
            {"p": practice_id, "r": pms_patient_id},
        ).scalar_one_or_none()
        if patient_id is not None:
            calls.refresh_patient(conn, practice_id, patient_id, datetime.now(UTC))

    return _insert(store, practice_id, "booking", idempotency_key, pms_patient_id, payload, off_the_list)


OUTCOMES = tuple(str(o) for o in CallOutcome)
# What the practice's staff read in the PMS note beside the call's own words.
_STAFF_NOTE = {
    CallOutcome.ASKED_NOT_TO_BE_CALLED: "The patient asked not to be phoned about recalls; NVC will not call them "
    "again unless the practice asks it to.",
    CallOutcome.DECEASED: "Reported as deceased on this call. Please check and update the patient's record; NVC will "
    "not call them again.",
}


def call_outcome(value: str | None) -> CallOutcome:
    """One of the calling system's outcomes, or a clear refusal naming them all."""
    try:
        return CallOutcome(str(value or "").strip())
    except ValueError:
        raise OutboxError(f"call outcome {value!r} is not known; use one of: {', '.join(OUTCOMES)}") from None


def add_call_event(
    store: Any,
    practice_id: str,
    kind: str,
    idempotency_key: str,
    pms_patient_id: str,
    text_: str,
    outcome: str | None = None,
    occurred_at: datetime | None = None,
    phone: str | None = None,
    actor: str = "calling-system",
) -> tuple[int, bool]:
    """Record a call attempt or outcome: a note for the PMS (through the outbox) and its effect on
    the call list (suppressed, number set aside, attempt counted, snoozed), in one transaction."""
    if kind not in (NoteKind.CALL_ATTEMPT, NoteKind.CALL_OUTCOME):
        raise OutboxError(f"unknown call event kind {kind!r}")
    result = call_outcome(outcome)
    try:
        nvc_marker(idempotency_key)
        dialled = normalise_phone(phone).e164 if phone else None
    except InvalidValue as exc:
        raise OutboxError(str(exc)) from None
    if not text_.strip():
        raise OutboxError("a call note needs some text")
    when = occurred_at or datetime.now(UTC)
    if when.tzinfo is None:
        raise OutboxError("the call's time must carry a time zone")
    note = text_.strip() + (f" {_STAFF_NOTE[result]}" if result in _STAFF_NOTE else "")
    payload = {"text": note, "outcome": str(result), "occurred_at": when.isoformat(), "phone": dialled}

    def apply(conn: Any, outbox_id: int) -> None:
        calls.record_event(
            conn,
            practice_id,
            kind=str(kind),
            pms_patient_id=pms_patient_id,
            outcome=result,
            occurred_at=when,
            phone=dialled,
            outbox_id=outbox_id,
            actor=actor,
            now=datetime.now(UTC),
        )

    return _insert(store, practice_id, str(kind), idempotency_key, pms_patient_id, payload, apply)


def _insert(
    store: Any,
    practice_id: str,
    kind: str,
    key: str,
    pms_patient_id: str,
    payload: dict[str, Any],
    on_insert: Callable[[Any, int], None] | None = None,
):
    """Add one outbox row (once per idempotency key); `on_insert(conn, outbox_id)` runs in the same
    transaction when the row is new, so its effect commits with it or not at all."""
    store.get_practice(practice_id)
    with store.begin(practice_id) as conn:
        row = conn.execute(
            text(
                "INSERT INTO outbox (practice_id, kind, idempotency_key, pms_patient_id, payload) "
                "VALUES (:p, :k, :key, :pid, CAST(:payload AS jsonb)) "
                "ON CONFLICT (practice_id, idempotency_key) DO NOTHING RETURNING outbox_id"
            ),
            {"p": practice_id, "k": kind, "key": key, "pid": pms_patient_id, "payload": json.dumps(payload)},
        ).scalar_one_or_none()
        if row is not None:
            if on_insert is not None:
                on_insert(conn, row)
            conn.execute(text("NOTIFY nvc_outbox"))
            store.audit(conn, "outbox", practice_id, f"outbox_{kind}", [pms_patient_id], detail={"key": key})
            return row, True
        existing = conn.execute(
            text("SELECT outbox_id, kind, pms_patient_id FROM outbox WHERE practice_id = :p AND idempotency_key = :k"),
            {"p": practice_id, "k": key},
        ).one()
    if (existing.kind, existing.pms_patient_id) != (kind, pms_patient_id):
        raise OutboxError(f"idempotency key {key!r} was already used for a different {existing.kind}")
    return existing.outbox_id, False


def due_practices(store: Any, now: datetime | None = None) -> dict[str, str]:
    """Practices with outbox rows due now -> a fingerprint of those rows (ids and attempt counts),
    which the sensor uses as its run key: the same due rows never launch two runs. (It spans
    practices, so it reads the view `outbox_due_rows`: row ids and attempt counts, nothing else.)"""
    with store.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT practice_id, string_agg(outbox_id || '.' || attempts, ',' ORDER BY outbox_id) AS fp "
                "FROM outbox_due_rows WHERE next_attempt_at <= :now GROUP BY practice_id"
            ),
            {"now": now or datetime.now(UTC)},
        ).all()
    return {r.practice_id: r.fp for r in rows}


def _claim(store: Any, practice_id: str, limit: int) -> list[Any]:
    """Claim due rows (status `sent`, attempts + 1) in their own committed transaction; rows another
    run is working on are skipped, so two runs never deliver the same row at once."""
    with store.begin(practice_id) as conn:
        return conn.execute(
            text(
                "UPDATE outbox o SET status = 'sent', attempts = o.attempts + 1, sent_at = now(), updated_at = now(), "
                "next_attempt_at = now() + interval '2 minutes' "
                "WHERE o.outbox_id IN (SELECT outbox_id FROM outbox WHERE practice_id = :p "
                "  AND status IN ('pending', 'sent') AND next_attempt_at <= now() ORDER BY outbox_id "
                "  LIMIT :n FOR UPDATE SKIP LOCKED) "
                "RETURNING o.*"
            ),
            {"p": practice_id, "n": limit},
        ).all()


def _finish(store: Any, practice_id: str, outbox_id: int, status: str, **values: Any) -> None:
    sets = ", ".join(f"{k} = :{k}" for k in values)
    with store.begin(practice_id) as conn:
        if status == "confirmed":
            store.audit(conn, "writeback", practice_id, "write_to_pms", detail={"outbox_id": outbox_id})
        conn.execute(
            text(
                f"UPDATE outbox SET status = :status, updated_at = now(){', ' + sets if sets else ''}"
                + (", finished_at = now()" if status in ("confirmed", "failed", "dead_letter") else "")
                + " WHERE outbox_id = :id"
            ),
            {"status": status, "id": outbox_id, **values},
        )


def fail_all(store: Any, practice_id: str, problem: str, reason: str) -> int:
    """End every open row of a practice as failed (e.g. the practice was disconnected)."""
    with store.begin(practice_id) as conn:
        return conn.execute(
            text(
                "UPDATE outbox SET status = 'failed', problem = :pr, last_error = :why, finished_at = now(), "
                "updated_at = now() WHERE practice_id = :p AND status IN ('pending', 'sent')"
            ),
            {"p": practice_id, "pr": problem, "why": reason},
        ).rowcount


def deliver(
    store: Any,
    practice_id: str,
    writer: Writer,
    *,
    error_types: tuple[type[BaseException], ...],
    limit: int = 500,
    max_attempts: int = MAX_ATTEMPTS,
    log: Callable[[str], None] | None = None,
) -> DeliveryReport:
    """Write every due outbox row of the practice into its PMS once."""
    report = DeliveryReport()
    for row in _claim(store, practice_id, limit):
        payload = row.payload
        try:
            if row.kind == "booking":
                result = writer.create_appointment(
                    BookingRequest(
                        row.idempotency_key,
                        row.pms_patient_id,
                        datetime.fromisoformat(payload["starts_at"]),
                        datetime.fromisoformat(payload["ends_at"]),
                        payload.get("appointment_type") or "eye_test",
                        payload.get("clinician_ref"),
                        payload.get("notes"),
                    )
                )
                record_id, created = result.pms_appointment_id, result.created
            else:
                result = writer.add_note(
                    PatientNote(
                        row.idempotency_key,
                        row.pms_patient_id,
                        NoteKind(row.kind),
                        datetime.fromisoformat(payload["occurred_at"]),
                        payload["text"],
                        payload.get("outcome"),
                    )
                )
                record_id, created = result.pms_note_id, result.created
        except error_types as exc:
            problem = getattr(exc, "problem", "pms_error")
            if outbox_retries(problem) and row.attempts < max_attempts:
                _finish(
                    store,
                    practice_id,
                    row.outbox_id,
                    "pending",
                    problem=problem,
                    last_error=str(exc),
                    next_attempt_at=datetime.now(UTC) + outbox_backoff(row.attempts),
                )
                report.retry_later += 1
            else:
                status = "dead_letter" if outbox_retries(problem) else "failed"
                _finish(store, practice_id, row.outbox_id, status, problem=problem, last_error=str(exc))
                if status == "dead_letter":
                    report.dead_lettered += 1
                else:
                    report.failed += 1
                report.failures.append(
                    {"outbox_id": row.outbox_id, "kind": row.kind, "status": status, "problem": problem}
                )
            if log:
                log(f"outbox {row.outbox_id} ({row.kind}) attempt {row.attempts}: {problem}")
            continue
        _finish(
            store, practice_id, row.outbox_id, "confirmed", pms_record_id=str(record_id), problem=None, last_error=None
        )
        report.confirmed += 1
        if not created:
            report.already_there += 1
        report.latencies_seconds.append((datetime.now(UTC) - row.created_at).total_seconds())
    return report


def outbox_rows(store: Any, practice_id: str, status: str | None = None) -> list[dict[str, Any]]:
    with store.begin(practice_id) as conn:
        rows = conn.execute(
            text(
                "SELECT outbox_id, kind, idempotency_key, pms_patient_id, status, attempts, problem, last_error, "
                "pms_record_id, created_at, finished_at FROM outbox WHERE practice_id = :p "
                "AND (CAST(:s AS text) IS NULL OR status = :s) ORDER BY outbox_id"
            ),
            {"p": practice_id, "s": status},
        ).mappings()
        return [dict(r) for r in rows]
