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

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from nvc_pipelines import alerts
from nvc_pipelines.erasure import load_suppressions
from nvc_pipelines.goc import ClinicianRefused
from nvc_pipelines.model import BookingRequest, CallOutcome, NoteKind, PatientNote
from nvc_pipelines.normalise import InvalidValue, normalise_phone, nvc_marker, parse_pms_datetime
from nvc_pipelines.retry import OUTBOX_MAX_ATTEMPTS, outbox_backoff, outbox_retries
from nvc_pipelines.store.erasure import PatientErased
from nvc_pipelines.store.outbox import NEEDS_ACTION as NEEDS_ACTION  # the worklist's statuses, named here too
from nvc_pipelines.store.outbox import OutboxAdded

if TYPE_CHECKING:
    from nvc_pipelines.store import Store

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
    store: Store,
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
    store.get_practice(practice_id)
    try:
        added = store.add_booking_row(
            practice_id, idempotency_key, pms_patient_id, payload, erased=_erased(store, practice_id)
        )
    except PatientErased as exc:
        raise OutboxError(str(exc)) from None
    return _accepted(idempotency_key, "booking", pms_patient_id, added)


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
    store: Store,
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
    store.get_practice(practice_id)
    try:
        added = store.add_call_event_row(
            practice_id,
            str(kind),
            idempotency_key,
            pms_patient_id,
            payload,
            outcome=result,
            occurred_at=when,
            phone=dialled,
            actor=actor,
            erased=_erased(store, practice_id),
        )
    except PatientErased as exc:
        raise OutboxError(str(exc)) from None
    return _accepted(idempotency_key, str(kind), pms_patient_id, added)


def _erased(store: Store, practice_id: str) -> Callable[[str], bool]:
    """Whether a PMS id is erased, looked up when asked (the store asks under its lock on erasures)."""
    return lambda pms_patient_id: load_suppressions(store, practice_id).erased_id(pms_patient_id)


def _accepted(key: str, kind: str, pms_patient_id: str, added: OutboxAdded) -> tuple[int, bool]:
    """(outbox id, created) for a row just added or added before with the same key; a key used
    before for something else is refused."""
    if not added.created and (added.kind, added.pms_patient_id) != (kind, pms_patient_id):
        raise OutboxError(f"idempotency key {key!r} was already used for a different {added.kind}")
    return added.outbox_id, added.created


def due_practices(store: Store, now: datetime | None = None) -> dict[str, str]:
    """Practices with outbox rows due now (or bookings waiting whose appointment has started, to be
    timed out) -> a fingerprint of those rows (ids, retries and attempt counts), which the sensor
    uses as its run key: the same due rows never launch two runs. (It spans practices, so it reads
    the view `outbox_due_rows`: row ids, counts and times, nothing about patients.)"""
    return store.due_outbox_practices(now or datetime.now(UTC))


def dismissed_since(store: Store, since: datetime | None) -> dict[str, datetime]:
    """Practices with rows dismissed after `since` -> the latest dismissal: the sensor re-runs their
    writeback so the worklist check turns green without waiting for the next booking. (It spans
    practices: the view `outbox_states`, ids, states and times only.)"""
    return store.outbox_dismissed_since(since)


def _time_out(store: Store, practice_id: str) -> list[Any]:
    """End as `timed_out` every booking not yet in the PMS whose appointment has started. Rows another
    run is delivering right now (`sent`, lease not expired) are left to that run."""
    return list(store.time_out_started_bookings(practice_id))


def _claim(store: Store, practice_id: str, limit: int) -> list[Any]:
    """Claim due rows (status `sent`, attempts + 1) in their own committed transaction; rows another
    run is working on are skipped, so two runs never deliver the same row at once."""
    return list(store.claim_outbox_rows(practice_id, limit))


def _finish(store: Store, practice_id: str, outbox_id: int, status: str, **values: Any) -> None:
    store.finish_outbox_row(practice_id, outbox_id, status, **values)


def fail_all(store: Store, practice_id: str, problem: str, reason: str) -> int:
    """End every open row of a practice as failed (e.g. the practice was disconnected), and alert."""
    failed = store.fail_open_outbox_rows(practice_id, problem, reason)
    alert_needs_action(store, practice_id)
    return failed


def deliver(
    store: Store,
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
    store: Store,
    practice_id: str,
    writer: Writer,
    report: DeliveryReport,
    error_types: tuple[type[BaseException], ...],
    limit: int,
    max_attempts: int,
    log: Callable[[str], None] | None,
    vet: Callable[[BookingRequest], BookingRequest] | None = None,
) -> None:
    caught: tuple[type[BaseException], ...] = (ClinicianRefused, *error_types)
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
        except caught as exc:
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


def alert_needs_action(store: Store, practice_id: str) -> list[str]:
    """Raise one alert for each row that came to need action since the last call (a booking's is
    critical: a patient expects an appointment the practice does not have), through the alert
    channels; returns the alert lines. Claimed under a row lock, so two runs never alert twice."""

    def alert(row: Any) -> tuple[str, str, str, str]:
        return (
            f"outbox:{row.outbox_id}:{row.retries}",
            "booking_writeback",
            f"{_describe(row)}; see `nvc outbox {practice_id} --needs-action`",
            "critical" if row.kind == "booking" else "warning",
        )

    rows, ids = store.claim_outbox_alerts(practice_id, alert)
    if not ids:
        return []
    severity = "CRITICAL" if any(r.kind == "booking" for r in rows) else "WARNING"
    headline = f"[{severity}] {len(rows)} writeback(s) need action for practice {practice_id}"
    lines = [_describe(r) for r in rows]
    delivered = alerts.deliver(headline, "\n".join([headline, *lines, _act_hint(practice_id)]))
    alerts.mark_delivered(store, practice_id, ids, delivered)
    return lines


def _row_for_action(store: Store, outbox_id: int) -> str:
    """The practice an outbox row belongs to (the operator gives only the id; the view `outbox_states`)."""
    practice_id = store.outbox_row_practice(outbox_id)
    if practice_id is None:
        raise OutboxError(f"no outbox row {outbox_id} (see `nvc outbox PRACTICE_ID --needs-action`)")
    return practice_id


def retry(store: Store, outbox_id: int, actor: str) -> dict[str, Any]:
    """Put a failed or dead-lettered row back to `pending` (attempts from 0), after someone fixed the
    cause. Exactly once still holds: the client looks the write up in the PMS before creating it."""
    practice_id = _row_for_action(store, outbox_id)

    def retryable(row: Any) -> None:
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

    row = store.retry_outbox_row(practice_id, outbox_id, actor, retryable)
    return {"outbox_id": outbox_id, "practice_id": practice_id, "kind": row.kind, "key": row.idempotency_key}


def dismiss(store: Store, outbox_id: int, why: str, actor: str) -> dict[str, Any]:
    """Take a row off the worklist for good (booked by hand, patient called back...), with the reason."""
    why = (why or "").strip()
    if not why:
        raise OutboxError("say why the writeback is dismissed (--why TEXT); the reason is audited")
    practice_id = _row_for_action(store, outbox_id)

    def dismissable(row: Any) -> None:
        if row.status not in NEEDS_ACTION:
            raise OutboxError(
                f"outbox {outbox_id} is {row.status}; only failed, dead-lettered or timed-out rows can be dismissed"
            )

    row = store.dismiss_outbox_row(practice_id, outbox_id, why, actor, dismissable)
    return {"outbox_id": outbox_id, "practice_id": practice_id, "kind": row.kind, "key": row.idempotency_key}


def outbox_rows(
    store: Store, practice_id: str, status: str | None = None, *, needs_action: bool = False
) -> list[dict[str, Any]]:
    """The practice's outbox rows (one status, the worklist, or all), oldest first."""
    return store.outbox_rows(practice_id, status, needs_action=needs_action)


def waiting(store: Store) -> dict[str, dict[str, Any]]:
    """Every practice's worklist in counts: practice -> {counts by status, ids, oldest}. (It spans
    practices: the view `outbox_states`, no patient data.)"""
    rows = store.outbox_needs_action_counts()
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = out.setdefault(r.practice_id, {"counts": {}, "ids": [], "oldest": r.oldest})
        entry["counts"][r.status] = r.n
        entry["ids"] = sorted([*entry["ids"], *r.ids])
        if r.oldest is not None and (entry["oldest"] is None or r.oldest < entry["oldest"]):
            entry["oldest"] = r.oldest
    return out


def send_digest(store: Store, day: date) -> dict[str, Any]:
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
        alert_id = store.record_keyed_alert(
            practice_id, f"digest:{day.isoformat()}:{practice_id}", "writeback_digest", line, "warning"
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
