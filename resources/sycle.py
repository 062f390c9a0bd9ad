"""Sycle, the cloud PMS: a practice is one clinic of a Sycle account, read and written over Sycle's vendor API.

Settings per practice: `account_url` (the account's own https:// address, e.g.
`https://brightsight.sycle.net`), `location_id` (the integration guide's "Location ID": a Sycle
clinic id such as `2803-9506`; each clinic of a multi-clinic account is its own NVC practice),
optional `referral_source` / `referral_subcategory` (what bookings are recorded as coming from;
default the clinic's source named like "Recall") and an optional one-time field mapping,
`field_map.<target>=<sycle field key>`, saying which Sycle field holds what (Sycle accounts keep the
last eye exam in a custom field, and which one differs per account). Secrets: `api_username` and
`api_password`, the vendor API login Sycle issues for the account (the guide's "API token" is this
pair: NVC exchanges it for a token on every connection, and again when the token expires).

**What follows public material** (a public integration that books through Sycle): every call is a
GET of `{account_url}/api/vendor/{endpoint}/` with a JSON body (sent as
`application/x-www-form-urlencoded`, as that integration does) carrying the token, never a header;
`token` (user name and password -> token), `clinics` and `clinics/{clinic_id}` (the clinic, its
appointment types and referral sources), `open_slots` (free times per staff member) and
`appointment` (a booking at a start time, of an appointment type, naming the patient by first and
last name, phone and email, not by id). A booking is made only at a time `open_slots` offers.

**What is modelled** (no public description; the same style: under `/api/vendor/`, token in the
body, account-prefixed string ids): the error envelope `{"errors": [{"code", "detail"}]}`, the
answer of `appointment` (its `appt_id` is used when present, else the booking is looked up), the
optional `notes` on a booking (NVC's marker), and the reads: `patient_fields`, `patients` (paged by
`page`/`per_page` in the body, `meta.total_pages`), `patients/{id}`, `clinical_alerts`,
`recall_recommendations`, `appointments`, `staff` (with GOC numbers) and `communications` /
`communication` (call notes).

Reads: patients page by page, with the clinical alerts joined on as risk flags and the open eye exam
recall recommendation as the PMS recall date. Sycle's words for reaching a patient become NVC's
(`sycle_contact`): `status` (`active`, `inactive`, `deceased`, `moved`; a word NVC does not know
rejects the row, naming it), the opt-out boxes `do_not_call`/`do_not_text`/`do_not_email` (a
channel is allowed unless ticked), `recall_opt_out` and `responsible_party` (`Self` means no
guardian); the date of death comes from the custom field `field_map.date_of_death` names.
Writes: appointments and call communications, each created exactly once (`write_exactly_once`).
Sycle has no idempotency key and its booking call names no patient id, so a booking is looked for
before it is made and after any lost answer by the patient and the start time (and by NVC's marker
in its notes, where the account keeps them). Every error becomes a `PmsError` with a stable
`problem` and what to check; the password and the token travel only in request bodies and never
appear in a message or log.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from nvc_pipelines.model import (
    Appointment,
    BookingRequest,
    BookingResult,
    ClinicalRecord,
    Clinician,
    NoteKind,
    NoteResult,
    PatientNote,
    PmsKind,
    Practice,
    ReadResult,
    RecordBatch,
)
from nvc_pipelines.normalise import (
    UK_TZ,
    AppointmentDraft,
    ClinicalDraft,
    InvalidValue,
    PatientDraft,
    build_appointment,
    build_clinical,
    collect,
    collect_records,
    find_nvc_reference,
    map_risk_categories,
    nvc_marker,
    parse_pms_datetime,
    parse_uk_date,
    parse_yes_no,
)
from resources.base import WRITES, ErrorRule, PmsClientBase, Secret
from resources.http import FailureWords, HttpPmsResource, HttpStatusError
from resources.protocol import ConnectionInfo, PmsConnectionFailed

log = logging.getLogger(__name__)

PMS_NAME = "Sycle"
API_PREFIX = "/api/vendor"
# Sycle's booking and slot times: clinic local time (UK), to the second.
SYCLE_TIME = "%Y-%m-%d %H:%M:%S"
FORM_JSON = {"Content-Type": "application/x-www-form-urlencoded"}

# --- field mapping -----------------------------------------------------------------------------------

FIELD_MAP_PREFIX = "field_map."
# What NVC reads from a patient through the mapping, and the kind of value it expects there.
FIELD_MAP_TARGETS: dict[str, str] = {
    "last_eye_test": "date",
    "recall_due": "date",
    "mobile": "phone",
    "phone": "phone",
    "email": "email",
    "date_of_death": "date",
}
# Sycle's standard fields for the targets every account has; the rest are suggested from labels.
DEFAULT_FIELD_MAP: dict[str, str] = {"mobile": "cell_phone", "phone": "phone", "email": "email"}
# Sycle field types a target may read (custom fields typed as text often hold dates typed by hand).
_COMPATIBLE_TYPES: dict[str, frozenset[str]] = {
    "date": frozenset({"date", "text", ""}),
    "phone": frozenset({"phone", "text", ""}),
    "email": frozenset({"email", "text", ""}),
}
_UNMAPPED = frozenset({"", "none", "-"})

# How `suggest_field_mapping` recognises a label: it must contain a word from every `need` group
# and none of `avoid`; `want` words and the right type score.
_SUGGEST: dict[str, dict[str, Any]] = {
    "last_eye_test": {
        "need": [{"exam", "examination", "test", "sight", "eye"}],
        "want": {"last", "latest", "recent", "eye", "sight", "exam", "examination", "test"},
        "avoid": {
            "previous",
            "prior",
            "next",
            "due",
            "recall",
            "cl",
            "contact",
            "lens",
            "lenses",
            "hearing",
            "birth",
            "updated",
            "booked",
            "appointment",
        },
    },  # fmt: skip
    "recall_due": {
        "need": [{"recall", "due"}],
        "want": {"recall", "due", "next", "eye", "exam", "date"},
        "avoid": {"last", "previous", "prior", "birth", "cl", "contact", "lens", "hearing", "updated"},
    },
    "mobile": {
        "need": [{"mobile", "cell", "cellphone", "mob"}],
        "want": {"mobile", "cell", "phone", "number"},
        "avoid": {"work", "office", "emergency", "fax", "alt", "alternative", "second"},
    },
    "phone": {
        "need": [{"phone", "telephone", "tel", "landline"}],
        "want": {"home", "phone", "landline", "telephone"},
        "avoid": {"mobile", "cell", "cellphone", "work", "office", "emergency", "fax", "alt", "alternative"},
    },
    "email": {
        "need": [{"email", "mail"}],
        "want": {"email", "e", "mail", "address"},
        "avoid": {"work", "office", "alt", "alternative"},
    },
    "date_of_death": {
        "need": [{"death", "deceased", "died", "dod"}],
        "want": {"date", "death", "deceased", "died"},
        "avoid": {"birth", "updated", "recall", "exam", "test", "appointment"},
    },
}


def _words(label: str) -> set[str]:
    return set(re.sub(r"[^a-z0-9]+", " ", label.lower()).split())


def suggest_field_mapping(fields: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Propose `target -> Sycle field key` from the labels of a location's fields (`GET .../fields`).

    Used once, when a practice connects: "Last Eye Exam" (not "Previous Eye Exam" or "Recall
    Due") is the last eye test, "Cell Phone" the mobile. Targets with no convincing label are left
    out; one field is never proposed for two targets.
    """
    candidates = [f for f in fields if isinstance(f, dict) and f.get("key")]
    proposal: dict[str, str] = {}
    taken: set[str] = set()
    for target, rule in _SUGGEST.items():
        best: tuple[int, int, str] | None = None
        for order, field in enumerate(candidates):
            key = str(field["key"])
            words = _words(str(field.get("label") or "")) | _words(key.replace("_", " "))
            kind = str(field.get("type") or "").lower()
            if key in taken or words & rule["avoid"] or not all(words & group for group in rule["need"]):
                continue
            if kind not in _COMPATIBLE_TYPES[FIELD_MAP_TARGETS[target]]:
                continue
            score = len(words & rule["want"]) + (2 if kind == FIELD_MAP_TARGETS[target] else 0)
            if best is None or (score, -order) > (best[0], best[1]):
                best = (score, -order, key)
        if best is not None:
            proposal[target] = best[2]
            taken.add(best[2])
    return proposal


def field_map_from_settings(settings: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The practice's explicit `field_map.*` settings (`""`/`none` = do not read), and unknown keys."""
    explicit: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in settings.items():
        if not key.startswith(FIELD_MAP_PREFIX):
            continue
        target = key[len(FIELD_MAP_PREFIX) :]
        if target not in FIELD_MAP_TARGETS:
            unknown.append(key)
            continue
        field = (value or "").strip()
        explicit[target] = "" if field.lower() in _UNMAPPED else field
    return explicit, unknown


def field_value(row: dict[str, Any], key: str) -> str | None:
    """A patient's value for a Sycle field key: standard fields at the top, `custom_*` in `custom_fields`."""
    custom = row.get("custom_fields")
    if key in row and key != "custom_fields" and not isinstance(row[key], dict | list):
        value = row[key]
    elif isinstance(custom, dict):
        value = custom.get(key)
    else:
        value = None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# --- Sycle vocabulary --------------------------------------------------------------------------------

# Alert labels Sycle practices use -> the recall rules' flags; other text goes through
# `map_risk_categories` and is kept raw when it is not a risk we know.
ALERT_FLAGS: dict[str, str] = {
    "diabetic": "diabetic",
    "diabetes": "diabetic",
    "glaucoma": "glaucoma",
    "glaucoma suspect": "glaucoma_suspect",
    "oht": "ocular_hypertension",
    "ocular hypertension": "ocular_hypertension",
    "family hx glaucoma": "glaucoma_family_history",
    "fhx glaucoma": "glaucoma_family_history",
    "fh glaucoma": "glaucoma_family_history",
    "family history glaucoma": "glaucoma_family_history",
}
# Sycle patient statuses (lower-cased) -> canonical `PatientStatus` values. Any other word is
# passed on as it is and rejects the row by name.
PATIENT_STATUSES: dict[str, str] = {
    "active": "active",
    "inactive": "inactive",
    "deceased": "deceased",
    "moved": "gone_away",
}
# `responsible_party` values that name no guardian: the patient answers for themselves.
NO_GUARDIAN = frozenset({"self", "patient", "same as patient", "none", "n/a", "na", "-"})
APPOINTMENT_TYPES_IN: dict[str, str] = {
    "eye exam": "eye_test",
    "eye test": "eye_test",
    "sight test": "eye_test",
    "contact lens check": "contact_lens",
    "contact lens fitting": "contact_lens",
    "follow up": "follow_up",
    "collection": "collection",
    "dispense": "collection",
}
APPOINTMENT_TYPES_OUT: dict[str, str] = {
    "eye_test": "Eye Exam",
    "contact_lens": "Contact Lens Check",
    "follow_up": "Follow Up",
    "collection": "Collection",
}
APPOINTMENT_STATUSES: dict[str, str] = {
    "scheduled": "booked",
    "confirmed": "booked",
    "arrived": "booked",
    "in_progress": "booked",
    "completed": "completed",
    "checked_out": "completed",
    "cancelled": "cancelled",
    "canceled": "cancelled",
    "no_show": "no_show",
}
# NVC call outcomes -> Sycle's call outcomes.
CALL_OUTCOMES: dict[str, str] = {
    "booked": "connected",
    "declined": "connected",
    "callback": "connected",
    "no_answer": "no_answer",
    "voicemail": "left_voicemail",
    "busy": "busy",
    "wrong_number": "wrong_number",
}

CHECK_LOGIN = (
    "the api_username and api_password: the vendor API login Sycle issued for the account (Sycle support sends "
    "it when vendor API access is enabled); a typo or an old password is the usual cause; store the pair again "
    "with `nvc practice connect PRACTICE_ID --pms sycle --update` (asked for, never on the command line)"
)
CHECK_API = "the account has Sycle's vendor API access; the practice enables it with Sycle support"
CHECK_LOCATION = "the location_id setting: the Location ID (clinic id, e.g. 2803-9506) Sycle gives for the clinic"
CHECK_URL = (
    "the account_url setting (the https:// address the practice signs in to Sycle with, e.g. "
    "https://brightsight.sycle.net), and that this server can reach it (firewall, proxy, network)"
)
CHECK_BOOKING = (
    "the booking's time (it must be an open slot of the clinic), appointment type and referral source; the "
    "clinic's types and sources are listed by `nvc practice connect` (Sycle > Settings > Appointment Types)"
)
WORDS = FailureWords(
    pms=PMS_NAME,
    throttler="Sycle",
    answerer="Sycle",
    place="",
    heavy_user="the same vendor API login",
    url_setting="account_url",
    check_url=CHECK_URL,
    check_server_error="Sycle's status page",
    tls_owner="the Sycle server's",
)
# Sycle's answers beyond the ones every HTTP PMS shares (`{account}`: the account's host, `{loc}`: the clinic).
ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule("invalid_credentials", "Sycle refused the vendor API login{said}.", CHECK_LOGIN, status=401),
    ErrorRule(
        "api_access_disabled",
        "vendor API access is not enabled for the Sycle account {account}{said}.",
        CHECK_API,
        status=403,
        code="api_disabled",
    ),
    ErrorRule("forbidden", "Sycle refused access to clinic {loc}{said}.", CHECK_LOGIN, status=403),
    ErrorRule(
        "location_not_found",
        "the Sycle account {account} has no clinic {loc}{said}.",
        CHECK_LOCATION,
        status=404,
        code="clinic_not_found",
    ),
    ErrorRule(
        "patient_not_found",
        "Sycle has no patient with that id at clinic {loc}{said}.",
        "whether the patient was merged or removed in Sycle; re-sync the practice",
        status=404,
        code="patient_not_found",
        connection=False,
    ),
    ErrorRule("pms_error", "{base_url} answered HTTP 404 for Sycle's vendor API{said}.", CHECK_URL, status=404),
    ErrorRule(
        "slot_taken",
        "the time is no longer an open slot in the Sycle diary{said}.",
        "offer the patient another time; the diary changed since the call list was made",
        status=409,
        on=WRITES,
        connection=False,
    ),
    ErrorRule(
        "invalid_booking",
        "Sycle refused the booking{said}.",
        CHECK_BOOKING,
        status=(400, 422),
        on="booking",
        connection=False,
    ),
    ErrorRule(
        "invalid_note",
        "Sycle refused the record as invalid{said}.",
        "the note's text, outcome and time",
        status=(400, 422),
        on="note",
        connection=False,
    ),
)
# Codes of a token that no longer works: NVC logs in again once and repeats the call.
TOKEN_GONE = frozenset({"token_expired", "token_invalid"})

# Joining alerts and recalls per patient: up to this many patients, look them up by id; beyond, read all.
JOIN_BY_ID_LIMIT = 1000
IDS_PER_REQUEST = 100
MAX_PAGES = 100_000


def alert_flags(label: Any) -> list[str]:
    """An alert's label as flags: known ones canonical, anything else kept raw."""
    text = " ".join(str(label or "").split())
    if not text:
        return []
    key = re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()
    if key in ALERT_FLAGS:
        return [ALERT_FLAGS[key]]
    flags, unknown = map_risk_categories(text)
    return flags + unknown if flags else [text]


def _is_eye_recall(recall_type: Any) -> bool:
    words = _words(str(recall_type or ""))
    if words & {"contact", "cl", "lens", "lenses", "hearing", "aftercare", "dispense", "collection"}:
        return False
    return bool(words & {"eye", "exam", "examination", "sight", "test", "routine", "diabetic", "annual"})


def recall_due(recalls: Iterable[dict[str, Any]]) -> str | None:
    """The earliest open eye exam recall's due date (ISO), or None."""
    due: list[date] = []
    for recall in recalls:
        if str(recall.get("status") or "").lower() != "open" or not _is_eye_recall(recall.get("recall_type")):
            continue
        try:
            day = parse_uk_date(recall.get("due_date"), "due_date")
        except InvalidValue:
            continue
        if day:
            due.append(day)
    return min(due).isoformat() if due else None


def _parse_timestamp(raw: Any) -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _since_param(since: datetime) -> str:
    """`since` as Sycle wants it: ISO 8601 with an offset (a naive datetime is taken as UTC)."""
    value = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    return value.isoformat()


def _ticked(value: Any) -> bool:
    """A Sycle opt-out box: true/false (a yes/no string is read too); absent or blank is unticked,
    anything else reads as ticked (the safe way: an opt-out is never lost)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    try:
        return parse_yes_no(value, "")
    except InvalidValue:
        return True


def sycle_contact(row: dict[str, Any], date_of_death: str | None) -> dict[str, Any]:
    """Sycle's status, opt-out boxes and responsible party as the `PatientDraft` contact fields.

    `date_of_death` is the mapped custom field's value as typed. With `status` deceased it is the
    date of death (an unreadable one is dropped, the death is not); otherwise it is read like a
    spreadsheet's `deceased` cell (a date, or yes/no), so a date there means deceased whatever
    `status` says. A status NVC does not know is passed on as Sycle wrote it, so `build_patient` rejects the row
    naming it rather than guessing. Sycle records refusals, not consent: each channel is allowed
    unless its Do Not box is ticked. A responsible party of `Self` (or the patient's own name) is
    no guardian.
    """
    raw = str(row.get("status") or "").strip()
    status = PATIENT_STATUSES.get(" ".join(raw.lower().replace("_", " ").split()), raw) if raw else None
    no_call = _ticked(row.get("do_not_call"))
    refused = {"phone": no_call, "sms": _ticked(row.get("do_not_text")), "email": _ticked(row.get("do_not_email"))}
    guardian = " ".join(str(row.get("responsible_party") or "").split())
    name = " ".join(f"{row.get('first_name') or ''} {row.get('last_name') or ''}".split())
    titled = " ".join(f"{row.get('title') or ''} {name}".split())
    if guardian.lower() in NO_GUARDIAN or guardian.lower() in (name.lower(), titled.lower()):
        guardian = ""  # "Self", or the patient named as their own responsible party
    died = status == "deceased"
    return {
        "status": status,
        "status_date": date_of_death if died else None,
        "deceased": None if died else date_of_death,
        "phone_recall": not no_call,
        "no_recall": _ticked(row.get("recall_opt_out")),
        "channels": [channel for channel, no in refused.items() if not no],
        "guardian_name": guardian or None,
    }


def sycle_draft(
    row: dict[str, Any], field_map: dict[str, str], alerts: list[dict[str, Any]], recalls: list[dict[str, Any]]
) -> PatientDraft:
    """Translate one Sycle patient (with its alerts and recalls) into the shared draft."""

    def mapped(target: str) -> str | None:
        key = field_map.get(target)
        return field_value(row, key) if key else None

    flags: list[str] = []
    for alert in alerts:
        if alert.get("active") is False:
            continue
        for flag in alert_flags(alert.get("alert")):
            if flag not in flags:
                flags.append(flag)
    parts = (row.get("address_1"), row.get("address_2"), row.get("city"), row.get("postcode"))
    return PatientDraft(
        pms_patient_id=str(row.get("patient_id") or "") or None,
        first_name=row.get("first_name"),
        last_name=row.get("last_name"),
        phones=[mapped("mobile"), mapped("phone")],
        date_of_birth=row.get("birth_date"),
        email=mapped("email"),
        address=", ".join(str(p).strip() for p in parts if p and str(p).strip()) or None,
        last_eye_test_date=mapped("last_eye_test"),
        risk_flags=flags,
        clinical_notes=row.get("notes"),
        recall_due_date=recall_due(recalls) or mapped("recall_due"),
        updated_at=_parse_timestamp(row.get("updated_at")),
        **sycle_contact(row, mapped("date_of_death")),
    )


def appointment_draft(row: dict[str, Any]) -> AppointmentDraft:
    kind = str(row.get("appt_type") or "").strip()
    status = str(row.get("status") or "").strip().lower()
    notes = row.get("notes")
    return AppointmentDraft(
        pms_appointment_id=str(row.get("appt_id") or "") or None,
        pms_patient_id=str(row.get("patient_id") or "") or None,
        starts_at=row.get("start"),
        ends_at=row.get("end"),
        status=APPOINTMENT_STATUSES.get(status, status or None),
        appointment_type=APPOINTMENT_TYPES_IN.get(kind.lower(), "other"),
        clinician=row.get("staff_id"),
        notes=notes,
        nvc_reference=find_nvc_reference(notes),
        updated_at=_parse_timestamp(row.get("updated_at")),
    )


def alert_draft(row: dict[str, Any]) -> ClinicalDraft:
    """A clinical alert as a clinical record; a resolved alert carries no flags any more."""
    active = row.get("active") is not False
    return ClinicalDraft(
        pms_record_id=f"alert-{row['alert_id']}" if row.get("alert_id") is not None else None,
        pms_patient_id=str(row.get("patient_id") or "") or None,
        exam_date=row.get("recorded_on"),
        record_type="clinical_alert" if active else "clinical_alert_resolved",
        flags=alert_flags(row.get("alert")) if active else [],
        notes=" - ".join(str(x).strip() for x in (row.get("alert"), row.get("comment")) if x and str(x).strip()),
        clinician=row.get("staff_id"),
        updated_at=_parse_timestamp(row.get("updated_at")),
    )


def _latest(rows: Iterable[dict[str, Any]], id_key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows by id, a later copy (the record changed while we paged) replacing the earlier one."""
    latest: dict[str, dict[str, Any]] = {}
    anonymous: list[dict[str, Any]] = []
    for row in rows:
        row_id = str(row.get(id_key) or "")
        if row_id:
            latest.pop(row_id, None)
            latest[row_id] = row
        else:
            anonymous.append(row)
    return list(latest.values()), anonymous


class SycleClient(PmsClientBase):
    """One Sycle clinic's vendor API connection (implements `PmsClient`)."""

    kind = PmsKind.SYCLE
    pms_name = PMS_NAME
    words = WORDS
    errors = ERRORS
    fallback = ErrorRule(
        "bad_request",
        "Sycle refused the request with HTTP {status}{said}.",
        "this is a bug in the Sycle integration; report it with this message",
        connection=False,
    )

    def __init__(
        self,
        practice: Practice,
        *,
        account_url: str,
        location_id: str,
        api_username: str,
        api_password: str,
        field_map: dict[str, str] | None = None,
        referral_source: str | None = None,
        referral_subcategory: str | None = None,
        page_size: int = 100,
        timeout_seconds: float = 30.0,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        ca_bundle: str | None = None,
    ):
        self.practice = practice
        self.location_id = location_id
        self.page_size = page_size
        self.explicit_field_map = dict(field_map or {})
        self.referral_source = (referral_source or "").strip() or None
        self.referral_subcategory = (referral_subcategory or "").strip() or None
        self._username = api_username
        self._password = api_password
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._resolved: dict[str, str] | None = None
        self._clinic: dict[str, Any] | None = None
        self._field_notes: list[str] = []
        self.http = self._open_http(
            account_url,
            "the account_url setting: the https:// address the practice signs in to Sycle with, "
            "e.g. https://brightsight.sycle.net",
            unsafe_message=f"the account URL {account_url.strip()!r} must start with https:// (patient data and "
            "the vendor API login must never travel in clear).",
            ca_bundle=ca_bundle,
            headers=FORM_JSON,
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            transport=transport,
        )
        self._prefix = "" if self.http.base_url.endswith(API_PREFIX) else API_PREFIX
        self.account = urlsplit(self.http.base_url).netloc

    def __repr__(self) -> str:
        return f"SycleClient(practice={self.practice.practice_id!r}, location_id={self.location_id!r})"

    # --- errors ------------------------------------------------------------------------------------

    def _secrets(self) -> tuple[Secret, ...]:
        return (
            Secret(self._password, "<api password>"),
            Secret(self._token or "", "<token>"),
            Secret(self._username, "<api username>", whole_word=True),
        )

    def _reply(self, body: Any) -> tuple[str, str]:
        """Sycle's error code and a short description, from `{"errors": [{"code", "detail"}]}`."""
        errors = body.get("errors") if isinstance(body, dict) else None
        first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
        code = str(first.get("code") or "")
        detail = str(first.get("detail") or first.get("message") or "") if first else str(body or "")[:200]
        return code, " ".join(detail.split())

    def _error_context(self) -> dict[str, Any]:
        return {**super()._error_context(), "account": self.account, "loc": self.location_id}

    # --- the vendor API's one way of calling --------------------------------------------------------

    def _path(self, endpoint: str) -> str:
        return f"{self._prefix}/{endpoint.strip('/')}/"

    def _send(self, endpoint: str, body: dict[str, Any], *, retry: bool) -> Any:
        """One GET of `/api/vendor/{endpoint}/` with `body` as JSON (as Sycle takes it); raw errors."""
        return self.http.request("GET", self._path(endpoint), retry=retry, content=json.dumps(body, default=str))

    def _login(self, stale: str | None = None) -> str:
        """The token for this connection: from `token` with the vendor login, once (again when `stale` failed)."""
        with self._token_lock:
            if self._token is None or self._token == stale:
                try:
                    answer = self._send("token", {"username": self._username, "password": self._password}, retry=True)
                except (HttpStatusError, httpx.TransportError) as exc:
                    raise self._translate(exc) from None
                token = answer.get("token") if isinstance(answer, dict) else None
                if not isinstance(token, str) or not token:
                    raise self._fail("pms_error", "Sycle answered the login without a token.", CHECK_URL)
                self._token = token
            return self._token

    def _raw(self, endpoint: str, body: dict[str, Any], *, retry: bool = True) -> Any:
        """A call with the token in its body; a token Sycle no longer takes is renewed once. Raw errors."""
        token = self._login()
        try:
            return self._send(endpoint, {"token": token, **body}, retry=retry)
        except HttpStatusError as exc:
            if exc.status != 401 or self._reply(exc.body)[0] not in TOKEN_GONE:
                raise
        token = self._login(stale=token)
        return self._send(endpoint, {"token": token, **body}, retry=retry)

    def _call(self, endpoint: str, **body: Any) -> Any:
        """A read (retried by `PmsHttp`); a failure becomes the problem the error table names."""
        try:
            return self._raw(endpoint, {k: v for k, v in body.items() if v is not None})
        except (HttpStatusError, httpx.TransportError) as exc:
            raise self._translate(exc) from None

    def _pages(self, endpoint: str, key: str, **body: Any) -> Iterator[dict[str, Any]]:
        """Every row of a paged list of this clinic, page 1 to `meta.total_pages` (re-read on every page)."""
        page = 1
        while True:
            answer = self._call(endpoint, clinic_id=self.location_id, page=page, per_page=self.page_size, **body)
            if not isinstance(answer, dict) or not isinstance(answer.get(key), list):
                raise self._fail("pms_error", f"Sycle returned a {key} page without a {key} list.", CHECK_URL)
            for row in answer[key]:
                # A malformed row is passed on (and ends as a rejected row), never silently dropped.
                yield row if isinstance(row, dict) else {"unexpected": row}
            meta = found if isinstance(found := answer.get("meta"), dict) else {}
            try:
                total_pages = int(meta.get("total_pages") or 0)
            except (TypeError, ValueError):
                total_pages = 0
            if not answer[key] or page >= total_pages:
                return
            if page >= MAX_PAGES:
                raise self._fail("pms_error", f"Sycle reported more than {MAX_PAGES} pages of {key}.", CHECK_URL)
            page += 1

    def clinic(self) -> dict[str, Any]:
        """This clinic's detail (`clinics/{clinic_id}`): the clinic, appointment types, referral sources."""
        if self._clinic is None:
            answer = self._call(f"clinics/{quote(self.location_id, safe='')}")
            detail = answer.get("clinic_details") if isinstance(answer, dict) else None
            if not isinstance(detail, dict) or not isinstance(detail.get("clinic"), dict):
                raise self._fail("pms_error", "Sycle returned a clinic without its details.", CHECK_URL)
            self._clinic = detail
        return self._clinic

    # --- field mapping -------------------------------------------------------------------------------

    def fields(self) -> list[dict[str, Any]]:
        answer = self._call("patient_fields", clinic_id=self.location_id)
        rows = answer.get("fields") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise self._fail("pms_error", "Sycle returned a field list without fields.", CHECK_URL)
        return [f for f in rows if isinstance(f, dict) and f.get("key")]

    def field_map(self) -> dict[str, str]:
        """The mapping in force (target -> field key): the practice's settings, else Sycle's standard
        fields, else what the labels suggest; checked against the location's fields once per client."""
        if self._resolved is not None:
            return self._resolved
        fields = self.fields()
        by_key = {str(f["key"]): f for f in fields}

        def describe(key: str) -> str:
            label = by_key.get(key, {}).get("label")
            return f"{key} ({label!r})" if label else key

        listing = ", ".join(describe(k) for k in by_key if by_key[k].get("custom")) or "no custom fields"
        suggestion = suggest_field_mapping(fields)
        resolved: dict[str, str] = {}
        notes: list[str] = []
        for target, wanted in FIELD_MAP_TARGETS.items():
            setting = FIELD_MAP_PREFIX + target
            if target in self.explicit_field_map:
                key = self.explicit_field_map[target]
                if not key:
                    continue  # the practice said: do not read this
                field = by_key.get(key)
                hint = f"; the labels suggest {setting}={suggestion[target]}" if target in suggestion else ""
                if field is None:
                    raise self._fail(
                        "invalid_field_mapping",
                        f"{setting} names the Sycle field {key!r}, which location {self.location_id} does not have.",
                        f"the {setting} setting: use a field key from Sycle (Settings > Custom Fields){hint}; "
                        f"this location's custom fields: {listing}",
                    )
                kind = str(field.get("type") or "").lower()
                if kind not in _COMPATIBLE_TYPES[wanted]:
                    raise self._fail(
                        "invalid_field_mapping",
                        f"{setting} names the Sycle field {describe(key)}, a {kind} field; {target} needs a {wanted}.",
                        f"the {setting} setting{hint}; this location's custom fields: {listing}",
                    )
                resolved[target] = key
            elif target in DEFAULT_FIELD_MAP and DEFAULT_FIELD_MAP[target] in by_key:
                resolved[target] = DEFAULT_FIELD_MAP[target]
            elif target in suggestion:
                resolved[target] = suggestion[target]
                notes.append(f"{setting}={suggestion[target]} (suggested from the label; pin it with --setting)")
                log.info(
                    "%s practice %s: %s is not set; reading %s as suggested by its label",
                    PMS_NAME,
                    self.practice.practice_id,
                    setting,
                    describe(suggestion[target]),
                )
        self._field_notes = notes
        self._resolved = resolved
        return resolved

    # --- PmsClient: reads ----------------------------------------------------------------------------

    def test_connection(self) -> ConnectionInfo:
        """Proves URL, login and API access (`clinics`), the clinic id, and the field mapping."""
        answer = self._call("clinics")
        details = answer.get("clinic_details") if isinstance(answer, dict) else None
        if not isinstance(details, list):
            raise self._fail("pms_error", "Sycle returned an unexpected clinic list.", CHECK_URL)
        clinics = [d["clinic"] for d in details if isinstance(d, dict) and isinstance(d.get("clinic"), dict)]
        mine = next((c for c in clinics if str(c.get("clinic_id")) == self.location_id), None)
        if mine is None:
            known = ", ".join(f"{c.get('clinic_id')} ({c.get('clinic_name')})" for c in clinics)
            raise self._fail(
                "location_not_found",
                f"the Sycle account {self.account} has no clinic {self.location_id} (its clinics: {known or 'none'}).",
                CHECK_LOCATION,
            )
        detail = self.clinic()
        mapping = self.field_map()
        mapped = ", ".join(f"{t}={k}" for t, k in mapping.items())
        if "last_eye_test" not in mapping:
            self._field_notes.append(
                "no field holds the last eye test: set --setting field_map.last_eye_test=<custom field key>"
            )
        types = ", ".join(str(t.get("name")) for t in detail.get("appointment_types") or [] if isinstance(t, dict))
        source, _ = self._referral()
        text = (
            f"Sycle clinic {self.location_id} on {self.account}; appointment types: {types or 'none'}; "
            f"bookings recorded as referred by {source or 'no source'}; field map: {mapped or 'none'}"
        )
        if self._field_notes:
            text += "; " + "; ".join(self._field_notes)
        return ConnectionInfo(pms=PMS_NAME, practice_name=mine.get("clinic_name"), version="api/vendor", detail=text)

    def iter_patient_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        yield from self._pages("patients", "patients", updated_since=_since_param(since) if since else None)

    def _rows_for(self, endpoint: str, key: str, patient_ids: set[str] | None) -> list[dict[str, Any]]:
        """A joined list (alerts or recalls) for these patients, or all of them (None)."""
        if patient_ids is None or len(patient_ids) > JOIN_BY_ID_LIMIT:
            return list(self._pages(endpoint, key))
        wanted = sorted(patient_ids, key=_id_order)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(wanted), IDS_PER_REQUEST):
            rows.extend(self._pages(endpoint, key, patient_ids=wanted[start : start + IDS_PER_REQUEST]))
        return rows

    def _changed_patient_ids(self, endpoint: str, key: str, since: datetime) -> set[str]:
        rows = self._pages(endpoint, key, updated_since=_since_param(since))
        return {str(r.get("patient_id")) for r in rows if r.get("patient_id") is not None}

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """Patients updated since `since` (inclusive; all when None), with alerts and recalls joined.

        A patient whose alert or recall changed is read too, even if the patient record did not
        change. Page numbers shift when a record changes mid-read; the later copy wins.
        """
        mapping = self.field_map()
        rows, anonymous = _latest(self.iter_patient_rows(since), "patient_id")
        wanted: set[str] | None = None
        if since is not None:
            wanted = {str(r["patient_id"]) for r in rows}
            extra = self._changed_patient_ids("clinical_alerts", "clinical_alerts", since)
            extra |= self._changed_patient_ids("recall_recommendations", "recall_recommendations", since)
            extra -= wanted
            ordered = sorted(extra, key=_id_order)
            for start in range(0, len(ordered), IDS_PER_REQUEST):
                chunk = ordered[start : start + IDS_PER_REQUEST]
                more, _ = _latest(self._pages("patients", "patients", patient_ids=chunk), "patient_id")
                rows.extend(more)
            wanted |= extra
        alerts: dict[str, list[dict[str, Any]]] = {}
        for alert in self._rows_for("clinical_alerts", "clinical_alerts", wanted):
            alerts.setdefault(str(alert.get("patient_id")), []).append(alert)
        recalls: dict[str, list[dict[str, Any]]] = {}
        for recall in self._rows_for("recall_recommendations", "recall_recommendations", wanted):
            recalls.setdefault(str(recall.get("patient_id")), []).append(recall)

        def draft(row: dict[str, Any]) -> PatientDraft:
            pid = str(row.get("patient_id") or "")
            return sycle_draft(row, mapping, alerts.get(pid, []), recalls.get(pid, []))

        out = [(f"sycle:{r['patient_id']}", r, draft(r)) for r in rows]
        out += [(f"sycle:row-without-id-{n}", r, draft(r)) for n, r in enumerate(anonymous, 1)]
        scope = "full" if since is None else f"since {_since_param(since)}"
        source_ref = f"sycle:{self.location_id} {scope}"
        return collect(self.practice.practice_id, out, today, strict=False, source_ref=source_ref)

    def read_appointments(self, since: datetime | None) -> RecordBatch[Appointment]:
        since_param = _since_param(since) if since is not None else None
        rows, anonymous = _latest(self._pages("appointments", "appointments", updated_since=since_param), "appt_id")
        items = [(f"sycle-appointment:{r['appt_id']}", r, appointment_draft(r)) for r in rows]
        items += [
            (f"sycle-appointment:row-without-id-{n}", r, appointment_draft(r)) for n, r in enumerate(anonymous, 1)
        ]
        scope = "full" if since is None else f"since {_since_param(since)}"
        return collect_records(
            items,
            partial(build_appointment, self.practice.practice_id),
            lambda a: a.pms_appointment_id,
            source_ref=f"sycle:{self.location_id} appointments {scope}",
        )

    def read_clinical_records(self, since: datetime | None) -> RecordBatch[ClinicalRecord]:
        """Sycle's clinical alerts, one record each (a resolved alert comes back without its flag)."""
        since_param = _since_param(since) if since is not None else None
        rows, anonymous = _latest(
            self._pages("clinical_alerts", "clinical_alerts", updated_since=since_param), "alert_id"
        )
        today = datetime.now(UK_TZ).date()
        items = [(f"sycle-alert:{r['alert_id']}", r, alert_draft(r)) for r in rows]
        items += [(f"sycle-alert:row-without-id-{n}", r, alert_draft(r)) for n, r in enumerate(anonymous, 1)]
        scope = "full" if since is None else f"since {_since_param(since)}"
        return collect_records(
            items,
            lambda d: build_clinical(self.practice.practice_id, d, today),
            lambda c: c.pms_record_id,
            source_ref=f"sycle:{self.location_id} clinical_alerts {scope}",
        )

    def staff(self) -> list[dict[str, Any]]:
        """The clinic's staff (`staff`, modelled): id, names, role and GOC number (None for non-registrants)."""
        answer = self._call("staff", clinic_id=self.location_id)
        rows = answer.get("staff") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise self._fail("pms_error", "Sycle returned a staff list without staff.", CHECK_URL)
        return [r for r in rows if isinstance(r, dict)]

    def read_clinicians(self) -> list[Clinician]:
        """The clinic's staff as clinicians, with the GOC numbers Sycle holds (verified by NVC elsewhere)."""
        out = []
        for row in self.staff():
            ref = str(row.get("staff_id") or "").strip()
            if not ref:
                continue
            name = " ".join(str(row.get(k) or "") for k in ("title", "first_name", "last_name")).split()
            goc = str(row.get("goc_number") or "").strip() or None
            out.append(Clinician(self.practice.practice_id, ref, " ".join(name), goc, str(row.get("role") or "")))
        return out

    # --- PmsClient: writes ---------------------------------------------------------------------------

    def _sender(self, endpoint: str, body: dict[str, Any], key: str, id_field: str) -> Callable[[], str | None]:
        """One call that writes (`retry=False`: `write_exactly_once` decides); the new id, or None."""

        def send() -> str | None:
            answer = self._raw(endpoint, body, retry=False)
            row = answer.get(key) if isinstance(answer, dict) else None
            return str(row[id_field]) if isinstance(row, dict) and row.get(id_field) else None

        return send

    def _booking_times(self, booking: BookingRequest) -> tuple[datetime, int]:
        try:
            nvc_marker(booking.idempotency_key)
            starts = parse_pms_datetime(booking.starts_at, "start")
            ends = parse_pms_datetime(booking.ends_at, "end")
        except InvalidValue as exc:
            raise self._error("invalid_booking", f"the booking cannot be sent: {exc}.", "the booking request") from None
        if ends <= starts:
            raise self._error("invalid_booking", "the booking ends before it starts.", "the booking request")
        if not str(booking.pms_patient_id or "").strip():
            raise self._error("patient_not_found", "the booking has no patient id.", "the booking request")
        return starts.astimezone(UK_TZ), round((ends - starts).total_seconds() / 60)

    def patient(self, patient_id: str) -> dict[str, Any]:
        """One patient of this clinic (`patients/{id}`, modelled); `patient_not_found` when it has none."""
        answer = self._call(f"patients/{quote(str(patient_id).strip(), safe='')}", clinic_id=self.location_id)
        row = answer.get("patient") if isinstance(answer, dict) else None
        if not isinstance(row, dict):
            raise self._error("patient_not_found", f"Sycle has no patient {patient_id} at clinic {self.location_id}.")
        return row

    def _appointment_type(self, booking: BookingRequest) -> dict[str, Any]:
        wanted = APPOINTMENT_TYPES_OUT.get(booking.appointment_type, "Other").casefold()
        types = [t for t in self.clinic().get("appointment_types") or [] if isinstance(t, dict)]
        found = next((t for t in types if str(t.get("name") or "").casefold() == wanted), None)
        if found is None or not found.get("appt_type_id"):
            names = ", ".join(str(t.get("name")) for t in types) or "none"
            raise self._error(
                "invalid_booking",
                f"clinic {self.location_id} has no appointment type for {booking.appointment_type} "
                f"({wanted!r}; its types: {names}).",
                CHECK_BOOKING,
            )
        return found

    def _referral(self) -> tuple[str, str]:
        """The referral source and subcategory bookings are recorded with (settings, else "Recall")."""
        sources = [s for s in self.clinic().get("referral_sources") or [] if isinstance(s, dict)]
        if self.referral_source:
            source = next((s for s in sources if s.get("name") == self.referral_source), None)
            if source is None:
                names = ", ".join(str(s.get("name")) for s in sources) or "none"
                raise self._fail(
                    "invalid_setting",
                    f"clinic {self.location_id} has no referral source {self.referral_source!r} (its sources: {names}).",
                    "the referral_source setting: a referral source name from Sycle",
                )
        else:
            source = next((s for s in sources if "recall" in str(s.get("name") or "").lower()), None)
            source = source or (sources[0] if sources else None)
        if source is None:
            return "", ""
        subs = [str(x.get("name")) for x in source.get("referral_subcategories") or [] if isinstance(x, dict)]
        sub = self.referral_subcategory or next((s for s in subs if "phone" in s.lower()), subs[0] if subs else "")
        return str(source.get("name") or ""), sub

    def open_slots(self, day: date, minutes: int) -> list[tuple[dict[str, Any], datetime]]:
        """The clinic's open slots on a (UK) day for an appointment of `minutes`: (staff, start) pairs."""
        answer = self._call(
            "open_slots",
            clinic_id=self.location_id,
            start_date=day.isoformat(),
            end_date=day.isoformat(),
            length=minutes,
        )
        rows = answer.get("open_slots") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise self._fail("pms_error", "Sycle returned open slots without an open_slots list.", CHECK_URL)
        out = []
        for row in rows:
            staff = found if isinstance(row, dict) and isinstance(found := row.get("staff"), dict) else {}
            for slot in row.get("slots") or [] if isinstance(row, dict) else []:
                when = _slot_time(slot.get("time") if isinstance(slot, dict) else slot)
                if when is not None:
                    out.append((staff, when))
        return out

    def _pick_slot(self, booking: BookingRequest, starts: datetime, minutes: int) -> None:
        """The booking's time must be an open slot (of the named clinician, when the booking names one)."""
        slots = self.open_slots(starts.date(), minutes)
        at_time = [staff for staff, when in slots if when == starts]
        if booking.clinician_ref:
            named = self._staff_names().get(booking.clinician_ref.strip())
            if named is None:
                raise self._error(
                    "invalid_booking",
                    f"clinic {self.location_id} has no staff member {booking.clinician_ref!r}.",
                    "the booking's clinician_ref: a Sycle staff id (e.g. 2803-S01), see `nvc clinicians PRACTICE`",
                )
            at_time = [s for s in at_time if _staff_key(s) == named]
        if not at_time:
            who = f" for {booking.clinician_ref}" if booking.clinician_ref else ""
            raise self._error(
                "slot_taken",
                f"{starts:%Y-%m-%d %H:%M} is not an open slot{who} at Sycle clinic {self.location_id}.",
                "offer the patient another time; the diary changed since the call list was made",
            )

    def _staff_names(self) -> dict[str, tuple[str, str]]:
        return {str(r.get("staff_id")): _staff_key(r) for r in self.staff() if r.get("staff_id")}

    def find_booking(self, booking: BookingRequest) -> str | None:
        """The appointment an earlier attempt made: the patient's appointment at that very time at this
        clinic (or one carrying this booking's NVC marker), from the diary of that (UK) day."""
        starts, _ = self._booking_times(booking)
        rows = list(
            self._pages(
                "appointments",
                "appointments",
                patient_ids=[str(booking.pms_patient_id).strip()],
                date=starts.date().isoformat(),
            )
        )
        for row in rows:
            if find_nvc_reference(row.get("notes")) == booking.idempotency_key and row.get("appt_id"):
                return str(row["appt_id"])
        for row in rows:
            if str(row.get("status") or "").lower() in ("cancelled", "canceled") or not row.get("appt_id"):
                continue
            try:
                same = parse_pms_datetime(row.get("start"), "start") == starts
            except InvalidValue:
                continue
            if same and str(row.get("patient_id")) == str(booking.pms_patient_id).strip():
                return str(row["appt_id"])
        return None

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        """Book through `appointment` at a time `open_slots` offers, naming the patient by the details
        Sycle holds for them; exactly once (looked up by patient and time before and after)."""
        starts, minutes = self._booking_times(booking)
        patient = self.patient(booking.pms_patient_id)
        kind = self._appointment_type(booking)
        source, sub = self._referral()
        text = " ".join((booking.notes or "Booked on an NVC call").split())[:1500]
        body = {
            "start": starts.strftime(SYCLE_TIME),
            "clinic_id": self.location_id,
            "appt_type_id": kind["appt_type_id"],
            "ref_source_name": source,
            "sub_ref_name": sub,
            "patient": {
                "first_name": patient.get("first_name") or "",
                "last_name": patient.get("last_name") or "",
                "phone": patient.get("cell_phone") or patient.get("phone") or "",
                "email": patient.get("email") or "",
            },
            "notes": f"{text} {nvc_marker(booking.idempotency_key)}",
        }
        post = self._sender("appointment", body, "appointment", "appt_id")

        def send() -> str | None:
            self._pick_slot(booking, starts, minutes)  # after the look-up: our own booking holds the slot
            return post()

        appointment_id, created = self.write_exactly_once(
            "booking", "booking", send, lambda: self.find_booking(booking)
        )
        return BookingResult(appointment_id, created)

    def find_note(self, note: PatientNote) -> str | None:
        rows = self._pages("communications", "communications", patient_id=str(note.pms_patient_id).strip(), type="call")
        for row in rows:
            if find_nvc_reference(row.get("note")) == note.idempotency_key and row.get("communication_id"):
                return str(row["communication_id"])
        return None

    def add_note(self, note: PatientNote) -> NoteResult:
        """A call attempt or outcome as an outbound call communication on the patient, exactly once."""
        try:
            marker = nvc_marker(note.idempotency_key)
            occurred = parse_pms_datetime(note.occurred_at, "occurred_at")
        except InvalidValue as exc:
            raise self._error("invalid_note", f"the note cannot be sent: {exc}.", "the note request") from None
        if not str(note.pms_patient_id or "").strip():
            raise self._error("patient_not_found", "the note has no patient id.", "the note request")
        heading = "NVC call attempt" if note.kind == NoteKind.CALL_ATTEMPT else "NVC call outcome"
        if note.outcome:
            heading += f" ({note.outcome})"
        text = " ".join(note.text.split())[:1500]
        body = {
            "clinic_id": self.location_id,
            "patient_id": str(note.pms_patient_id).strip(),
            "type": "call",
            "direction": "outbound",
            "outcome": CALL_OUTCOMES.get(note.outcome or "", "other"),
            "note": f"{heading}: {text} {marker}",
            "occurred_at": occurred.astimezone(UK_TZ).isoformat(),
        }
        note_id, created = self.write_exactly_once(
            "note",
            "note",
            self._sender("communication", body, "communication", "communication_id"),
            lambda: self.find_note(note),
        )
        return NoteResult(note_id, created)


def _id_order(patient_id: str) -> tuple[int, int, str]:
    """Account-prefixed ids (`2803-1000001`) in the order of their number."""
    tail = patient_id.rpartition("-")[2]
    return (0, int(tail), "") if tail.isdigit() else (1, 0, patient_id)


def _staff_key(staff: dict[str, Any]) -> tuple[str, str]:
    return (
        " ".join(str(staff.get("first_name") or "").split()).casefold(),
        " ".join(str(staff.get("last_name") or "").split()).casefold(),
    )


def _slot_time(raw: Any) -> datetime | None:
    """A slot's `time` (`YYYY-MM-DD HH:MM:SS`, clinic local time; ISO 8601 read too) as an aware datetime."""
    text = str(raw or "").strip()
    for parse in (lambda t: datetime.strptime(t, SYCLE_TIME), lambda t: datetime.fromisoformat(t)):
        try:
            value = parse(text)
        except ValueError:
            continue
        return value.replace(tzinfo=UK_TZ) if value.tzinfo is None else value.astimezone(UK_TZ)
    return None


class SycleResource(HttpPmsResource):
    """Sycle connections. Per practice: `account_url`, `location_id` (a clinic id), optional
    `referral_source`, `referral_subcategory` and `field_map.<target>` (targets: last_eye_test,
    recall_due, mobile, phone, email, date_of_death); secrets: `api_username`, `api_password`."""

    def required_settings(self) -> tuple[str, ...]:
        return ("account_url", "location_id")

    def optional_settings(self) -> tuple[str, ...]:
        return (
            *(FIELD_MAP_PREFIX + target for target in FIELD_MAP_TARGETS),
            "referral_source",
            "referral_subcategory",
            *super().optional_settings(),
        )

    def required_secrets(self) -> tuple[str, ...]:
        return ("api_username", "api_password")

    def open(self, practice: Practice, credentials: dict[str, str]) -> SycleClient:
        checks = {
            "account_url": CHECK_URL,
            "location_id": CHECK_LOCATION,
            "api_username": CHECK_LOGIN,
            "api_password": CHECK_LOGIN,
        }
        values = self.required_values(practice, credentials, PMS_NAME, checks, verbatim=("api_password",))
        field_map, unknown = field_map_from_settings(practice.settings)
        if unknown:
            raise PmsConnectionFailed(
                PMS_NAME,
                practice.practice_id,
                "invalid_field_mapping",
                f"unknown field mapping setting(s) {', '.join(sorted(unknown))}.",
                f"the field_map settings: the targets are {', '.join(FIELD_MAP_TARGETS)}",
            )
        return SycleClient(
            practice,
            account_url=values["account_url"],
            location_id=values["location_id"],
            api_username=values["api_username"],
            api_password=values["api_password"],
            field_map=field_map,
            referral_source=practice.settings.get("referral_source"),
            referral_subcategory=practice.settings.get("referral_subcategory"),
            **self.client_options(practice),
        )
