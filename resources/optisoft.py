"""Optisoft: the practice database lives on the practice's own server, and the Optisoft Connector
there connects OUT to Optisoft's relay. NVC talks to the relay only, never into the practice.

Settings: `server_address` (the relay's address, as shown in the Optisoft Connector) and
`practice_code`; secrets: `db_username` and `db_password`, the practice database login the
practice created for NVC, which the connector checks against the database on every request.

Every call is one named operation, `POST /relay/v1/practices/{code}/query` with
`{"operation", "params", "credentials"}`; the relay hands it to the connector and returns its answer
(`{"data": {"columns", "rows", "more"}}` for reads). Reads page by keyset on `(ModifiedDate, id)`.
Optisoft keeps times as UK wall-clock time, so times go out as Europe/London local time and come
back to UTC through `parse_pms_datetime`. Bookings go into the Diary against a GOC-registered
clinician, which is checked before anything is written (`clinicians.list` lists them for the GOC
checks; a clinician's reference is their GOC number); each write carries `nvc_marker(key)` so a
retry finds the first write instead of booking twice. Every error becomes a `PmsError` with a stable
`problem` code and what to check; the database login never appears in a message or a log line.

The patient record and its Recall tab, in NVC's words (`optisoft_draft`):

- Status ticks: `Deceased` (or a `DeceasedDate`) -> deceased, with the date of death; `GoneAway` ->
  gone_away; `Inactive` (archived) -> inactive; several ticked: the first of those wins.
- `NoTelephoneRecall` ticked -> no phone recall; `NoRecall` ticked -> no recall by any channel;
  `EmailConsent` / `SMSConsent` ticked -> the email / sms channel. Optisoft records no consent to be
  phoned, so the phone channel is listed unless `NoTelephoneRecall` is ticked. `ParentGuardian` ->
  the guardian to ask for.
- A tick box that reads as neither ticked nor unticked counts the way that never makes anyone
  callable: ticked for the boxes that stop calls, unticked for consent.
- Up to three recall categories per patient (Spectacles, Contact Lenses, Schemes), each with up to
  7 bands of months from the category's start date. The PMS recall date is when the Spectacles
  category falls due (its due date; without one, start date + band 1's months). Contact lens and
  scheme recalls are not eye tests and set no date.
- "Suppressed by Appointment" on the Spectacles category, with a Next Appointment from today on:
  the practice holds the recall until that visit, so the recall date is held to no earlier than the
  appointment's day. It only ever moves a date later, never creates one and never changes contact
  preferences; a tick whose appointment has passed is stale and ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

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
    map_risk_categories,
    nvc_marker,
    parse_pms_datetime,
    parse_uk_date,
)
from nvc_pipelines.recall import add_months
from resources.base import ErrorRule, Existing, PmsClientBase, Secret
from resources.http import FailureWords, HttpPmsResource, HttpStatusError
from resources.protocol import ConnectionInfo, PmsError

PMS_NAME = "Optisoft"
API_PREFIX = "/relay/v1"
UK = ZoneInfo("Europe/London")
GOC_NUMBER = re.compile(r"^0[12]-\d{5}$")  # 01- optometrist, 02- dispensing optician

# Optisoft's diary codes -> the canonical values, and back.
STATUSES = {"booked": "booked", "arrived": "booked", "completed": "completed", "cancelled": "cancelled"}
STATUSES |= {"dna": "no_show", "did not attend": "no_show"}
APPOINTMENT_TYPES = {"ST": "eye_test", "CLA": "contact_lens", "CLF": "contact_lens", "FU": "follow_up"}
APPOINTMENT_TYPES |= {"COL": "collection", "OTH": "other"}
APPT_TYPE_CODES = {"eye_test": "ST", "contact_lens": "CLA", "follow_up": "FU", "collection": "COL", "other": "OTH"}
NOTE_CATEGORIES = {NoteKind.CALL_ATTEMPT: "Call attempt", NoteKind.CALL_OUTCOME: "Call outcome"}
OUTCOME_LABELS = {
    "booked": "Booked",
    "no_answer": "No answer",
    "voicemail": "Left voicemail",
    "declined": "Declined",
    "wrong_number": "Wrong number",
    "callback": "Call back",
}

CHECK_SERVER = (
    "the server_address setting (the relay address shown in the Optisoft Connector's settings at the practice), "
    "and that this server can reach it (firewall, proxy, network)"
)
CHECK_LOGIN = (
    "the db_username and db_password secrets: the Optisoft database login the practice created for NVC "
    "(a typo, or a password changed at the practice, is the usual cause)"
)
CHECK_CODE = "the practice_code setting: the code shown in the Optisoft Connector at the practice (e.g. OS-1234)"
CHECK_CONNECTOR = (
    "that the Optisoft Connector service is running on the practice's server (Windows Services > Optisoft "
    "Connector), that the server is switched on, and that it can reach the internet over HTTPS"
)
CHECK_CLINICIAN = (
    "the clinician the booking names (clinician_ref): the GOC number of an active clinician in Optisoft > "
    "Admin > Clinicians; an eye test needs an optometrist (01-), not a dispensing optician (02-)"
)
CHECK_WRITE = "ask the practice to give NVC's database login write access (Optisoft > Admin > Database users)"
CHECK_BUG = "this is a bug in the Optisoft integration; report it with this message"
WORDS = FailureWords(
    pms=PMS_NAME,
    throttler="the relay",
    answerer="the Optisoft relay",
    place="the Optisoft relay at ",
    heavy_user="the relay",
    url_setting="server_address",
    check_url=CHECK_SERVER,
    check_server_error="Optisoft's status page, and the connector's log at the practice",
    tls_owner="the Optisoft relay's",
)

CHECK_REFUSED = "whether the patient was merged or archived in Optisoft"
CHECK_SLOT = "offer the patient another time; the diary changed since the slot was offered"
# The relay's and the connector's own codes, which arrive as 503/504 and say more than the status
# (so `first`), then what else the relay answers (`{pc}`: the practice code).
ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(
        "connector_offline",
        "the Optisoft Connector at practice {pc} is not connected to the relay{said}.",
        CHECK_CONNECTOR,
        code="CONNECTOR_OFFLINE",
        first=True,
    ),
    ErrorRule(
        "connector_timeout",
        "the Optisoft Connector at practice {pc} took the request but did not answer in time{said}.",
        "whether the practice's server is overloaded or its database slow; the next sync will retry",
        code="CONNECTOR_TIMEOUT",
        first=True,
    ),
    ErrorRule(
        "invalid_credentials",
        "the practice database refused the login{said}.",
        CHECK_LOGIN,
        code="DB_LOGIN_FAILED",
        first=True,
    ),
    ErrorRule(
        "practice_not_found",
        "the relay knows no practice with code {pc}{said}.",
        CHECK_CODE,
        code="PRACTICE_CODE_UNKNOWN",
        first=True,
    ),
    ErrorRule(
        "permission_denied",
        "NVC's database login may only read{said}.",
        CHECK_WRITE,
        code="DB_PERMISSION_DENIED",
        connection=False,
        first=True,
    ),
    # The connector's refusals of a booking or note.
    ErrorRule(
        "slot_taken", "Optisoft refused the write{said}.", CHECK_SLOT, code="SLOT_TAKEN", connection=False, first=True
    ),
    ErrorRule(
        "patient_not_found",
        "Optisoft refused the write{said}.",
        CHECK_REFUSED,
        code="PATIENT_NOT_FOUND",
        connection=False,
        first=True,
    ),
    ErrorRule(
        "invalid_clinician",
        "Optisoft refused the write{said}.",
        CHECK_CLINICIAN,
        code=("CLINICIAN_NOT_FOUND", "CLINICIAN_INACTIVE", "CLINICIAN_NOT_OPTOMETRIST"),
        connection=False,
        first=True,
    ),
    ErrorRule("pms_error", "{base_url} is not an Optisoft relay (HTTP 404){said}.", CHECK_SERVER, status=404),
)


def uk_local(value: datetime) -> datetime:
    """An instant as the practice's wall clock shows it (a naive datetime is taken as UTC)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return aware.astimezone(UK)


def uk_stamp(value: datetime) -> str:
    """An instant as Optisoft stores it: UK wall-clock time to the millisecond (naive is taken as UTC)."""
    local = uk_local(value)
    return local.strftime("%Y-%m-%d %H:%M:%S.") + f"{local.microsecond // 1000:03d}"


def since_param(since: datetime) -> str:
    """`since` as Optisoft compares it: UK wall-clock time to the millisecond, rounded down.

    In the hour the clocks go back, wall-clock times repeat, so a record changed in the second pass
    can carry an earlier time than `since` from the first pass. Then the bound drops to the start of
    that hour: a few records come twice (harmless), none is missed.
    """
    local = uk_local(since)
    if local.fold == 0 and local.replace(fold=1).utcoffset() != local.utcoffset():
        return local.strftime("%Y-%m-%d %H:00:00.000")
    return uk_stamp(since)


def _utc(raw: Any) -> datetime | None:
    try:
        return parse_pms_datetime(raw, "ModifiedDate") if raw else None
    except InvalidValue:
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _day(raw: Any) -> date | None:
    """A date Optisoft wrote (ISO, or ISO with a time as in the diary); None when it is not one."""
    if isinstance(raw, date):
        return raw if not isinstance(raw, datetime) else raw.date()
    text = str(raw or "").strip()
    try:
        return date.fromisoformat(text[:10]) if len(text) >= 10 and text[4] == "-" else parse_uk_date(text, "date")
    except (ValueError, InvalidValue):
        return None


def _int(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    try:
        return int(str(raw).strip())
    except ValueError:
        return None


# --- the patient record and its Recall tab, in NVC's words --------------------------------------------

# Optisoft's tick boxes are bit columns: 1 (or -1, Access/VB's True), or words as drivers and exports spell them.
_TICKED = frozenset({"1", "-1", "true", "t", "y", "yes"})
_UNTICKED = frozenset({"", "0", "false", "f", "n", "no"})
SPECTACLES = "ST"
RECALL_TYPES = {"ST": "Spectacles", "CL": "Contact Lenses", "SC": "Schemes"}  # one category of each per patient
MAX_BANDS = 7


def ticked(raw: Any, *, unreadable: bool) -> bool:
    """Whether a tick box is ticked. A value that is neither ticked nor unticked reads as `unreadable`:
    callers pass True for boxes that stop calls and False for consent, so it never makes anyone callable."""
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    if isinstance(raw, int | float):
        return raw != 0
    text = str(raw).strip().lower()
    if text in _TICKED:
        return True
    if text in _UNTICKED:
        return False
    return unreadable


def patient_status(row: dict[str, Any], today: date) -> tuple[str | None, str | None]:
    """(PatientStatus value or None for active, date of death) from the status ticks.

    A date of death without the tick still means deceased. A date of death that is not a date or is
    in the future is dropped (the tick stands): it must not get the row refused and leave an older,
    callable copy of the patient in place.
    """
    died_on = str(row.get("DeceasedDate") or "").strip()
    if ticked(row.get("Deceased"), unreadable=True) or died_on:
        day = _day(died_on)
        return "deceased", day.isoformat() if day and day <= today else None
    if ticked(row.get("GoneAway"), unreadable=True):
        return "gone_away", None
    if ticked(row.get("Inactive"), unreadable=True):
        return "inactive", None
    return None, None


def contact_preferences(row: dict[str, Any]) -> tuple[bool | None, bool, list[str] | None]:
    """(phone_recall, no_recall, channels) from the Recall tab's ticks; None where the row has no such
    column (a connector that does not serve them), which `build_patient` reads as "not recorded"."""
    phone_recall = None
    if "NoTelephoneRecall" in row:
        phone_recall = not ticked(row["NoTelephoneRecall"], unreadable=True)
    no_recall = ticked(row.get("NoRecall"), unreadable=True)
    channels = None
    if "SMSConsent" in row or "EmailConsent" in row:
        channels = ["phone"] if phone_recall is not False else []
        channels += [name for name, column in (("sms", "SMSConsent"), ("email", "EmailConsent"))
                     if ticked(row.get(column), unreadable=False)]  # fmt: skip
    return phone_recall, no_recall, channels


@dataclass(frozen=True, slots=True)
class RecallBand:
    """One band of a recall category: a letter `months` after the category's start date (not after
    the previous band), sent by `send_method` (Letter, Email, SMS or Telephone: how Optisoft sends it)."""

    band: int  # 1-7
    months: int
    letter: str | None = None
    send_method: str | None = None


@dataclass(frozen=True, slots=True)
class RecallCategory:
    """One of the patient's (up to three) recall categories on the Recall tab."""

    recall_type: str  # ST Spectacles, CL Contact Lenses, SC Schemes
    name: str | None
    start_date: str | None
    due_date: str | None  # when it falls due, as Optisoft keeps it
    suppressed_by_appointment: bool
    bands: tuple[RecallBand, ...]

    def falls_due(self) -> str | None:
        """The due date Optisoft keeps; without one, start date + the first band's months."""
        if self.due_date:
            return self.due_date
        start = _day(self.start_date)
        if start is None or not self.bands:
            return None
        return add_months(start, self.bands[0].months).isoformat()


def recall_bands(raw: Any) -> tuple[RecallBand, ...]:
    """A category's bands in band order. Optisoft has at most 7, numbered 1-7, each a positive number of
    months; anything else (band 0 or 8+, a repeated number, no months) is not one and is ignored."""
    bands: dict[int, RecallBand] = {}
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        number, months = _int(item.get("band")), _int(item.get("months"))
        if number is None or not 1 <= number <= MAX_BANDS or months is None or months <= 0 or number in bands:
            continue
        bands[number] = RecallBand(number, months, _text(item.get("letter")), _text(item.get("sendMethod")))
    return tuple(bands[n] for n in sorted(bands))


def recall_tab(raw: Any) -> dict[str, RecallCategory] | None:
    """The Recall tab (`RecallTab`, a JSON list of categories) by recall type; None when there is none to
    read. Should two categories of one type ever arrive, the one falling due first counts."""
    if raw is None:
        return None
    try:
        items = json.loads(raw) if isinstance(raw, str | bytes) else raw
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    tab: dict[str, RecallCategory] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("recallType") or "").strip().upper()
        if kind not in RECALL_TYPES:
            continue
        category = RecallCategory(
            recall_type=kind,
            name=_text(item.get("category")),
            start_date=_text(item.get("startDate")),
            due_date=str(item.get("dueDate") or "").strip() or None,
            suppressed_by_appointment=ticked(item.get("suppressedByAppointment"), unreadable=True),
            bands=recall_bands(item.get("bands")),
        )
        other = tab.get(kind)
        if other is None or (category.falls_due() or "9999") < (other.falls_due() or "9999"):
            tab[kind] = category
    return tab


def recall_due(row: dict[str, Any], today: date) -> str | None:
    """The PMS recall date: when the Spectacles category falls due, held to no earlier than the Next
    Appointment when "Suppressed by Appointment" is ticked and that appointment is today or later.

    Without a readable Recall tab (an older connector), the `RecallDue` column Optisoft also serves.
    """
    tab = recall_tab(row.get("RecallTab"))
    if tab is None:
        return _text(row.get("RecallDue"))
    spectacles = tab.get(SPECTACLES)
    if spectacles is None:
        return None
    due = spectacles.falls_due()
    if not spectacles.suppressed_by_appointment:
        return due
    due_day, appointment = _day(due), _day(row.get("NextAppointment"))
    if due_day is None or appointment is None or appointment < today:
        return due  # no date to hold, or a stale tick: the appointment has passed
    return max(due_day, appointment).isoformat()


def optisoft_draft(row: dict[str, Any], today: date | None = None) -> PatientDraft:
    """One `Patients` row (with its Recall tab joined on) as the shared draft."""
    today = today or datetime.now(UK).date()
    address = ", ".join(str(row[k]).strip() for k in ("Address1", "Town", "Postcode") if row.get(k))
    status, status_date = patient_status(row, today)
    phone_recall, no_recall, channels = contact_preferences(row)
    return PatientDraft(
        pms_patient_id=_text(row.get("PatientID")),
        first_name=row.get("Forename"),
        last_name=row.get("Surname"),
        phones=[row.get("Mobile"), row.get("HomePhone")],
        date_of_birth=row.get("DOB"),
        email=row.get("Email"),
        address=address or None,
        last_eye_test_date=row.get("LastExamDate"),
        risk_category=row.get("Alerts"),  # "Diabetic; FH glaucoma": mapped, unknown alerts kept raw
        clinical_notes=row.get("Notes"),
        recall_due_date=recall_due(row, today),
        updated_at=_utc(row.get("ModifiedDate")),
        status=status,
        status_date=status_date,
        phone_recall=phone_recall,
        no_recall=no_recall,
        channels=channels,
        guardian_name=_text(row.get("ParentGuardian")),
    )


def appointment_draft(row: dict[str, Any]) -> AppointmentDraft:
    """One `Diary` row: a UK local start and a duration; the NVC reference is read from the comment."""
    status = str(row.get("Status") or "").strip()
    appt_type = str(row.get("ApptType") or "").strip().upper()
    duration = row.get("Duration")
    return AppointmentDraft(
        pms_appointment_id=_text(row.get("DiaryID")),
        pms_patient_id=_text(row.get("PatientID")),
        starts_at=row.get("StartDateTime"),
        duration_minutes=int(duration) if isinstance(duration, int | float) and duration > 0 else None,
        status=STATUSES.get(status.lower(), status or None),
        appointment_type=APPOINTMENT_TYPES.get(appt_type, "other"),
        clinician=row.get("ClinicianName"),
        notes=row.get("Comment"),
        nvc_reference=find_nvc_reference(row.get("Comment")),
        updated_at=_utc(row.get("ModifiedDate")),
    )


def clinical_draft(row: dict[str, Any]) -> ClinicalDraft:
    """One `Exams` row; its alert labels become canonical flags, unknown ones stay raw."""
    known, unknown = map_risk_categories(row.get("Alerts"))
    return ClinicalDraft(
        pms_record_id=_text(row.get("ExamID")),
        pms_patient_id=_text(row.get("PatientID")),
        exam_date=row.get("ExamDate"),
        record_type="sight_test",
        flags=known + unknown,
        notes=row.get("Notes"),
        iop_right_mmhg=row.get("IOPR"),
        iop_left_mmhg=row.get("IOPL"),
        clinician=row.get("ClinicianName"),
        updated_at=_utc(row.get("ModifiedDate")),
    )


class OptisoftClient(PmsClientBase):
    """One practice's Optisoft connection through the relay (implements `PmsClient`)."""

    kind = PmsKind.OPTISOFT
    pms_name = PMS_NAME
    words = WORDS
    errors = ERRORS
    fallback = ErrorRule(
        "bad_request", "Optisoft refused the request with HTTP {status}{said}.", CHECK_BUG, connection=False
    )

    def __init__(
        self,
        practice: Practice,
        *,
        server_address: str,
        practice_code: str,
        db_username: str,
        db_password: str,
        page_size: int,
        timeout_seconds: float,
        max_attempts: int,
        backoff_seconds: float,
        transport: httpx.BaseTransport | None = None,
        ca_bundle: str | None = None,
    ):
        self.practice = practice
        self.practice_code = practice_code
        self.page_size = page_size
        self._credentials = {"username": db_username, "password": db_password}
        self.http = self._open_http(
            server_address,
            "the server_address setting: it must be the https:// address of the Optisoft relay",
            ca_bundle=ca_bundle,
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            transport=transport,
        )
        prefix = "" if self.http.base_url.endswith(API_PREFIX) else API_PREFIX
        self._query_path = f"{prefix}/practices/{quote(practice_code, safe='')}/query"

    def __repr__(self) -> str:
        return f"OptisoftClient(practice={self.practice.practice_id!r}, practice_code={self.practice_code!r})"

    # --- errors ------------------------------------------------------------------------------------

    def _secrets(self) -> tuple[Secret, ...]:
        # Servers echo logins in any case (SQL Server logins are case-insensitive).
        return (
            Secret(self._credentials["password"], "<db password>"),
            Secret(self._credentials["username"], "<db username>", whole_word=True),
        )

    def _reply(self, body: Any) -> tuple[str, str]:
        if isinstance(body, dict):
            return str(body.get("code") or ""), str(body.get("message") or "")
        return "", str(body or "")[:200]

    def _error_context(self) -> dict[str, Any]:
        return {**super()._error_context(), "pc": self.practice_code}

    # --- the relay -------------------------------------------------------------------------------

    def _send(self, operation: str, params: dict[str, Any], *, retry: bool) -> dict[str, Any]:
        """One operation through the relay; raises the raw HTTP/transport error for the caller."""
        body = {"operation": operation, "params": params, "credentials": self._credentials}
        answer = self.http.request("POST", self._query_path, retry=retry, json=body)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict):
            raise self._fail("pms_error", f"the relay's answer to {operation} had no data.", CHECK_SERVER)
        return data

    def _query(self, operation: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A read: safe to retry, so transient failures are retried by `PmsHttp`."""
        try:
            return self._send(operation, params or {}, retry=True)
        except (HttpStatusError, httpx.TransportError) as exc:
            raise self._translate(exc) from None

    def _result_set(self, operation: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        """`{"columns", "rows"}` as dicts; a malformed row is passed on (to end as a rejected row)."""
        columns, rows = data.get("columns"), data.get("rows")
        if not isinstance(columns, list) or not isinstance(rows, list):
            raise self._fail("pms_error", f"the answer to {operation} was not a result set.", CHECK_SERVER)
        return [dict(zip(columns, row, strict=False)) if isinstance(row, list) else {"unexpected": row} for row in rows]

    def _rows(self, operation: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._result_set(operation, self._query(operation, params))

    def iter_rows(self, operation: str, id_column: str, since: datetime | None) -> Iterator[dict[str, Any]]:
        """Every row of a keyset-paged operation in `(ModifiedDate, id)` order, page by page."""
        params: dict[str, Any] = {"limit": self.page_size}
        if since is not None:
            params["modifiedSince"] = since_param(since)
        while True:
            data = self._query(operation, params)
            records = self._result_set(operation, data)
            yield from records
            if not data.get("more"):
                return
            last: dict[str, Any] = next((r for r in reversed(records) if "unexpected" not in r), {})
            key = [last.get("ModifiedDate"), last.get(id_column)]
            if not isinstance(key[0], str) or key[1] is None or key == params.get("after"):
                raise self._fail("pms_error", f"{operation} paging did not move on.", "Optisoft's status page")
            params["after"] = key

    def _latest(self, operation: str, id_column: str, since: datetime | None) -> list[tuple[str, dict[str, Any]]]:
        """Rows by id; a row edited while we page moves behind the key and comes back later, newer."""
        latest: dict[str, dict[str, Any]] = {}
        anonymous: list[dict[str, Any]] = []
        for row in self.iter_rows(operation, id_column, since):
            row_id = _text(row.get(id_column))
            if row_id:
                latest.pop(row_id, None)
                latest[row_id] = row
            else:
                anonymous.append(row)
        out = list(latest.items())
        out += [(f"row-without-id-{n}", row) for n, row in enumerate(anonymous, 1)]
        return out

    def _scope(self, kind: str, since: datetime | None) -> str:
        scope = "full" if since is None else f"since {since_param(since)} UK"
        return f"optisoft:{self.practice_code} {kind} {scope}"

    # --- PmsClient: reads ------------------------------------------------------------------------

    def test_connection(self) -> ConnectionInfo:
        """`practice.info` proves the relay, the practice code, the running connector and the login."""
        data = self._query("practice.info")
        can_write = bool(data.get("canWrite"))
        rights = "read and write" if can_write else "only read (bookings and call notes cannot be written back)"
        return ConnectionInfo(
            pms=PMS_NAME,
            practice_name=data.get("practiceName"),
            version=data.get("optisoftVersion"),
            detail=f"Optisoft practice {self.practice_code} via the Optisoft Connector; the database login can {rights}",
        )

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """Patients changed since `since` (all when None) with their Recall tab joined on. A recall
        edited on its own (a new date, the Suppressed by Appointment tick) changes no patient row, so an
        incremental read also asks which recalls changed and fetches those patients."""
        rows = self._latest("patients.list", "PatientID", since)
        if since is not None:
            seen = {row_id for row_id, _ in rows}
            changed = self._rows("recalls.changed", {"modifiedSince": since_param(since)})
            missing = [str(r.get("PatientID")) for r in changed if str(r.get("PatientID")) not in seen]
            for start in range(0, len(missing), 500):
                extra = self._rows("patients.get", {"patientIds": missing[start : start + 500]})
                rows += [(str(row.get("PatientID")), row) for row in extra]
        drafts = [(f"optisoft:patient:{row_id}", raw, optisoft_draft(raw, today)) for row_id, raw in rows]
        return collect(
            self.practice.practice_id, drafts, today, strict=False, source_ref=self._scope("patients", since)
        )

    def read_appointments(self, since: datetime | None) -> RecordBatch[Appointment]:
        rows = self._latest("appointments.list", "DiaryID", since)
        drafts = [(f"optisoft:diary:{row_id}", raw, appointment_draft(raw)) for row_id, raw in rows]
        return collect_records(
            drafts,
            lambda d: build_appointment(self.practice.practice_id, d),
            lambda a: a.pms_appointment_id,
            source_ref=self._scope("diary", since),
        )

    def read_clinical_records(self, since: datetime | None) -> RecordBatch[ClinicalRecord]:
        today = datetime.now(UK).date()
        rows = self._latest("exams.list", "ExamID", since)
        drafts = [(f"optisoft:exam:{row_id}", raw, clinical_draft(raw)) for row_id, raw in rows]
        return collect_records(
            drafts,
            lambda d: build_clinical(self.practice.practice_id, d, today),
            lambda r: r.pms_record_id,
            source_ref=self._scope("exams", since),
        )

    def read_clinicians(self) -> list[Clinician]:
        """Admin > Clinicians (`clinicians.list`): the active clinicians with the GOC number Optisoft
        holds. Optisoft's diary books by that number, so it is their reference; one without a number
        is `clinician-<ClinicianID>` (no booking can name them). One who is not active has left the
        practice and is not listed (Optisoft refuses bookings for them)."""
        out = []
        for row in self._rows("clinicians.list"):
            clinician_id = _text(row.get("ClinicianID"))
            if clinician_id is None or not ticked(row.get("Active"), unreadable=True):
                continue
            number = str(row.get("GOCNumber") or "").strip() or None
            ref = number or f"clinician-{clinician_id}"
            name, role = str(row.get("Name") or ""), str(row.get("Role") or "")
            out.append(Clinician(self.practice.practice_id, ref, name, number, role))
        return out

    # --- PmsClient: writes -----------------------------------------------------------------------

    def _goc_number(self, booking: BookingRequest) -> str:
        """The booking's GOC number, if it is well formed and fits the appointment (no call needed)."""
        goc = (booking.clinician_ref or "").strip()
        if not goc:
            raise self._error(
                "invalid_clinician",
                "a booking needs the clinician's GOC number (Optisoft's diary is per clinician).",
                CHECK_CLINICIAN,
            )
        if not GOC_NUMBER.fullmatch(goc):
            raise self._error(
                "invalid_clinician",
                f"{goc[:30]!r} is not a GOC registration number (01-12345 for an optometrist, 02-12345 for a "
                "dispensing optician).",
                CHECK_CLINICIAN,
            )
        if booking.appointment_type == "eye_test" and not goc.startswith("01-"):
            raise self._error(
                "invalid_clinician",
                f"{goc} is a dispensing optician (02-); an eye test must be booked with an optometrist (01-).",
                CHECK_CLINICIAN,
            )
        return goc

    def _check_clinician(self, goc: str) -> None:
        """`invalid_clinician` unless the GOC number names an active clinician at this practice."""
        found = self._rows("clinicians.get", {"gocNumber": goc})
        if not found:
            raise self._error(
                "invalid_clinician",
                f"no clinician with GOC number {goc} is set up in this practice's Optisoft.",
                CHECK_CLINICIAN,
            )
        if not found[0].get("Active"):
            raise self._error(
                "invalid_clinician",
                f"{found[0].get('Name') or 'the clinician'} ({goc}) is not active in this practice's Optisoft.",
                CHECK_CLINICIAN,
            )

    def _booking_params(self, booking: BookingRequest, goc: str, marker: str) -> dict[str, Any]:
        def invalid(message: str) -> PmsError:
            return self._error("invalid_booking", message, CHECK_BUG)

        if booking.starts_at.tzinfo is None or booking.ends_at.tzinfo is None:
            raise invalid("the booking's times have no time zone.")
        start = booking.starts_at.astimezone(UK)
        if start.second or start.microsecond:
            raise invalid(f"the booking starts at {start:%H:%M:%S}; Optisoft's diary books whole minutes.")
        minutes = (booking.ends_at - booking.starts_at) / timedelta(minutes=1)
        if minutes != int(minutes) or not 5 <= minutes <= 480:
            raise invalid(f"the booking lasts {minutes:g} minutes; it must be 5 to 480 whole minutes.")
        appt_type = APPT_TYPE_CODES.get(booking.appointment_type)
        if appt_type is None:
            raise invalid(f"appointment type {booking.appointment_type!r} is not one Optisoft's diary has.")
        comment = " ".join(filter(None, [(booking.notes or "").strip(), marker]))
        return {
            "patientId": booking.pms_patient_id,
            "start": start.strftime("%Y-%m-%d %H:%M"),
            "duration": int(minutes),
            "apptType": appt_type,
            "gocNumber": goc,
            "comment": comment,
            "marker": marker,
        }

    def _marker(self, key: str) -> str:
        try:
            return nvc_marker(key)
        except InvalidValue as exc:
            raise self._error("invalid_booking", str(exc), CHECK_BUG) from None

    def _find(self, operation: str, id_column: str, marker: str) -> str | None:
        rows = self._rows(operation, {"marker": marker})
        return _text(rows[0].get(id_column)) if rows else None

    def _sender(self, operation: str, params: dict[str, Any], id_column: str) -> Callable[[], str | Existing | None]:
        """One write through the relay (not retried by `PmsHttp`: `write_exactly_once` decides). The
        connector refuses a second row with the same marker and names the first (`created: false`)."""

        def send() -> str | Existing | None:
            data = self._send(operation, params, retry=False)
            written = _text(data.get(id_column))
            if not written:
                return None
            return Existing(written) if data.get("created") is False else written

        return send

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        """Book into Optisoft's Diary exactly once, against a valid, active GOC-registered clinician.

        Refusals: `invalid_clinician`, `invalid_booking`, `slot_taken`, `patient_not_found`,
        `permission_denied` (a read-only database login)."""
        marker = self._marker(booking.idempotency_key)
        goc = self._goc_number(booking)
        params = self._booking_params(booking, goc, marker)
        book = self._sender("diary.book", params, "DiaryID")
        checked: list[bool] = []

        def send() -> str | Existing | None:
            if not checked:  # after the look-up: a booking an earlier attempt made stands as it is
                self._check_clinician(goc)
                checked.append(True)
            return book()

        diary_id, created = self.write_exactly_once(
            "booking", "diary.book", send, lambda: self._find("diary.find", "DiaryID", marker)
        )
        return BookingResult(diary_id, created=created)

    def add_note(self, note: PatientNote) -> NoteResult:
        """A call attempt or call outcome in the patient's `ContactLog`, exactly once."""
        marker = self._marker(note.idempotency_key)
        outcome = OUTCOME_LABELS.get(note.outcome or "", (note.outcome or "").replace("_", " ").capitalize() or None)
        params = {
            "patientId": note.pms_patient_id,
            "contactDate": uk_stamp(note.occurred_at),
            "method": "Telephone",
            "category": NOTE_CATEGORIES.get(note.kind, "Call outcome"),
            "outcome": outcome,
            "notes": " ".join(filter(None, [note.text.strip(), marker])),
            "marker": marker,
        }
        log_id, created = self.write_exactly_once(
            "note",
            "contactlog.add",
            self._sender("contactlog.add", params, "LogID"),
            lambda: self._find("contactlog.find", "LogID", marker),
        )
        return NoteResult(log_id, created=created)


class OptisoftResource(HttpPmsResource):
    """Optisoft connections through the Optisoft relay. Per practice: `server_address` (the relay)
    and `practice_code`; secrets: `db_username` and `db_password` (the practice database login)."""

    timeout_seconds: float = 45.0  # above the relay's own wait for the connector, so it reports a slow one
    max_attempts: int = 4
    page_size: int = 500

    def required_settings(self) -> tuple[str, ...]:
        return ("server_address", "practice_code")

    def required_secrets(self) -> tuple[str, ...]:
        return ("db_username", "db_password")

    def open(self, practice: Practice, credentials: dict[str, str]) -> OptisoftClient:
        checks = {
            "server_address": CHECK_SERVER,
            "practice_code": CHECK_CODE,
            "db_username": CHECK_LOGIN,
            "db_password": CHECK_LOGIN,
        }
        values = self.required_values(practice, credentials, PMS_NAME, checks, verbatim=("db_password",))
        return OptisoftClient(
            practice,
            server_address=values["server_address"],
            practice_code=values["practice_code"],
            db_username=values["db_username"],
            db_password=values["db_password"],
            **self.client_options(practice),
        )
