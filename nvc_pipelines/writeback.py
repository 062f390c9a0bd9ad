"""The outbox and its delivery into a PMS: exactly once, never lost, failures spelt out.

Rows move `pending -> sent -> confirmed`. A row is marked `sent` (and committed) before the PMS is
called, so a crash mid-call leaves evidence; every attempt goes through the client's
lookup-before-create, which finds a write whose response was lost. Transient failures go back to
`pending` with exponential backoff; after `MAX_ATTEMPTS` the row is `dead_letter`. A refusal that
retrying cannot fix (slot taken, patient gone, practice disconnected, invalid clinician) ends as
`failed` with its reason for ops to act on. A booking still not in the PMS when its appointment
starts ends as `timed_out` and is never sent again (a booking in the past helps nobody).

`failed`, `dead_letter` and `timed_out` rows are the worklist: each raises one alert when it gets
there, keeps the `no_writeback_needs_action` check red, and is in the daily digest until an
operator retries it (back to `pending`, attempts from 0: still exactly once, the client finds
before it creates) or dismisses it with a reason (`dismissed`). Both are audited.

A booking naming a clinician is vetted first (`vet`, see `nvc_pipelines.goc.vet_booking`): one
who is not GOC-registered, or may not carry out a sight test, fails before anything reaches the PMS.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import text

from nvc_pipelines import alerts
from nvc_pipelines.goc import ClinicianRefused
from nvc_pipelines.model import BookingRequest, CallOutcome, NoteKind, PatientNote
from nvc_pipelines.normalise import InvalidValue, normalise_phone, nvc_marker, parse_pms_datetime
from nvc_pipelines.retry import OUTBOX_MAX_ATTEMPTS, outbox_backoff, outbox_retries
from nvc_pipelines.store import calls

# The policy (which problems wait for a later attempt, and how long) is `nvc_pipelines.retry`'s.
MAX_ATTEMPTS = OUTBOX_MAX_ATTEMPTS


NEEDS_ACTION = ("failed", "dead_letter", "timed_out")
_NEEDS_ACTION_SQL = "status IN ('failed', 'dead_letter', 'timed_out')"
# A booking whose appointment has started: never worth sending (the SQL reads the row's payload).
_STARTED_SQL = "kind = 'booking' AND CAST(payload->>'starts_at' AS timestamptz) <= now()"


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
    timed_out: int = 0
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
    """Practices with outbox rows due now (or bookings waiting whose appointment has started, to be
    timed out) -> a fingerprint of those rows (ids, retries and attempt counts), which the sensor
    uses as its run key: the same due rows never launch two runs. (It spans practices, so it reads
    the view `outbox_due_rows`: row ids, counts and times, nothing about patients.)"""
    with store.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT practice_id, "
                "string_agg(outbox_id || '.' || retries || '.' || attempts, ',' ORDER BY outbox_id) AS fp "
                "FROM outbox_due_rows WHERE next_attempt_at <= :now OR (status = 'pending' "
                "AND kind = 'booking' AND starts_at <= :now) GROUP BY practice_id"
            ),
            {"now": now or datetime.now(UTC)},
        ).all()
    return {r.practice_id: r.fp for r in rows}


def dismissed_since(store: Any, since: datetime | None) -> dict[str, datetime]:
    """Practices with rows dismissed after `since` -> the latest dismissal: the sensor re-runs their
    writeback so the worklist check turns green without waiting for the next booking. (It spans
    practices: the view `outbox_states`, ids, states and times only.)"""
    with store.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT practice_id, max(dismissed_at) AS latest FROM outbox_states WHERE dismissed_at IS NOT NULL "
                "AND (CAST(:since AS timestamptz) IS NULL OR dismissed_at > :since) GROUP BY practice_id"
            ),
            {"since": since},
        ).all()
    return {r.practice_id: r.latest for r in rows}


def _time_out(store: Any, practice_id: str) -> list[Any]:
    """End as `timed_out` every booking not yet in the PMS whose appointment has started. Rows another
    run is delivering right now (`sent`, lease not expired) are left to that run."""
    with store.begin(practice_id) as conn:
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


def _claim(store: Any, practice_id: str, limit: int) -> list[Any]:
    """Claim due rows (status `sent`, attempts + 1) in their own committed transaction; rows another
    run is working on are skipped, so two runs never deliver the same row at once."""
    with store.begin(practice_id) as conn:
        return conn.execute(
            text(
                "UPDATE outbox o SET status = 'sent', attempts = o.attempts + 1, sent_at = now(), updated_at = now(), "
                "next_attempt_at = now() + interval '2 minutes' "
                "WHERE o.outbox_id IN (SELECT outbox_id FROM outbox WHERE practice_id = :p "
                f"  AND status IN ('pending', 'sent') AND next_attempt_at <= now() AND NOT ({_STARTED_SQL}) "
                "  ORDER BY outbox_id LIMIT :n FOR UPDATE SKIP LOCKED) "
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
                + (", finished_at = now()" if status in ("confirmed", *NEEDS_ACTION) else "")
                + " WHERE outbox_id = :id"
            ),
            {"status": status, "id": outbox_id, **values},
        )


def fail_all(store: Any, practice_id: str, problem: str, reason: str) -> int:
    """End every open row of a practice as failed (e.g. the practice was disconnected), and alert."""
    with store.begin(practice_id) as conn:
        failed = conn.execute(
            text(
                "UPDATE outbox SET status = 'failed', problem = :pr, last_error = :why, finished_at = now(), "
                "updated_at = now() WHERE practice_id = :p AND status IN ('pending', 'sent')"
            ),
            {"p": practice_id, "pr": problem, "why": reason},
        ).rowcount
    alert_needs_action(store, practice_id)
    return failed


def deliver(
    store: Any,
    practice_id: str,
    writer: Writer,
    *,
    error_types: tuple[type[BaseException], ...],
    limit: int = 500,
    max_attempts: int = MAX_ATTEMPTS,
    log: Callable[[str], None] | None = None,
    vet: Callable[[BookingRequest], BookingRequest] | None = None,
) -> DeliveryReport:
    """Write every due outbox row of the practice into its PMS once; time out bookings whose
    appointment has started; alert once for each row that now needs action. `vet(booking)` runs
    before a booking is sent: the booking as the PMS should get it (its clinician as the PMS names
    them), or `ClinicianRefused` (with its `problem`) when it may not be sent."""
    report = DeliveryReport()
    for row in _time_out(store, practice_id):
        report.timed_out += 1
        report.failures.append(
            {"outbox_id": row.outbox_id, "kind": row.kind, "status": "timed_out", "problem": "appointment_started"}
        )
        if log:
            log(f"outbox {row.outbox_id} ({row.kind}): timed out, its appointment has started")
    _deliver_due(store, practice_id, writer, report, error_types, limit, max_attempts, log, vet)
    alert_needs_action(store, practice_id)  # also catches up on any a crashed run left unalerted
    return report


def _deliver_due(
    store: Any,
    practice_id: str,
    writer: Writer,
    report: DeliveryReport,
    error_types: tuple[type[BaseException], ...],
    limit: int,
    max_attempts: int,
    log: Callable[[str], None] | None,
    vet: Callable[[BookingRequest], BookingRequest] | None = None,
) -> None:
    for row in _claim(store, practice_id, limit):
        payload = row.payload
        try:
            if row.kind == "booking":
                booking = BookingRequest(
                    row.idempotency_key,
                    row.pms_patient_id,
                    datetime.fromisoformat(payload["starts_at"]),
                    datetime.fromisoformat(payload["ends_at"]),
                    payload.get("appointment_type") or "eye_test",
                    payload.get("clinician_ref"),
                    payload.get("notes"),
                )
                if vet is not None:
                    booking = vet(booking)  # before the PMS: a clinician who may not take it fails it here
                result = writer.create_appointment(booking)
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
        except (ClinicianRefused, *error_types) as exc:
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


# --- the worklist: rows that need action, their alerts, retry and dismiss ---------------------------


def _describe(row: Any) -> str:
    """One line about a row that needs action, free of patient data (it goes to chat and email)."""
    what = f"{row.kind.replace('_', ' ')} {row.outbox_id} ({row.idempotency_key})"
    if row.status == "timed_out":
        return f"{what} timed out: its appointment started before it reached the PMS"
    ended = "dead-lettered" if row.status == "dead_letter" else "failed"
    return f"{what} {ended}: {row.problem or 'unknown problem'} after {row.attempts} attempt(s)"


def _act_hint(practice_id: str) -> str:
    return (
        f"Worklist: `nvc outbox {practice_id} --needs-action`; after a fix `nvc outbox retry ID`, "
        "or `nvc outbox dismiss ID --why TEXT`."
    )


def alert_needs_action(store: Any, practice_id: str) -> list[str]:
    """Raise one alert for each row that came to need action since the last call (a booking's is
    critical: a patient expects an appointment the practice does not have), through the alert
    channels; returns the alert lines. Claimed under a row lock, so two runs never alert twice."""
    with store.begin(practice_id) as conn:
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
            alert_id = alerts.record_keyed(
                conn,
                practice_id,
                f"outbox:{row.outbox_id}:{row.retries}",
                "booking_writeback",
                f"{_describe(row)}; see `nvc outbox {practice_id} --needs-action`",
                "critical" if row.kind == "booking" else "warning",
            )
            if alert_id is not None:
                ids.append(alert_id)
    if not ids:
        return []
    severity = "CRITICAL" if any(r.kind == "booking" for r in rows) else "WARNING"
    headline = f"[{severity}] {len(rows)} writeback(s) need action for practice {practice_id}"
    lines = [_describe(r) for r in rows]
    delivered = alerts.deliver(headline, "\n".join([headline, *lines, _act_hint(practice_id)]))
    alerts.mark_delivered(store, practice_id, ids, delivered)
    return lines


def _row_for_action(store: Any, outbox_id: int) -> str:
    """The practice an outbox row belongs to (the operator gives only the id; the view `outbox_states`)."""
    with store.begin() as conn:
        practice_id = conn.execute(
            text("SELECT practice_id FROM outbox_states WHERE outbox_id = :id"), {"id": outbox_id}
        ).scalar_one_or_none()
    if practice_id is None:
        raise OutboxError(f"no outbox row {outbox_id} (see `nvc outbox PRACTICE_ID --needs-action`)")
    return practice_id


def retry(store: Any, outbox_id: int, actor: str) -> dict[str, Any]:
    """Put a failed or dead-lettered row back to `pending` (attempts from 0), after someone fixed the
    cause. Exactly once still holds: the client looks the write up in the PMS before creating it."""
    practice_id = _row_for_action(store, outbox_id)
    with store.begin(practice_id) as conn:
        row = conn.execute(
            text(
                "SELECT o.*, CAST(o.payload->>'starts_at' AS timestamptz) AS starts_at, p.status AS practice_status "
                "FROM outbox o JOIN practices p USING (practice_id) WHERE o.outbox_id = :id FOR UPDATE OF o"
            ),
            {"id": outbox_id},
        ).one()
        if row.status == "timed_out" or (
            row.status in NEEDS_ACTION and row.starts_at is not None and row.starts_at <= datetime.now(UTC)
        ):
            raise OutboxError(
                f"outbox {outbox_id} is not retried: its appointment start ({row.starts_at:%Y-%m-%d %H:%M} UTC) has "
                f"passed; book a new slot, then `nvc outbox dismiss {outbox_id} --why ...`"
            )
        if row.status not in ("failed", "dead_letter"):
            raise OutboxError(f"outbox {outbox_id} is {row.status}; only failed or dead-lettered rows can be retried")
        if row.practice_status != "connected":
            raise OutboxError(
                f"practice {practice_id} is {row.practice_status}; reconnect it before retrying outbox {outbox_id}"
            )
        conn.execute(
            text(
                "UPDATE outbox SET status = 'pending', attempts = 0, retries = retries + 1, next_attempt_at = now(), "
                "alerted_at = NULL, finished_at = NULL, updated_at = now() WHERE outbox_id = :id"
            ),
            {"id": outbox_id},
        )
        conn.execute(text("NOTIFY nvc_outbox"))
        store.audit(
            conn,
            actor,
            practice_id,
            "outbox_retry",
            [row.pms_patient_id],
            detail={"outbox_id": outbox_id, "was": row.status, "problem": row.problem},
        )
    return {"outbox_id": outbox_id, "practice_id": practice_id, "kind": row.kind, "key": row.idempotency_key}


def dismiss(store: Any, outbox_id: int, why: str, actor: str) -> dict[str, Any]:
    """Take a row off the worklist for good (booked by hand, patient called back...), with the reason."""
    why = (why or "").strip()
    if not why:
        raise OutboxError("say why the writeback is dismissed (--why TEXT); the reason is audited")
    practice_id = _row_for_action(store, outbox_id)
    with store.begin(practice_id) as conn:
        row = conn.execute(text("SELECT * FROM outbox WHERE outbox_id = :id FOR UPDATE"), {"id": outbox_id}).one()
        if row.status not in NEEDS_ACTION:
            raise OutboxError(
                f"outbox {outbox_id} is {row.status}; only failed, dead-lettered or timed-out rows can be dismissed"
            )
        conn.execute(
            text(
                "UPDATE outbox SET status = 'dismissed', dismissed_at = now(), dismissed_by = :by, "
                "dismissed_why = :why, updated_at = now() WHERE outbox_id = :id"
            ),
            {"id": outbox_id, "by": actor, "why": why},
        )
        store.audit(
            conn,
            actor,
            practice_id,
            "outbox_dismiss",
            [row.pms_patient_id],
            detail={"outbox_id": outbox_id, "was": row.status, "problem": row.problem, "why": why},
        )
    return {"outbox_id": outbox_id, "practice_id": practice_id, "kind": row.kind, "key": row.idempotency_key}


def outbox_rows(
    store: Any, practice_id: str, status: str | None = None, *, needs_action: bool = False
) -> list[dict[str, Any]]:
    """The practice's outbox rows (one status, the worklist, or all), oldest first."""
    with store.begin(practice_id) as conn:
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


def waiting(store: Any) -> dict[str, dict[str, Any]]:
    """Every practice's worklist in counts: practice -> {counts by status, ids, oldest}. (It spans
    practices: the view `outbox_states`, no patient data.)"""
    with store.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT practice_id, status, count(*) AS n, min(finished_at) AS oldest, "
                f"array_agg(outbox_id ORDER BY outbox_id) AS ids FROM outbox_states WHERE {_NEEDS_ACTION_SQL} "
                "GROUP BY practice_id, status ORDER BY practice_id, status"
            )
        ).all()
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = out.setdefault(r.practice_id, {"counts": {}, "ids": [], "oldest": r.oldest})
        entry["counts"][r.status] = r.n
        entry["ids"] = sorted([*entry["ids"], *r.ids])
        if r.oldest is not None and (entry["oldest"] is None or r.oldest < entry["oldest"]):
            entry["oldest"] = r.oldest
    return out


def send_digest(store: Any, day: date) -> dict[str, Any]:
    """The day's digest of what still waits, one message through the alert channels (and one alert
    row per practice). Sent once per day: a re-run of the same day records and sends nothing."""
    pending = waiting(store)
    recorded: dict[str, int] = {}
    lines: list[str] = []
    for practice_id, entry in pending.items():
        counts = ", ".join(f"{n} {status}" for status, n in sorted(entry["counts"].items()))
        total = sum(entry["counts"].values())
        since = f", oldest since {entry['oldest']:%Y-%m-%d %H:%M} UTC" if entry["oldest"] else ""
        shown = ", ".join(str(i) for i in entry["ids"][:20]) + (" ..." if len(entry["ids"]) > 20 else "")
        line = f"{practice_id}: {total} waiting ({counts}){since}; outbox {shown}"
        with store.begin(practice_id) as conn:
            alert_id = alerts.record_keyed(
                conn, practice_id, f"digest:{day.isoformat()}:{practice_id}", "writeback_digest", line, "warning"
            )
        if alert_id is not None:
            recorded[practice_id] = alert_id
            lines.append(line)
    if not lines:
        return {"practices": 0, "waiting": 0, "delivered_to": []}
    waiting_total = sum(sum(pending[p]["counts"].values()) for p in recorded)
    headline = f"[WARNING] Writeback digest {day.isoformat()}: {waiting_total} booking(s)/note(s) still need action"
    hint = (
        "Per practice: `nvc outbox PRACTICE --needs-action`; after a fix `nvc outbox retry ID`, "
        "or `nvc outbox dismiss ID --why TEXT`."
    )
    delivered = alerts.deliver(headline, "\n".join([headline, *lines, hint]))
    for practice_id, alert_id in recorded.items():
        alerts.mark_delivered(store, practice_id, [alert_id], delivered)
    return {"practices": len(recorded), "waiting": waiting_total, "delivered_to": delivered, "lines": lines}
