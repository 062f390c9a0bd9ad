"""Sycle, the cloud PMS: a practice is one location of a Sycle account, read and written over its API.

Settings per practice: `account_url` (the account's own https:// address, e.g.
`https://brightsight.sycle.net`), `location_id` (each location of a multi-location account is its
own NVC practice) and an optional one-time field mapping, `field_map.<target>=<sycle field key>`,
saying which Sycle field holds what (Sycle accounts keep the last eye exam in a custom field, and
which one differs per account). Secret: `api_token` (Sycle tokens can expire).

Reads: patients page by page (`page`/`per_page`, `meta.total_pages`), with the clinical alerts
joined on as risk flags and the open eye exam recall recommendation as the PMS recall date.
Sycle's words for reaching a patient become NVC's (`sycle_contact`): `status` (`active`,
`inactive`, `deceased`, `moved`; a word NVC does not know rejects the row, naming it), the
opt-out boxes `do_not_call`/`do_not_text`/`do_not_email` (a channel is allowed unless ticked),
`recall_opt_out` and `responsible_party` (`Self` means no guardian); the date of death comes from
the custom field `field_map.date_of_death` names (a date there means deceased).
Writes: appointments and call communications, each created exactly once. Sycle has no idempotency
key, so the NVC marker goes into the record's text and the client looks for it before creating and
after any response that was lost. Every error becomes a `PmsError` with a stable `problem` and what
to check; the token travels only in the Authorization header and never appears in a message or log.
"""

from __future__ import annotations

import logging
import re
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
from resources.http import FailureWords, HttpPmsResource, SecretAuth
from resources.protocol import ConnectionInfo, PmsConnectionFailed

log = logging.getLogger(__name__)

PMS_NAME = "Sycle"
API_PREFIX = "/api/v1"

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

CHECK_TOKEN = (
    "the API token in Sycle (Settings > API Access); copy it again, a typo or a partly copied token is the usual cause"
)
CHECK_EXPIRED = (
    "generate a new API token in Sycle (Settings > API Access) and store it with "
    "`nvc practice connect PRACTICE_ID --pms sycle --update` (the token is asked for, never on the command line)"
)
CHECK_API = "the account has Sycle's API add-on; the practice enables it with Sycle support (Settings > API Access)"
CHECK_LOCATION = "the location_id setting: the Location ID shown in Sycle under Settings > Locations"
CHECK_URL = (
    "the account_url setting (the https:// address the practice signs in to Sycle with, e.g. "
    "https://brightsight.sycle.net), and that this server can reach it (firewall, proxy, network)"
)
WORDS = FailureWords(
    pms=PMS_NAME,
    throttler="Sycle",
    answerer="Sycle",
    place="",
    heavy_user="the same API token",
    url_setting="account_url",
    check_url=CHECK_URL,
    check_server_error="Sycle's status page",
    tls_owner="the Sycle server's",
)
# Sycle's answers beyond the ones every HTTP PMS shares (`{account}`: the account's host, `{loc}`: the location).
ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule("token_expired", "the API token has expired{said}.", CHECK_EXPIRED, status=401, code="token_expired"),
    ErrorRule("invalid_credentials", "the API token was rejected{said}.", CHECK_TOKEN, status=401),
    ErrorRule(
        "api_access_disabled",
        "API access is not enabled for the Sycle account {account}{said}.",
        CHECK_API,
        status=403,
        code="api_disabled",
    ),
    ErrorRule("forbidden", "Sycle refused access to location {loc}{said}.", CHECK_TOKEN, status=403),
    ErrorRule(
        "location_not_found",
        "the Sycle account {account} has no location {loc}{said}.",
        CHECK_LOCATION,
        status=404,
        code="location_not_found",
    ),
    ErrorRule(
        "patient_not_found",
        "Sycle has no patient with that id at location {loc}{said}.",
        "whether the patient was merged or removed in Sycle; re-sync the practice",
        status=404,
        code="patient_not_found",
        connection=False,
    ),
    ErrorRule("pms_error", "{base_url} answered HTTP 404 for the Sycle API{said}.", CHECK_URL, status=404),
    ErrorRule(
        "slot_taken",
        "the slot is already taken in the Sycle diary{said}.",
        "offer the patient another time; the diary changed since the call list was made",
        status=409,
        code="slot_conflict",
        on=WRITES,
        connection=False,
    ),
    ErrorRule(
        "invalid_booking",
        "Sycle refused the record as invalid{said}.",
        "the booking's times, appointment type and provider (clinician_ref is a Sycle provider id, e.g. PRV-01)",
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


def _wire_id(patient_id: str) -> int | str:
    """Sycle patient ids are numbers; anything else is sent as given (and Sycle says it is unknown)."""
    text = str(patient_id).strip()
    return int(text) if text.isdigit() else text


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
    kind = str(row.get("appointment_type") or "").strip()
    status = str(row.get("status") or "").strip().lower()
    notes = row.get("notes")
    return AppointmentDraft(
        pms_appointment_id=str(row.get("appointment_id") or "") or None,
        pms_patient_id=str(row.get("patient_id") or "") or None,
        starts_at=row.get("start_time"),
        ends_at=row.get("end_time"),
        status=APPOINTMENT_STATUSES.get(status, status or None),
        appointment_type=APPOINTMENT_TYPES_IN.get(kind.lower(), "other"),
        clinician=row.get("provider_id"),
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
        clinician=row.get("provider_id"),
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
    """One Sycle location's API connection (implements `PmsClient`)."""

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
        api_token: str,
        field_map: dict[str, str] | None = None,
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
        self._secret = api_token
        self._resolved: dict[str, str] | None = None
        self._field_notes: list[str] = []
        self.http = self._open_http(
            account_url,
            "the account_url setting: the https:// address the practice signs in to Sycle with, "
            "e.g. https://brightsight.sycle.net",
            unsafe_message=f"the account URL {account_url.strip()!r} must start with https:// (patient data and "
            "the API token must never travel in clear).",
            ca_bundle=ca_bundle,
            auth=SecretAuth("Token", api_token),
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            transport=transport,
        )
        self._prefix = "" if self.http.base_url.endswith(API_PREFIX) else API_PREFIX
        self._location_path = f"{self._prefix}/locations/{quote(location_id, safe='')}"
        self.account = urlsplit(self.http.base_url).netloc

    def __repr__(self) -> str:
        return f"SycleClient(practice={self.practice.practice_id!r}, location_id={self.location_id!r})"

    # --- errors ------------------------------------------------------------------------------------

    def _secrets(self) -> tuple[Secret, ...]:
        return (Secret(self._secret, "<api token>"),)

    def _reply(self, body: Any) -> tuple[str, str]:
        """Sycle's error code and a short description, from `{"errors": [{"code", "detail"}]}`."""
        errors = body.get("errors") if isinstance(body, dict) else None
        first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
        code = str(first.get("code") or "")
        detail = str(first.get("detail") or first.get("message") or "") if first else str(body or "")[:200]
        return code, " ".join(detail.split())

    def _error_context(self) -> dict[str, Any]:
        return {**super()._error_context(), "account": self.account, "loc": self.location_id}

    def _pages(self, path: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every row of a paged list, page 1 to `meta.total_pages` (re-read on every page)."""
        page = 1
        while True:
            body = self._get(path, page=page, per_page=self.page_size, **params)
            if not isinstance(body, dict) or not isinstance(body.get(key), list):
                raise self._fail("pms_error", f"Sycle returned a {key} page without a {key} list.", CHECK_URL)
            for row in body[key]:
                # A malformed row is passed on (and ends as a rejected row), never silently dropped.
                yield row if isinstance(row, dict) else {"unexpected": row}
            meta = body.get("meta") if isinstance(body.get("meta"), dict) else {}
            try:
                total_pages = int(meta.get("total_pages") or 0)
            except (TypeError, ValueError):
                total_pages = 0
            if not body[key] or page >= total_pages:
                return
            if page >= MAX_PAGES:
                raise self._fail("pms_error", f"Sycle reported more than {MAX_PAGES} pages of {key}.", CHECK_URL)
            page += 1

    # --- field mapping -------------------------------------------------------------------------------

    def fields(self) -> list[dict[str, Any]]:
        body = self._get(f"{self._location_path}/fields")
        rows = body.get("fields") if isinstance(body, dict) else None
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
        """Proves URL, token and API add-on (the location list), the location id, and the field mapping."""
        body = self._get(f"{self._prefix}/locations")
        locations = body.get("locations") if isinstance(body, dict) else None
        if not isinstance(locations, list):
            raise self._fail("pms_error", "Sycle returned an unexpected location list.", CHECK_URL)
        mine = next(
            (x for x in locations if isinstance(x, dict) and str(x.get("location_id")) == self.location_id), None
        )
        if mine is None:
            known = ", ".join(f"{x.get('location_id')} ({x.get('name')})" for x in locations if isinstance(x, dict))
            raise self._fail(
                "location_not_found",
                f"the Sycle account {self.account} has no location {self.location_id} "
                f"(its locations: {known or 'none'}).",
                CHECK_LOCATION,
            )
        mapping = self.field_map()
        mapped = ", ".join(f"{t}={k}" for t, k in mapping.items())
        if "last_eye_test" not in mapping:
            self._field_notes.append(
                "no field holds the last eye test: set --setting field_map.last_eye_test=<custom field key>"
            )
        detail = f"Sycle location {self.location_id} on {self.account}; field map: {mapped or 'none'}"
        if self._field_notes:
            detail += "; " + "; ".join(self._field_notes)
        return ConnectionInfo(pms=PMS_NAME, practice_name=mine.get("name"), version="api/v1", detail=detail)

    def iter_patient_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        params = {"updated_since": _since_param(since)} if since is not None else {}
        yield from self._pages(f"{self._location_path}/patients", "patients", **params)

    def _rows_for(self, path: str, key: str, patient_ids: set[str] | None) -> list[dict[str, Any]]:
        """A joined list (alerts or recalls) for these patients, or all of them (None)."""
        if patient_ids is None or len(patient_ids) > JOIN_BY_ID_LIMIT:
            return list(self._pages(path, key))
        wanted = sorted((p for p in patient_ids if p.isdigit()), key=int)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(wanted), IDS_PER_REQUEST):
            chunk = ",".join(wanted[start : start + IDS_PER_REQUEST])
            rows.extend(self._pages(path, key, patient_id=chunk))
        return rows

    def _changed_patient_ids(self, path: str, key: str, since: datetime) -> set[str]:
        rows = self._pages(path, key, updated_since=_since_param(since))
        return {str(r.get("patient_id")) for r in rows if r.get("patient_id") is not None}

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """Patients updated since `since` (inclusive; all when None), with alerts and recalls joined.

        A patient whose alert or recall changed is read too, even if the patient record did not
        change. Page numbers shift when a record changes mid-read; the later copy wins.
        """
        mapping = self.field_map()
        rows, anonymous = _latest(self.iter_patient_rows(since), "patient_id")
        alerts_path = f"{self._location_path}/clinical_alerts"
        recalls_path = f"{self._location_path}/recall_recommendations"
        wanted: set[str] | None = None
        if since is not None:
            wanted = {str(r["patient_id"]) for r in rows}
            extra = self._changed_patient_ids(alerts_path, "clinical_alerts", since)
            extra |= self._changed_patient_ids(recalls_path, "recall_recommendations", since)
            extra -= wanted
            for start in range(0, len(extra), IDS_PER_REQUEST):
                chunk = ",".join(sorted(extra, key=lambda p: (len(p), p))[start : start + IDS_PER_REQUEST])
                more, _ = _latest(
                    self._pages(f"{self._location_path}/patients", "patients", patient_id=chunk), "patient_id"
                )
                rows.extend(more)
            wanted |= extra
        alerts: dict[str, list[dict[str, Any]]] = {}
        for alert in self._rows_for(alerts_path, "clinical_alerts", wanted):
            alerts.setdefault(str(alert.get("patient_id")), []).append(alert)
        recalls: dict[str, list[dict[str, Any]]] = {}
        for recall in self._rows_for(recalls_path, "recall_recommendations", wanted):
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
        params = {"updated_since": _since_param(since)} if since is not None else {}
        rows, anonymous = _latest(
            self._pages(f"{self._location_path}/appointments", "appointments", **params), "appointment_id"
        )
        items = [(f"sycle-appointment:{r['appointment_id']}", r, appointment_draft(r)) for r in rows]
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
        params = {"updated_since": _since_param(since)} if since is not None else {}
        path = f"{self._location_path}/clinical_alerts"
        rows, anonymous = _latest(self._pages(path, "clinical_alerts", **params), "alert_id")
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

    # --- PmsClient: writes ---------------------------------------------------------------------------

    def _poster(self, path: str, payload: dict[str, Any], key: str, id_field: str) -> Callable[[], str | None]:
        """One POST of `payload`; the new record's id (`{key: {id_field}}`), or None when it names none."""

        def send() -> str | None:
            body = self.http.request("POST", path, retry=False, json=payload)
            row = body.get(key) if isinstance(body, dict) else None
            return str(row[id_field]) if isinstance(row, dict) and row.get(id_field) else None

        return send

    def _booking_payload(self, booking: BookingRequest) -> tuple[dict[str, Any], datetime]:
        try:
            marker = nvc_marker(booking.idempotency_key)
            starts = parse_pms_datetime(booking.starts_at, "start")
            ends = parse_pms_datetime(booking.ends_at, "end")
        except InvalidValue as exc:
            raise self._error("invalid_booking", f"the booking cannot be sent: {exc}.", "the booking request") from None
        if ends <= starts:
            raise self._error("invalid_booking", "the booking ends before it starts.", "the booking request")
        if not str(booking.pms_patient_id or "").strip():
            raise self._error("patient_not_found", "the booking has no patient id.", "the booking request")
        text = " ".join((booking.notes or "Booked on an NVC call").split())[:1500]
        payload = {
            "patient_id": _wire_id(booking.pms_patient_id),
            "start_time": starts.astimezone(UK_TZ).isoformat(),
            "end_time": ends.astimezone(UK_TZ).isoformat(),
            "appointment_type": APPOINTMENT_TYPES_OUT.get(booking.appointment_type, "Other"),
            "provider_id": booking.clinician_ref or None,
            "notes": f"{text} {marker}",
        }
        return payload, starts

    def find_booking(self, booking: BookingRequest) -> str | None:
        """The appointment an earlier attempt made (its NVC marker), or the patient's appointment at
        that very time; looked up in the patient's diary for that (UK) day."""
        starts = parse_pms_datetime(booking.starts_at, "start")
        rows = list(
            self._pages(
                f"{self._location_path}/appointments",
                "appointments",
                patient_id=str(booking.pms_patient_id).strip(),
                date=starts.astimezone(UK_TZ).date().isoformat(),
            )
        )
        for row in rows:
            if find_nvc_reference(row.get("notes")) == booking.idempotency_key and row.get("appointment_id"):
                return str(row["appointment_id"])
        for row in rows:
            if str(row.get("status") or "").lower() in ("cancelled", "canceled") or not row.get("appointment_id"):
                continue
            try:
                same = parse_pms_datetime(row.get("start_time"), "start") == starts
            except InvalidValue:
                continue
            if same and str(row.get("patient_id")) == str(booking.pms_patient_id):
                return str(row["appointment_id"])
        return None

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        payload, _ = self._booking_payload(booking)
        path = f"{self._location_path}/appointments"

        appointment_id, created = self.write_exactly_once(
            "booking",
            "booking",
            self._poster(path, payload, "appointment", "appointment_id"),
            lambda: self.find_booking(booking),
        )
        return BookingResult(appointment_id, created)

    def find_note(self, note: PatientNote) -> str | None:
        path = f"{self._location_path}/patients/{quote(str(note.pms_patient_id), safe='')}/communications"
        for row in self._pages(path, "communications", type="call"):
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
        payload = {
            "type": "call",
            "direction": "outbound",
            "outcome": CALL_OUTCOMES.get(note.outcome or "", "other"),
            "note": f"{heading}: {text} {marker}",
            "occurred_at": occurred.astimezone(UK_TZ).isoformat(),
        }
        path = f"{self._location_path}/patients/{quote(str(note.pms_patient_id), safe='')}/communications"

        note_id, created = self.write_exactly_once(
            "note",
            "note",
            self._poster(path, payload, "communication", "communication_id"),
            lambda: self.find_note(note),
        )
        return NoteResult(note_id, created)


class SycleResource(HttpPmsResource):
    """Sycle connections. Per practice: `account_url`, `location_id`, optional `field_map.<target>`
    (targets: last_eye_test, recall_due, mobile, phone, email, date_of_death); secret: `api_token`."""

    def required_settings(self) -> tuple[str, ...]:
        return ("account_url", "location_id")

    def optional_settings(self) -> tuple[str, ...]:
        return (*(FIELD_MAP_PREFIX + target for target in FIELD_MAP_TARGETS), *super().optional_settings())

    def required_secrets(self) -> tuple[str, ...]:
        return ("api_token",)

    def open(self, practice: Practice, credentials: dict[str, str]) -> SycleClient:
        checks = {"account_url": CHECK_URL, "location_id": CHECK_LOCATION, "api_token": CHECK_TOKEN}
        values = self.required_values(practice, credentials, PMS_NAME, checks)
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
            api_token=values["api_token"],
            field_map=field_map,
            **self.client_options(practice),
        )
