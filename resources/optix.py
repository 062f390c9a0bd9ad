"""Optix, the cloud PMS: a practice connects with an API key and its Optix Practice ID.

Reads: patients, appointments and clinical records come from `/api/v2/practices/{id}/...`, paged by
an opaque cursor in `(updatedAt, id)` order; an incremental sync passes `updatedSince`.

Writes: bookings (`POST .../appointments`) and call notes (`POST .../patients/{id}/notes`). Optix
has no idempotency keys, so each write carries NVC's key as an `[NVC:key]` marker in its
`externalReference`, and the client looks for that marker before creating and after any response it
did not get (a dropped connection, a timeout, a 5xx or 429) before posting again; a write is retried
a bounded number of times. The next sync reads the marker back into `Appointment.nvc_reference`.

Optix's words for reaching a patient become NVC's (`optix_contact`): `status` (`Active`,
`Deceased`, `GoneAway`, `Archived`; a word NVC does not know rejects the row, naming it) with
`deceasedDate` (a date of death means deceased, whatever `status` says), `contactPreferences`
(`phoneRecall`, `smsConsent`, `emailConsent`, `excludeFromRecalls`; null or missing means nothing
was recorded: phoning allowed, no consent channels known) and `responsibleAdult` (a child's
parent or guardian, the name NVC's caller asks for).

Every error becomes a `PmsError` with a stable `problem` code and what the practice should check.
The API key travels only in the Authorization header: no message or log line here ever contains it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote

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
    AppointmentDraft,
    ClinicalDraft,
    InvalidValue,
    PatientDraft,
    build_appointment,
    build_clinical,
    collect,
    collect_records,
    find_nvc_reference,
    nvc_marker,
    parse_pms_datetime,
    parse_yes_no,
)
from resources.base import WRITES, ErrorRule, PmsClientBase, Secret
from resources.http import FailureWords, HttpPmsResource, SecretAuth
from resources.protocol import ConnectionInfo, PmsError

PMS_NAME = "Optix"
API_PREFIX = "/api/v2"

# Optix clinical flag codes -> the recall rules' flags. Other codes pass through raw and are reported.
FLAG_CODES: dict[str, str] = {
    "DIAB": "diabetic",
    "GLAU": "glaucoma",
    "GLS": "glaucoma_suspect",
    "OHT": "ocular_hypertension",
    "FHG": "glaucoma_family_history",
    "BVA": "binocular_vision_anomaly",
    "RXC": "corrected_refractive_error",
    "MYP": "progressive_myopia",
}

# Optix patient statuses (lower-cased, letters only, so "GoneAway", "Gone Away" and "GONE_AWAY" agree)
# -> canonical `PatientStatus` values. Any other word is passed on as it is and rejects the row by name.
PATIENT_STATUSES: dict[str, str] = {
    "active": "active",
    "deceased": "deceased",
    "goneaway": "gone_away",
    "archived": "inactive",
}

# Optix appointment statuses (lower-cased) -> canonical. An unknown status is rejected with its value.
APPOINTMENT_STATUSES: dict[str, str] = {
    "booked": "booked",
    "arrived": "booked",  # in the waiting room: still a booking, not yet a completed test
    "completed": "completed",
    "cancelled": "cancelled",
    "dna": "no_show",
}
# Optix appointment types <-> canonical. Unknown Optix types read as "other"; "other" cannot be booked.
APPOINTMENT_TYPES: dict[str, str] = {
    "SIGHT_TEST": "eye_test",
    "CL_CHECK": "contact_lens",
    "FOLLOW_UP": "follow_up",
    "COLLECTION": "collection",
}
BOOKING_TYPES: dict[str, str] = {canonical: optix for optix, canonical in APPOINTMENT_TYPES.items()}
NOTE_CATEGORIES: dict[NoteKind, str] = {NoteKind.CALL_OUTCOME: "RECALL_CALL", NoteKind.CALL_ATTEMPT: "CALL_ATTEMPT"}
# How far either side of a booking's start the lookup searches for NVC's marker.
LOOKUP_WINDOW = timedelta(days=1)
CHECK_KEY = (
    "the API key in Optix > Settings > Integrations; copy it again, a typo or an expired/revoked key is the usual cause"
)
CHECK_URL = "the api_url setting, and that this server can reach it (firewall, proxy, network)"
CHECK_BUG = "this is a bug in the Optix integration or the booking sent to it; report it with this message"
WORDS = FailureWords(
    pms=PMS_NAME,
    throttler="Optix",
    answerer="Optix",
    place="",
    heavy_user="the same API key",
    url_setting="api_url",
    check_url=CHECK_URL,
    check_server_error="Optix's status page",
    tls_owner="the Optix API's",
)
CHECK_ACCESS = "ask the practice to enable API access in Optix settings"
# Optix's answers beyond the ones every HTTP PMS shares (`{pid}` is the Optix Practice ID).
ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule("invalid_credentials", "The API key was rejected{said}.", CHECK_KEY, status=401),
    ErrorRule(
        "api_access_disabled",
        "API access is disabled for Optix practice {pid}{said}.",
        CHECK_ACCESS,
        status=403,
        code="api_access_disabled",
    ),
    ErrorRule("forbidden", "Optix refused access to practice {pid}{said}.", CHECK_KEY, status=403),
    ErrorRule(
        "patient_not_found",
        "Optix practice {pid} has no such patient{said}.",
        "whether the patient was merged or removed in Optix; the next sync refreshes the patient list",
        status=404,
        code="patient_not_found",
        connection=False,
    ),
    ErrorRule(
        "practice_not_found",
        "Optix has no practice {pid} for this API key{said}.",
        "the practice_id setting (the Optix Practice ID, e.g. OPX-1234) and that the API key belongs to it",
        status=404,
    ),
    ErrorRule(
        "slot_taken",
        "The slot is no longer free in Optix{said}.",
        "offer the patient another time; the diary changed since the call offered this one",
        status=409,
        on="booking",
        connection=False,
    ),
    ErrorRule(
        "invalid_{kind}",
        "The {kind} cannot be sent to Optix: Optix refused it (HTTP {status}){said}.",
        CHECK_BUG,
        status=(400, 422),
        on=WRITES,
        connection=False,
    ),
)


def _yes_no(value: Any, unreadable: bool) -> bool | None:
    """An Optix boolean (JSON true/false; a yes/no string is read too); None when absent or blank,
    `unreadable` (the safe reading for that field) when it is neither."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and not value.strip():
        return None
    try:
        return parse_yes_no(value, "")
    except InvalidValue:
        return unreadable


def optix_status(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """`(status, date of death)` in NVC's words: `status` a `PatientStatus` value (None when Optix
    sent none: active), or Optix's own word when NVC does not know it, which `build_patient` rejects
    by name rather than guess. A `deceasedDate` means deceased, whatever `status` says."""
    raw = _str_or_none(row.get("status"))
    status = None if raw is None else PATIENT_STATUSES.get(re.sub(r"[^a-z]", "", raw.lower()), raw.strip())
    died = _str_or_none(row.get("deceasedDate"))
    return ("deceased" if died else status), died


def optix_contact(row: dict[str, Any]) -> dict[str, Any]:
    """`contactPreferences` and `responsibleAdult` as the `PatientDraft` contact fields.

    No block (null or missing): nothing recorded, so phoning is allowed and no channels are known.
    With one, the channels are phone (unless `phoneRecall` is false) plus SMS and email where
    consent is true; a value that is not a yes/no reads the safe way (no phoning, no consent,
    excluded from recalls).
    """
    prefs = row.get("contactPreferences")
    fields: dict[str, Any] = {"phone_recall": None, "no_recall": False, "channels": None}
    if isinstance(prefs, dict):
        phone = _yes_no(prefs.get("phoneRecall"), unreadable=False)
        sms = _yes_no(prefs.get("smsConsent"), unreadable=False)
        email = _yes_no(prefs.get("emailConsent"), unreadable=False)
        fields["phone_recall"] = phone
        fields["no_recall"] = bool(_yes_no(prefs.get("excludeFromRecalls"), unreadable=True))
        channels = [] if phone is False else ["phone"]
        if sms:
            channels.append("sms")
        if email:
            channels.append("email")
        fields["channels"] = channels
    adult = row.get("responsibleAdult")
    guardian: Any = None
    if isinstance(adult, dict):
        parts = (adult.get("title"), adult.get("forename"), adult.get("surname"))
        guardian = adult.get("name") or " ".join(str(p) for p in parts if p) or None
    elif isinstance(adult, str):
        guardian = adult
    fields["guardian_name"] = _str_or_none(guardian)
    return fields


def optix_draft(row: dict[str, Any]) -> PatientDraft:
    """Translate one Optix patient into the shared draft; unknown flag codes are kept raw."""
    contact = row.get("contact") or {}
    address = row.get("address") or {}
    flags: list[str] = []
    for code in row.get("clinicalFlags") or []:
        flag = FLAG_CODES.get(str(code).strip().upper(), str(code).strip())
        if flag and flag not in flags:
            flags.append(flag)
    parts = (address.get("line1"), address.get("line2"), address.get("town"), address.get("postcode"))
    status, died = optix_status(row)
    return PatientDraft(
        pms_patient_id=str(row.get("patientId") or "") or None,
        first_name=row.get("forename"),
        last_name=row.get("surname"),
        phones=[contact.get("mobile"), contact.get("home")],
        date_of_birth=row.get("dateOfBirth"),
        email=contact.get("email"),
        address=", ".join(str(p).strip() for p in parts if p and str(p).strip()) or None,
        last_eye_test_date=row.get("lastSightTest"),
        risk_flags=flags,
        clinical_notes=row.get("notes"),
        recall_due_date=row.get("recallDue"),
        updated_at=_parse_timestamp(row.get("updatedAt")),
        status=status,
        status_date=died,
        **optix_contact(row),
    )


def optix_appointment_draft(row: dict[str, Any]) -> AppointmentDraft:
    """Translate one Optix appointment; NVC's idempotency key is read back from `externalReference`."""
    status = str(row.get("status") or "").strip()
    kind = str(row.get("type") or "").strip().upper()
    return AppointmentDraft(
        pms_appointment_id=str(row.get("appointmentId") or "") or None,
        pms_patient_id=str(row.get("patientId") or "") or None,
        starts_at=row.get("start"),
        duration_minutes=_int_or_none(row.get("durationMinutes")),
        status=APPOINTMENT_STATUSES.get(status.lower(), status or None),
        appointment_type=APPOINTMENT_TYPES.get(kind, kind.lower() or None),
        clinician=_str_or_none(row.get("clinicianId")),
        notes=row.get("notes") if isinstance(row.get("notes"), str) else None,
        nvc_reference=find_nvc_reference(_str_or_none(row.get("externalReference")), _str_or_none(row.get("notes"))),
        updated_at=_parse_timestamp(row.get("updatedAt")),
    )


def optix_clinical_draft(row: dict[str, Any]) -> ClinicalDraft:
    """Translate one Optix clinical record; unknown flag codes are kept raw (and reported)."""
    iop = found if isinstance(found := row.get("iop"), dict) else {}
    flags: list[str] = []
    for code in row.get("flags") or []:
        flag = FLAG_CODES.get(str(code).strip().upper(), str(code).strip())
        if flag and flag not in flags:
            flags.append(flag)
    return ClinicalDraft(
        pms_record_id=str(row.get("recordId") or "") or None,
        pms_patient_id=str(row.get("patientId") or "") or None,
        exam_date=row.get("examDate"),
        flags=flags,
        notes=row.get("notes") if isinstance(row.get("notes"), str) else None,
        iop_right_mmhg=iop.get("right"),
        iop_left_mmhg=iop.get("left"),
        clinician=_str_or_none(row.get("optometristId")),
        updated_at=_parse_timestamp(row.get("updatedAt")),
    )


def _str_or_none(value: Any) -> str | None:
    return str(value) if value is not None and str(value).strip() else None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _latest_rows(rows: Iterable[dict[str, Any]], id_field: str) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """Rows by id, a later copy replacing an earlier one (a record edited while we page comes back
    behind the cursor, newer); rows without an id are kept apart so they end as rejected rows."""
    latest: dict[str, dict[str, Any]] = {}
    anonymous: list[dict[str, Any]] = []
    for row in rows:
        row_id = str(row.get(id_field) or "")
        if row_id:
            latest.pop(row_id, None)
            latest[row_id] = row
        else:
            anonymous.append(row)
    return latest, anonymous


def _parse_timestamp(raw: Any) -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(str(raw))
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _since_param(since: datetime) -> str:
    """`since` as Optix wants it: UTC ISO-8601 with `Z` (a naive datetime is taken as UTC)."""
    value = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class OptixClient(PmsClientBase):
    """One practice's Optix API connection (implements `PmsClient`)."""

    kind = PmsKind.OPTIX
    pms_name = PMS_NAME
    words = WORDS
    errors = ERRORS
    fallback = ErrorRule(
        "bad_request",
        "Optix refused the request with HTTP {status}{said}.",
        "this is a bug in the Optix integration; report it with this message",
        connection=False,
    )

    def __init__(
        self,
        practice: Practice,
        *,
        api_url: str,
        optix_practice_id: str,
        api_key: str,
        page_size: int,
        timeout_seconds: float,
        max_attempts: int,
        backoff_seconds: float,
        transport: httpx.BaseTransport | None = None,
        ca_bundle: str | None = None,
    ):
        self.practice = practice
        self.optix_practice_id = optix_practice_id
        self.page_size = page_size
        self._secret = api_key
        self.http = self._open_http(
            api_url,
            "the api_url setting: it must be the https:// address of the Optix API",
            ca_bundle=ca_bundle,
            auth=SecretAuth("Bearer", api_key),
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            transport=transport,
        )
        # Accept the API root with or without the version prefix.
        self._prefix = "" if self.http.base_url.endswith(API_PREFIX) else API_PREFIX
        self._practice_path = f"{self._prefix}/practices/{quote(optix_practice_id, safe='')}"

    def __repr__(self) -> str:
        return f"OptixClient(practice={self.practice.practice_id!r}, optix_practice_id={self.optix_practice_id!r})"

    # --- errors ------------------------------------------------------------------------------------

    def _secrets(self) -> tuple[Secret, ...]:
        return (Secret(self._secret, "<api key>"),)

    def _reply(self, body: Any) -> tuple[str, str]:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return str(error.get("code", "")), str(error.get("message", ""))
        return "", str(body or "")[:200]

    def _error_context(self) -> dict[str, Any]:
        return {**super()._error_context(), "pid": self.optix_practice_id}

    # --- PmsClient ---------------------------------------------------------------------------------

    def test_connection(self) -> ConnectionInfo:
        """Read the practice record: proves the URL, the key and the Practice ID in one call."""
        body = self._get(self._practice_path)
        if not isinstance(body, dict):
            raise self._fail("pms_error", "Optix returned an unexpected practice record.", CHECK_URL)
        if body.get("apiAccess") is False:
            raise self._fail(
                "api_access_disabled",
                f"API access is disabled for Optix practice {self.optix_practice_id}.",
                CHECK_ACCESS,
            )
        return ConnectionInfo(
            pms=PMS_NAME,
            practice_name=body.get("name"),
            version="api/v2",
            detail=f"Optix practice {body.get('practiceId', self.optix_practice_id)}",
        )

    def _iter_pages(self, path: str, what: str, params: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        """Every page of a list endpoint, following `nextCursor` to the end."""
        params = {"limit": self.page_size, **params}
        seen_cursors: set[str] = set()
        while True:
            body = self._get(path, **params)
            if not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise self._fail("pms_error", f"Optix returned a {what} page without a data list.", CHECK_URL)
            # A malformed row is passed on (and ends as a rejected row), never silently dropped.
            yield [row if isinstance(row, dict) else {"unexpected": row} for row in body["data"]]
            cursor = (body.get("pagination") or {}).get("nextCursor")
            if not cursor:
                return
            if cursor in seen_cursors:
                raise self._fail("pms_error", "Optix returned the same page cursor twice.", "Optix's status page")
            seen_cursors.add(cursor)
            params["cursor"] = cursor

    def _iter_rows(self, path: str, what: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every row of a list endpoint, page by page, following `nextCursor` to the end."""
        for page in self._iter_pages(path, what, params):
            yield from page

    def read_clinicians(self) -> list[Clinician]:
        """The practice's diary clinicians (`GET .../clinicians`) with the GOC numbers Optix holds."""
        out = []
        for row in self._iter_rows(f"{self._practice_path}/clinicians", "clinician", {}):
            ref = _str_or_none(row.get("clinicianId"))
            if ref:
                goc = _str_or_none(row.get("gocNumber"))
                name, role = str(row.get("name") or ""), str(row.get("role") or "")
                out.append(Clinician(self.practice.practice_id, ref, name, goc, role))
        return out

    @staticmethod
    def _since(since: datetime | None) -> dict[str, Any]:
        return {} if since is None else {"updatedSince": _since_param(since)}

    def _source_ref(self, what: str, since: datetime | None) -> str:
        scope = "full" if since is None else f"since {_since_param(since)}"
        return f"optix:{self.optix_practice_id} {what}{scope}"

    def iter_patient_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        """Every patient page by page, following `nextCursor` to the end."""
        return self._iter_rows(f"{self._practice_path}/patients", "patient", self._since(since))

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """Patients updated since `since` (inclusive; all when None), normalised.

        A patient edited while we page moves behind the cursor and comes back on a later page; the
        later copy is newer, so it replaces the earlier one instead of counting as a duplicate.
        """
        latest, anonymous = _latest_rows(self.iter_patient_rows(since), "patientId")
        rows = [(f"optix:{pid}", raw, optix_draft(raw)) for pid, raw in latest.items()]
        rows += [(f"optix:row-without-id-{n}", raw, optix_draft(raw)) for n, raw in enumerate(anonymous, 1)]
        source_ref = self._source_ref("", since)
        return collect(self.practice.practice_id, rows, today, strict=False, source_ref=source_ref)

    def iter_patients(self, since: datetime | None, today: date) -> Iterator[ReadResult]:
        """`read_patients` one Optix page at a time, each normalised as it arrives. A patient that
        comes back on a later page is left for the store to settle (the later copy wins there)."""
        source_ref = self._source_ref("", since)
        without_id = 0
        for page in self._iter_pages(f"{self._practice_path}/patients", "patient", self._since(since)):
            latest, anonymous = _latest_rows(page, "patientId")
            rows = [(f"optix:{pid}", raw, optix_draft(raw)) for pid, raw in latest.items()]
            rows += [
                (f"optix:row-without-id-{n}", raw, optix_draft(raw)) for n, raw in enumerate(anonymous, without_id + 1)
            ]
            without_id += len(anonymous)
            yield collect(self.practice.practice_id, rows, today, strict=False, source_ref=source_ref)

    def _appointment_reading(self) -> tuple[str, str, str, Callable[[Any], Any], Callable[[Any], Any], Callable]:
        return (
            "appointmentId",
            "appointment",
            "appointments",
            optix_appointment_draft,
            lambda draft: build_appointment(self.practice.practice_id, draft),
            lambda a: a.pms_appointment_id,
        )

    def _clinical_reading(self) -> tuple[str, str, str, Callable[[Any], Any], Callable[[Any], Any], Callable]:
        today = date.today()
        return (
            "recordId",
            "clinical",
            "clinical records",
            optix_clinical_draft,
            lambda draft: build_clinical(self.practice.practice_id, draft, today),
            lambda r: r.pms_record_id,
        )

    def read_appointments(self, since: datetime | None) -> RecordBatch[Appointment]:
        """Appointments changed since `since` (all when None), times in UTC, NVC's bookings linked
        by the key in `externalReference`."""
        rows = self._iter_rows(f"{self._practice_path}/appointments", "appointment", self._since(since))
        return self._batch(rows, *self._appointment_reading(), since)

    def iter_appointments(self, since: datetime | None) -> Iterator[RecordBatch[Appointment]]:
        """`read_appointments` one Optix page at a time."""
        pages = self._iter_pages(f"{self._practice_path}/appointments", "appointment", self._since(since))
        return self._batches(pages, *self._appointment_reading(), since)

    def read_clinical_records(self, since: datetime | None) -> RecordBatch[ClinicalRecord]:
        """Clinical records (exams, flags, IOPs, notes) changed since `since` (all when None)."""
        rows = self._iter_rows(f"{self._practice_path}/clinical-records", "clinical record", self._since(since))
        return self._batch(rows, *self._clinical_reading(), since)

    def iter_clinical_records(self, since: datetime | None) -> Iterator[RecordBatch[ClinicalRecord]]:
        """`read_clinical_records` one Optix page at a time."""
        pages = self._iter_pages(f"{self._practice_path}/clinical-records", "clinical record", self._since(since))
        return self._batches(pages, *self._clinical_reading(), since)

    def _batch(
        self,
        rows: Iterable[dict[str, Any]],
        id_field: str,
        kind: str,
        label: str,
        draft: Callable[[dict[str, Any]], Any],
        build: Callable[[Any], Any],
        identity: Callable[[Any], str],
        since: datetime | None,
        without_id: int = 0,
    ) -> RecordBatch:
        latest, anonymous = _latest_rows(rows, id_field)
        refs = [(f"optix:{kind}:{row_id}", raw) for row_id, raw in latest.items()]
        refs += [(f"optix:{kind}:row-without-id-{n}", raw) for n, raw in enumerate(anonymous, without_id + 1)]
        source_ref = self._source_ref(f"{label} ", since)
        return collect_records(((ref, raw, draft(raw)) for ref, raw in refs), build, identity, source_ref=source_ref)

    def _batches(
        self,
        pages: Iterable[list[dict[str, Any]]],
        id_field: str,
        kind: str,
        label: str,
        draft: Callable[[dict[str, Any]], Any],
        build: Callable[[Any], Any],
        identity: Callable[[Any], str],
        since: datetime | None,
    ) -> Iterator[RecordBatch]:
        without_id = 0
        for page in pages:
            yield self._batch(page, id_field, kind, label, draft, build, identity, since, without_id)
            without_id += sum(1 for row in page if not str(row.get(id_field) or ""))

    # --- writes ------------------------------------------------------------------------------------

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        """Book once: find NVC's marker first, post, and after any unanswered post look again
        before posting again. Raises `PmsError` (`slot_taken`, `patient_not_found`, `invalid_booking`,
        or `lost_response`/`pms_error`/`rate_limited`/`unreachable` when it could not be confirmed)."""

        def invalid(reason: str) -> PmsError:
            return self._error("invalid_booking", f"The booking cannot be sent to Optix: {reason}.", CHECK_BUG)

        try:
            marker = nvc_marker(booking.idempotency_key)
            start = parse_pms_datetime(booking.starts_at, "starts_at")
            end = parse_pms_datetime(booking.ends_at, "ends_at")
        except InvalidValue as exc:
            raise invalid(str(exc)) from None
        seconds = (end - start).total_seconds()
        if seconds <= 0 or seconds % 60:
            raise invalid(f"it must last a whole number of minutes (from {start.isoformat()} to {end.isoformat()})")
        kind = BOOKING_TYPES.get(booking.appointment_type)
        if kind is None:
            raise invalid(f"Optix has no appointment type for {booking.appointment_type!r}")
        patient_id = booking.pms_patient_id
        body: dict[str, Any] = {
            "patientId": patient_id,
            "start": _since_param(start),
            "durationMinutes": int(seconds // 60),
            "type": kind,
            "externalReference": marker,
            "notes": booking.notes,
        }
        if booking.clinician_ref:
            body["clinicianId"] = booking.clinician_ref
        path = f"{self._practice_path}/appointments"
        window = {
            "patientId": patient_id,
            "from": _since_param(start - LOOKUP_WINDOW),
            "to": _since_param(end + LOOKUP_WINDOW),
        }

        def find() -> str | None:
            for row in self._iter_rows(path, "appointment", window):
                if find_nvc_reference(_str_or_none(row.get("externalReference"))) == booking.idempotency_key:
                    return str(row.get("appointmentId") or "") or None
            return None

        send = self._poster(path, body, "appointmentId")
        pms_id, created = self.write_exactly_once("booking", f"booking {booking.idempotency_key}", send, find)
        return BookingResult(pms_id, created)

    def add_note(self, note: PatientNote) -> NoteResult:
        """Add a call outcome or call attempt to the patient's Optix record, once (same lookup
        before posting and after an unanswered post as bookings)."""

        def invalid(reason: str) -> PmsError:
            return self._error("invalid_note", f"The note cannot be sent to Optix: {reason}.", CHECK_BUG)

        try:
            marker = nvc_marker(note.idempotency_key)
            occurred = parse_pms_datetime(note.occurred_at, "occurred_at")
        except InvalidValue as exc:
            raise invalid(str(exc)) from None
        text = note.text.strip()
        if note.outcome:
            text = f"{text} [outcome: {note.outcome}]" if text else f"Outcome: {note.outcome}"
        if not text:
            raise invalid("its text is empty")
        path = f"{self._practice_path}/patients/{quote(note.pms_patient_id, safe='')}/notes"
        body = {
            "category": NOTE_CATEGORIES[NoteKind(note.kind)],
            "text": text,
            "occurredAt": _since_param(occurred),
            "externalReference": marker,
        }

        def find() -> str | None:
            for row in self._iter_rows(path, "note", {}):
                if find_nvc_reference(_str_or_none(row.get("externalReference"))) == note.idempotency_key:
                    return str(row.get("noteId") or "") or None
            return None

        send = self._poster(path, body, "noteId")
        pms_id, created = self.write_exactly_once("note", f"note {note.idempotency_key}", send, find)
        return NoteResult(pms_id, created)

    def _poster(self, path: str, body: dict[str, Any], id_field: str) -> Callable[[], str | None]:
        """One POST of `body`; the new record's id, or None when Optix's answer names none."""

        def send() -> str | None:
            answer = self.http.request("POST", path, retry=False, json=body)
            return str(answer[id_field]) if isinstance(answer, dict) and answer.get(id_field) else None

        return send


class OptixResource(HttpPmsResource):
    """Optix connections. Per practice: `practice_id` (the Optix Practice ID), optional `api_url`;
    secret: `api_key`."""

    page_size: int = 500
    default_api_url: str = "https://api.optix.cloud"

    def required_settings(self) -> tuple[str, ...]:
        return ("practice_id",)

    def optional_settings(self) -> tuple[str, ...]:
        return ("api_url", *super().optional_settings())

    def required_secrets(self) -> tuple[str, ...]:
        return ("api_key",)

    def open(self, practice: Practice, credentials: dict[str, str]) -> OptixClient:
        checks = {"practice_id": "the practice_id setting: the Practice ID shown in Optix > Settings > Integrations"}
        values = self.required_values(practice, credentials, PMS_NAME, {**checks, "api_key": CHECK_KEY})
        return OptixClient(
            practice,
            api_url=(practice.settings.get("api_url") or "").strip() or self.default_api_url,
            optix_practice_id=values["practice_id"],
            api_key=values["api_key"],
            **self.client_options(practice),
        )
