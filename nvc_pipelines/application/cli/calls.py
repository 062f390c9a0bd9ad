"""Calling: the call list and recalls, who may be called, and what the AI calling system records
(bookings, call attempts and outcomes)."""

from __future__ import annotations

import json

import click

from nvc_pipelines.application.cli.base import _Group, _iso, _table, _when, main
from nvc_pipelines.model import CallOutcome


@main.command("call-list")
@click.argument("practice_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--why", "why_patient", default=None, metavar="PATIENT", help="Explain one patient (PMS id).")
@click.option(
    "--check",
    "check_phone",
    default=None,
    metavar="PHONE",
    help="Just before dialling: re-read the PMS if the list is older than a few minutes, then answer call or skip.",
)
def call_list_cmd(practice_id: str, fmt: str, why_patient: str | None, check_phone: str | None) -> None:
    """Who the AI caller phones: one entry per number, whom to ask for, when; and every due patient
    not listed with the reason (as of the last sync or call outcome)."""
    from nvc_pipelines.application.app import actor, open_store

    if check_phone is not None:
        from nvc_pipelines.application.app import check_number

        answer = check_number(practice_id, check_phone)
        if fmt == "json":
            click.echo(json.dumps({
                "answer": answer.answer, "reason": answer.reason, "phone": answer.phone, "people": list(answer.people),
                "refreshed_at": _iso(answer.refreshed_at), "stale": answer.stale}))  # fmt: skip
        else:
            click.echo(f"{answer.answer}: {answer.phone}: {answer.reason}")
        return
    store = open_store()
    if why_patient is not None:
        found = store.call_list_why(practice_id, why_patient, actor=actor())
        if fmt == "json":
            click.echo(json.dumps({k: _iso(v) for k, v in found.items()}, indent=2, ensure_ascii=False))
            return
        name = f"{found['first_name']} {found['last_name']} ({found['pms_patient_id']})"
        if found["listed"]:
            also = f", in the same call as {', '.join(found['same_call'])}" if found["same_call"] else ""
            click.echo(
                f"{name} is on the call list: {found['phone']}, ask for {found['ask_for']}, "
                f"from {_when(found['earliest_call_at'])}{also}. Due {found['due_date']}: {found['recall_reason']}."
            )
        else:
            click.echo(f"{name} is not on the call list: {found['reason_code']}. {found['detail']}.")
        return
    view = store.call_list_view(practice_id, actor=actor())
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "entries": [
                        {
                            **e,
                            "earliest_call_at": _iso(e["earliest_call_at"]),
                            "people": [{k: _iso(v) for k, v in p.items()} for p in e["people"]],
                        }
                        for e in view["entries"]
                    ],
                    "not_listed": [{k: _iso(v) for k, v in n.items()} for n in view["not_listed"]],
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    entries, not_listed = view["entries"], view["not_listed"]
    people = sum(len(e["people"]) for e in entries)
    click.echo(
        f"{len(entries)} number(s) to call for {people} due patient(s); {len(not_listed)} due patient(s) not listed"
    )
    rows: list[tuple[str, ...]] = []
    for e in entries:
        for i, p in enumerate(e["people"]):
            first = i == 0
            rows.append(
                (
                    e["phone"] if first else "",
                    e["ask_for"] if first else "",
                    f"{p['first_name']} {p['last_name']} ({p['pms_patient_id']})",
                    str(p["due_date"]),
                    p["reason"],
                    _when(e["earliest_call_at"]) if first else "",
                )
            )
    if rows:
        _table(("PHONE", "ASK FOR", "PEOPLE", "DUE", "REASON", "EARLIEST CALL"), rows)
    if not_listed:
        click.echo("")
        click.echo("Not listed:")
        _table(
            ("PATIENT", "DUE", "REASON", "DETAIL"),
            [
                (
                    f"{n['first_name']} {n['last_name']} ({n['pms_patient_id']})",
                    str(n["due_date"]),
                    n["reason_code"],
                    n["detail"],
                )
                for n in not_listed
            ],
        )


@main.command("recalls")
@click.argument("practice_id")
@click.option(
    "--warnings",
    "warnings_only",
    is_flag=True,
    help="Patients whose PMS recall date is later than the guideline's, for the practice to review.",
)
def recalls_cmd(practice_id: str, warnings_only: bool) -> None:
    """The practice's recalls by rule; `--warnings` lists PMS dates later than the 2002 guideline's."""
    from datetime import date

    from nvc_pipelines.application.app import open_store

    store = open_store()
    if not warnings_only:
        store.get_practice(practice_id)
        summary = store.recall_summary(practice_id, date.today())
        click.echo(
            f"{summary['total']} recall(s) for {summary['active_patients']} active patient(s): "
            f"{summary['due_now']} due now, {summary['due_30_days']} in the next 30 days; {summary['from_pms']} "
            f"from the PMS, {summary['computed']} computed; {summary['pms_later_than_guideline']} PMS date(s) "
            "later than the guideline (--warnings lists them)"
        )
        _table(("RULE", "PATIENTS"), [(rule, str(n)) for rule, n in summary["by_rule"].items()])
        return
    rows = store.recall_warnings(practice_id)
    click.echo(f"{len(rows)} patient(s) recalled later in the PMS than the guideline")
    if rows:
        _table(
            ("PATIENT", "PMS DATE", "GUIDELINE", "FLAGS"),
            [
                (
                    f"{r['first_name']} {r['last_name']} ({r['pms_patient_id']})",
                    str(r["pms_due_date"]),
                    str(r["guideline_due_date"]),
                    ", ".join(r["flags"]) or "-",
                )
                for r in rows
            ],
        )


@main.group(cls=_Group)
def contact() -> None:
    """Who may be called: lift a patient's request not to be called."""


@contact.command("allow")
@click.argument("practice_id")
@click.argument("patient_id")
@click.option("--why", default="lifted by an operator", show_default=True, help="Recorded in the audit log.")
def contact_allow(practice_id: str, patient_id: str, why: str) -> None:
    """Let a patient who asked not to be called (or was reported deceased on a call) be called again."""
    from nvc_pipelines.application.app import actor, open_store

    lifted = open_store().lift_contact_suppression(practice_id, patient_id, actor(), why)
    click.echo(f"Lifted {', '.join(lifted)} for {patient_id}; the call list was updated (audited)")


def _key(key: str | None, prefix: str) -> str:
    import uuid

    return key or f"{prefix}-{uuid.uuid4().hex[:16]}"


@main.group(cls=_Group)
def booking() -> None:
    """Bookings made on AI calls, written into the PMS by the writeback sensor."""


@booking.command("add")
@click.argument("practice_id")
@click.option("--patient", "patient_id", required=True, help="The patient's PMS id.")
@click.option("--start", required=True, help="Start, ISO 8601 (e.g. 2026-12-01T09:30:00+00:00; no offset = UK time).")
@click.option("--minutes", default=30, show_default=True)
@click.option("--type", "appointment_type", default="eye_test", show_default=True)
@click.option("--clinician", default=None, help="Clinician reference (Optisoft: GOC number).")
@click.option("--notes", default=None)
@click.option("--key", default=None, help="Idempotency key (default: a new one). The same key is one booking.")
def booking_add(practice_id, patient_id, start, minutes, appointment_type, clinician, notes, key) -> None:
    """Record a booking as the AI calling system does; it reaches the PMS within seconds."""
    from nvc_pipelines import writeback
    from nvc_pipelines.application.app import open_store

    key = _key(key, "bk")
    outbox_id, created = writeback.add_booking(
        open_store(), practice_id, key, patient_id, start, minutes, appointment_type, clinician, notes
    )
    click.echo(f"{'Queued' if created else 'Already queued'} booking {key} (outbox {outbox_id})")


def _call_event(
    kind: str, practice_id: str, patient_id: str, outcome: str, text: str, key: str | None, phone: str | None
) -> None:
    from nvc_pipelines import writeback
    from nvc_pipelines.application.app import actor, open_store

    key = _key(key, "call")
    outbox_id, created = writeback.add_call_event(
        open_store(), practice_id, kind, key, patient_id, text, outcome, phone=phone, actor=actor()
    )
    what = kind.replace("_", " ")
    if created:
        click.echo(
            f"Recorded {what} {key} ({outcome}); the call list reflects it now; note queued (outbox {outbox_id})"
        )
    else:
        click.echo(f"Already recorded {what} {key} (outbox {outbox_id})")


_OUTCOME = click.Choice([str(o) for o in CallOutcome])
_PHONE_HELP = "The number dialled (default: the patient's number on the call list)."


@main.group("call-attempt", cls=_Group)
def call_attempt() -> None:
    """Call attempts, as the AI calling system records them: logged in the PMS, counted on the list."""


@call_attempt.command("add")
@click.argument("practice_id")
@click.option("--patient", "patient_id", required=True)
@click.option("--outcome", type=_OUTCOME, default="no_answer", show_default=True)
@click.option("--text", "text_", default="NVC recall call attempt", show_default=True)
@click.option("--phone", default=None, help=_PHONE_HELP)
@click.option("--key", default=None)
def call_attempt_add(practice_id, patient_id, outcome, text_, phone, key) -> None:
    """Record a call attempt; its outcome changes the call list at once."""
    _call_event("call_attempt", practice_id, patient_id, outcome, text_, key, phone)


@main.group("call-outcome", cls=_Group)
def call_outcome() -> None:
    """Call outcomes, as the AI calling system records them: a note in the PMS, and the list changes."""


@call_outcome.command("add")
@click.argument("practice_id")
@click.option("--patient", "patient_id", required=True)
@click.option("--outcome", type=_OUTCOME, required=True)
@click.option("--text", "text_", required=True)
@click.option("--phone", default=None, help=_PHONE_HELP)
@click.option("--key", default=None)
def call_outcome_add(practice_id, patient_id, outcome, text_, phone, key) -> None:
    """Record what a call came to; its effect on the call list applies at once (see docs/calling.md)."""
    _call_event("call_outcome", practice_id, patient_id, outcome, text_, key, phone)
