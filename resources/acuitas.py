"""Acuitas (by Ocuco), the practice-hosted PMS: NVC talks to the API service on the practice's server.

A practice connects with its server's address (`server_url`), the Acuitas database name
(`database`) and an Acuitas user set up for NVC (`api_username`, `api_password`; the user needs the
"API Read" and "Diary Write" roles). The API needs Acuitas 8.0 or later.

The dialect: a session token from `POST /acuitas/api/session`, sent as `X-Acuitas-Token` and renewed
once, transparently, when Acuitas says it expired; offset/limit paging in id order with
`modifiedSince` in UK local time; PascalCase records with day-first dates and local times without an
offset; clinical alerts as Acuitas codes. A patient's state comes from `RecordStatus` plus the
`Deceased` and `GoneAway` ticks (the ticks win: a receptionist ticks "deceased" without archiving),
contact preferences from the GDPR "Data Processing" screen (`DataProcessing.RecallConsent` and
`DataProcessing.Channels`), and the person to ask for from `ParentGuardian`. A status code, tick or
consent word this client does not know rejects the patient's row with the word in the reason (never
a guess: a guess could phone someone the practice has marked not to be).

The diary has no idempotency key, so a booking carries `nvc_marker(key)` at the start of its
`Comments` and is looked up (by patient and day) before it is made and after any response that was
lost. Call outcomes and call attempts both go to the patient's call notes, marked in `Reference`.
A booking's clinician is an Acuitas user code (`Optom`); `GET /clinicians` lists them with the GOC
number Acuitas holds for each (modelled, like the sandbox).

Every error becomes a `PmsError` with a stable `problem` code and what the practice should check.
The password and the session token travel only in the login body and the token header: no message
or log line here contains them (or the username).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, date, datetime
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
    RejectedRow,
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
    nvc_marker,
    parse_pms_datetime,
)
from resources.base import WRITES, ErrorRule, PmsClientBase, Secret
from resources.http import FailureWords, HttpPmsResource
from resources.protocol import ConnectionInfo

log = logging.getLogger(__name__)

PMS_NAME = "Acuitas"
API_PREFIX = "/acuitas/api"
MIN_VERSION = (8, 0)
MAX_PAGE_SIZE = 500  # Acuitas refuses larger pages
COMMENTS_MAX = 255  # diary Comments column width
NOTE_TEXT_MAX = 2000
REQUIRED_ROLES = ("API Read", "Diary Write")
MAX_PASSES = 3  # re-reads of a filtered list that changed while it was paged
SESSION_ERRORS = frozenset({"TOKEN_EXPIRED", "INVALID_TOKEN"})

# Acuitas clinical alert codes -> the recall rules' flags. Other codes (CAT, ...) pass through raw.
ALERT_CODES: dict[str, str] = {
    "DIA": "diabetic",
    "GLA": "glaucoma",
    "GLS": "glaucoma_suspect",
    "OHT": "ocular_hypertension",
    "FHG": "glaucoma_family_history",
    "BVA": "binocular_vision_anomaly",
    "AMB": "binocular_vision_anomaly",  # amblyopia, which Acuitas also raises from notes
    "SPX": "corrected_refractive_error",
    "PMY": "progressive_myopia",
}
# Diary status codes -> AppointmentStatus values ("arrived" is still a booking until it completes).
STATUS_CODES: dict[str, str] = {
    "BK": "booked",
    "ARR": "booked",
    "CMP": "completed",
    "CAN": "cancelled",
    "DNA": "no_show",
}
TYPE_CODES: dict[str, str] = {"ST": "eye_test", "CL": "contact_lens", "FU": "follow_up", "COL": "collection"}
TYPE_FOR_BOOKING: dict[str, str] = {kind: code for code, kind in TYPE_CODES.items()}
EXAM_TYPES: dict[str, str] = {"ST": "sight_test", "CL": "contact_lens_check", "FU": "follow_up"}
# Patient RecordStatus codes -> PatientStatus values (blank or absent, as from a server that predates
# the field, is active). The Deceased and GoneAway ticks outrank the code.
RECORD_STATUS: dict[str, str] = {
    "ACT": "active",
    "ARC": "inactive",  # archived
    "LFT": "inactive",  # left the practice
    "MRG": "inactive",  # merged into another record (which carries on)
    "DEC": "deceased",
    "": "active",
}
# Data Processing screen, per channel: opted in, opted out, never asked.
CHANNEL_CHOICES: dict[str, bool | None] = {"optin": True, "optout": False, "": None}
# Data Processing screen, consent to be recalled: only a refusal stops recalls (recall is care, and an
# unfinished or lapsed GDPR screen is not a "no").
RECALL_CONSENT: dict[str, bool] = {
    "agreed": False,
    "rejected": True,
    "tobecompleted": False,
    "expired": False,
    "": False,
}
_CHANNELS = (("Telephone", "phone"), ("SMS", "sms"), ("Email", "email"))
_TICKS: dict[str, bool] = {
    "true": True,
    "y": True,
    "yes": True,
    "1": True,
    "false": False,
    "n": False,
    "no": False,
    "0": False,
    "": False,
}

CHECK_LOGIN = (
    "the api_username and api_password: the Acuitas user set up for NVC (Acuitas > Administration > Users); "
    "passwords are case-sensitive and Acuitas may have made it expire"
)
CHECK_URL = (
    "the server_url setting (the https:// address and port of the Acuitas API service on the practice server), "
    "that the server is switched on with the Acuitas API service running, and that the practice's firewall, "
    "router port forwarding or VPN lets this server reach it"
)
CHECK_DATABASE = (
    "the database setting: the Acuitas database name exactly as the practice's Acuitas login screen lists it"
)
CHECK_ROLES = (
    'ask the practice\'s Acuitas administrator to give the NVC user the "API Read" and "Diary Write" roles '
    "(Acuitas > Administration > Users > Roles)"
)
CHECK_VERSION = (
    "the Acuitas version on the practice server (Help > About); the practice (or Ocuco support) can upgrade it"
)
WORDS = FailureWords(
    pms=PMS_NAME,
    throttler="Acuitas",
    answerer="the Acuitas server",
    place="the Acuitas server at ",
    heavy_user="the practice server's API",
    url_setting="server_url",
    check_url=CHECK_URL,
    check_server_error="that the Acuitas API service on the practice server is healthy (restart it if needed)",
    tls_owner="the practice server's",
)
CHECK_SLOT = "offer the patient another time; someone at the practice booked this slot first"
# Acuitas's answers beyond the ones every HTTP PMS shares (`{db}`: the database name). Its
# `ErrorCode`s that name a problem outrank the status (`first`).
ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(
        "database_not_found",
        "the Acuitas server has no database called {db!r}{said}.",
        CHECK_DATABASE,
        code="DATABASE_NOT_FOUND",
        first=True,
    ),
    ErrorRule(
        "patient_not_found",
        "Acuitas database {db} has no such patient{said}.",
        "whether the patient was merged or removed in Acuitas since the last sync; the next sync refreshes the list",
        code="PATIENT_NOT_FOUND",
        first=True,
        connection=False,
    ),
    ErrorRule(
        "slot_taken",
        "the diary slot is no longer free{said}.",
        CHECK_SLOT,
        code="SLOT_UNAVAILABLE",
        first=True,
        connection=False,
    ),
    ErrorRule(
        "session_expired",
        "Acuitas ended the API session straight after a fresh login{said}.",
        "the practice server's clock, and the API session timeout in Acuitas's server settings",
        status=401,
        code=SESSION_ERRORS,
    ),
    ErrorRule("invalid_credentials", "Acuitas rejected the API username or password{said}.", CHECK_LOGIN, status=401),
    ErrorRule(
        "insufficient_permissions",
        "the Acuitas user NVC logs in as lacks a role it needs{said}.",
        CHECK_ROLES,
        status=403,
    ),
    ErrorRule("slot_taken", "the diary slot is no longer free{said}.", CHECK_SLOT, status=409, connection=False),
    ErrorRule(
        "api_not_found",
        "{base_url} did not answer as an Acuitas API server (HTTP 404{said}).",
        CHECK_URL,
        status=404,
    ),
    ErrorRule(
        "invalid_{kind}",
        "Acuitas refused the {thing}{said}.",
        "the {thing} the call made (time, length, appointment type, optom code, text length)",
        status=(400, 422),
        on=WRITES,
        connection=False,
    ),
)


def uk_local(value: datetime, fmt: str = "%d/%m/%Y %H:%M:%S") -> str:
    """An instant as Acuitas wants it: UK wall-clock time, day first (a naive datetime is taken as UTC)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return aware.astimezone(UK_TZ).strftime(fmt)


def _uk_date_text(raw: Any) -> str | None:
    """A day-first date as Acuitas sends it; a `dd/mm/yyyy 00:00:00` from an older server keeps the date."""
    if raw is None:
        return None
    text = str(raw).strip()
    if re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4}\s+\d{1,2}:\d{2}(:\d{2})?", text):
        text = text.split()[0]
    return text


def _local_timestamp(raw: Any) -> datetime | None:
    if not raw:
        return None
    try:
        return parse_pms_datetime(str(raw), "Modified")
    except InvalidValue:
        return None


def _alerts(codes: Any) -> list[str]:
    out: list[str] = []
    for code in codes if isinstance(codes, list) else []:
        text = str(code).strip()
        flag = ALERT_CODES.get(text.upper(), text)
        if flag and flag not in out:
            out.append(flag)
    return out


def _text(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def _word(raw: Any) -> str:
    """A code or choice compared as Acuitas means it: case, spaces and hyphens do not matter."""
    return re.sub(r"[\s_-]+", "", "" if raw is None else str(raw)).lower()


def _tick(row: dict[str, Any], name: str, problems: list[str]) -> bool:
    raw = row.get(name)
    if isinstance(raw, bool):
        return raw
    tick = _TICKS.get(_word(raw))
    if tick is None:
        problems.append(f"Acuitas {name} {raw!r} is not a tick (true or false)")
        return False
    return tick


def acuitas_contact(row: dict[str, Any]) -> dict[str, Any]:
    """The status, contact and guardian fields of a `PatientDraft`, from one Acuitas patient.

    Raises `InvalidValue` naming every word it cannot read: an unknown `RecordStatus` code, a tick
    that is not true/false, a channel that is not OptIn/OptOut/blank, an unknown `RecallConsent`.
    """
    problems: list[str] = []
    code = str(row.get("RecordStatus") or "").strip().upper()
    status = RECORD_STATUS.get(code)
    died_on = _uk_date_text(row.get("DateOfDeath")) or None
    deceased, gone_away = _tick(row, "Deceased", problems), _tick(row, "GoneAway", problems)
    status_date = None
    if deceased or status == "deceased" or died_on:  # a date of death says so too
        status, status_date = "deceased", died_on
    elif gone_away:
        status, status_date = "gone_away", _uk_date_text(row.get("GoneAwayDate")) or None
    elif status is None:  # the ticks settle it whatever the code; without them the code must be known
        known = ", ".join(c for c in RECORD_STATUS if c)
        problems.append(f"Acuitas RecordStatus {code!r} is not known ({known})")

    screen = row.get("DataProcessing")
    if screen is None:
        screen = {}  # a server without the Data Processing screen records no preferences
    elif not isinstance(screen, dict):
        problems.append(f"Acuitas DataProcessing {str(screen)[:40]!r} is not a Data Processing record")
        screen = {}
    consent = screen.get("RecallConsent")
    no_recall = RECALL_CONSENT.get(_word(consent))
    if no_recall is None:
        problems.append(f"Acuitas RecallConsent {consent!r} is not known (Agreed, Rejected, To Be Completed, Expired)")
    raw_channels = screen.get("Channels")
    if raw_channels is None:
        raw_channels = {}
    elif not isinstance(raw_channels, dict):
        problems.append(f"Acuitas DataProcessing Channels {str(raw_channels)[:40]!r} is not a set of channel choices")
        raw_channels = {}
    choices: dict[str, bool | None] = {}
    for name, channel in _CHANNELS:
        raw = raw_channels.get(name)
        if _word(raw) not in CHANNEL_CHOICES:
            problems.append(f"Acuitas {name} choice {raw!r} is not known (OptIn, OptOut or blank)")
        choices[channel] = CHANNEL_CHOICES.get(_word(raw))
    if problems:
        raise InvalidValue("; ".join(problems))
    # Channels count as recorded once any was answered; then the consented ones, phone unless opted out.
    recorded = any(choice is not None for choice in choices.values())
    channels = [c for c, choice in choices.items() if choice or (c == "phone" and choice is None)]
    return {
        "status": status,
        "status_date": status_date,
        "phone_recall": choices["phone"],
        "no_recall": bool(no_recall),
        "channels": channels if recorded else None,
        "guardian_name": _text(row.get("ParentGuardian")),
    }


def acuitas_draft(row: dict[str, Any]) -> PatientDraft:
    """Translate one Acuitas patient into the shared draft; unknown alert codes are kept raw.

    Raises `InvalidValue` for a status or contact word it cannot read (see `acuitas_contact`).
    """
    parts = (row.get(k) for k in ("Address1", "Address2", "Town", "County", "Postcode"))
    return PatientDraft(
        pms_patient_id=_text(row.get("PatientId")),
        first_name=row.get("Forename"),
        last_name=row.get("Surname"),
        phones=[row.get("MobileTel"), row.get("HomeTel"), row.get("WorkTel")],
        date_of_birth=_uk_date_text(row.get("DateOfBirth")),
        email=_text(row.get("Email")),
        address=", ".join(str(p).strip() for p in parts if p and str(p).strip()) or None,
        last_eye_test_date=_uk_date_text(row.get("LastSightTest")),
        risk_flags=_alerts(row.get("ClinicalAlerts")),
        clinical_notes=_text(row.get("Notes")),
        recall_due_date=_uk_date_text(row.get("RecallDue")),
        updated_at=_local_timestamp(row.get("Modified")),
        **acuitas_contact(row),
    )


def acuitas_appointment_draft(row: dict[str, Any]) -> AppointmentDraft:
    status = str(row.get("Status") or "").strip().upper()
    kind = str(row.get("AppointmentType") or "").strip().upper()
    duration = row.get("Duration")
    try:
        minutes = int(duration) if duration not in (None, "") else None
    except (TypeError, ValueError):
        minutes = None
    comments = _text(row.get("Comments"))
    return AppointmentDraft(
        pms_appointment_id=_text(row.get("AppointmentId")),
        pms_patient_id=_text(row.get("PatientId")),
        starts_at=_text(row.get("Start")),  # local time: build_appointment reads it as UK wall-clock time
        duration_minutes=minutes if minutes and minutes > 0 else None,
        status=STATUS_CODES.get(status, status or None),
        appointment_type=TYPE_CODES.get(kind, "other"),
        clinician=_text(row.get("Optom")),
        notes=comments,
        nvc_reference=find_nvc_reference(comments),
        updated_at=_local_timestamp(row.get("Modified")),
    )


def acuitas_clinical_draft(row: dict[str, Any]) -> ClinicalDraft:
    exam_type = str(row.get("ExamType") or "").strip().upper()
    return ClinicalDraft(
        pms_record_id=_text(row.get("ExamId")),
        pms_patient_id=_text(row.get("PatientId")),
        exam_date=_uk_date_text(row.get("ExamDate")),
        record_type=EXAM_TYPES.get(exam_type, exam_type.lower() or None),
        flags=_alerts(row.get("ClinicalAlerts")),
        notes=_text(row.get("Notes")),
        iop_right_mmhg=_text(row.get("IopRight")),
        iop_left_mmhg=_text(row.get("IopLeft")),
        clinician=_text(row.get("Optom")),
        updated_at=_local_timestamp(row.get("Modified")),
    )


def parse_version(raw: Any) -> tuple[int, int] | None:
    match = re.match(r"\s*(\d+)\.(\d+)", str(raw or ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _error_code(body: Any) -> str:
    return str(body.get("ErrorCode") or "").strip().upper() if isinstance(body, dict) else ""


class _AcuitasSession(httpx.Auth):
    """Logs in on first use and sends `X-Acuitas-Token` on every call but the version probe.

    When Acuitas answers 401 `TOKEN_EXPIRED` (or `INVALID_TOKEN`, after a server restart) it logs in
    again once and repeats the request. A failed login's own answer (401 `AUTH_FAILED`, 404
    `DATABASE_NOT_FOUND`, ...) becomes the answer to the request, for the client to translate.
    """

    requires_response_body = True

    def __init__(self, database: str, username: str, password: str):
        self.session_url = ""  # set once the client has checked the server's address
        self._database = database
        self._username = username
        self._password = password
        self.token: str | None = None
        self._expires_at = 0.0
        self.logins = 0

    def __repr__(self) -> str:
        return "_AcuitasSession(<redacted>)"

    def _login_request(self) -> httpx.Request:
        body = {"database": self._database, "username": self._username, "password": self._password}
        return httpx.Request("POST", self.session_url, json=body, headers={"Accept": "application/json"})

    def _accept(self, response: httpx.Response) -> bool:
        if response.status_code != 200:
            return False
        try:
            body = response.json()
        except ValueError:
            return False
        token = body.get("token") if isinstance(body, dict) else None
        if not token:
            return False
        self.token = str(token)
        try:
            ttl = float(body.get("expiresIn") or 0)
        except (TypeError, ValueError):
            ttl = 0.0
        # Renew a little early when Acuitas says how long the token lives; the 401 path covers the rest.
        self._expires_at = time.monotonic() + ttl - 5 if ttl > 10 else math.inf
        self.logins += 1
        return True

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if request.url.path.endswith("/version"):
            yield request
            return
        fresh = False
        if self.token is None or time.monotonic() >= self._expires_at:
            self.token = None
            login = yield self._login_request()
            if not self._accept(login):
                return  # the login's error answers the request
            fresh = True
        request.headers["X-Acuitas-Token"] = self.token or ""
        response = yield request
        if fresh or response.status_code != 401:
            return
        try:
            code = _error_code(response.json())
        except ValueError:
            code = ""
        if code not in SESSION_ERRORS:
            return
        self.token = None
        login = yield self._login_request()
        if not self._accept(login):
            return
        request.headers["X-Acuitas-Token"] = self.token or ""
        yield request


class AcuitasClient(PmsClientBase):
    """One practice's connection to its Acuitas server (implements `PmsClient`)."""

    kind = PmsKind.ACUITAS
    pms_name = PMS_NAME
    words = WORDS
    errors = ERRORS
    fallback = ErrorRule(
        "bad_request",
        "Acuitas refused the request with HTTP {status}{said}.",
        "this is a bug in the Acuitas integration; report it with this message",
        connection=False,
    )

    def __init__(
        self,
        practice: Practice,
        *,
        server_url: str,
        database: str,
        username: str,
        password: str,
        page_size: int,
        timeout_seconds: float,
        max_attempts: int,
        backoff_seconds: float,
        transport: httpx.BaseTransport | None = None,
        ca_bundle: str | None = None,
    ):
        self.practice = practice
        self.database = database
        self.page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        self.max_attempts = max(1, max_attempts)
        self.backoff_seconds = backoff_seconds
        self._password = password
        self._username = username
        self._version: str | None = None
        self._auth = _AcuitasSession(database, username, password)
        self.http = self._open_http(
            server_url,
            "the server_url setting: it must be the https:// address of the Acuitas API service on "
            "the practice server (plain http:// is only allowed to this machine itself)",
            ca_bundle=ca_bundle,
            auth=self._auth,
            timeout_seconds=timeout_seconds,
            max_attempts=self.max_attempts,
            backoff_seconds=backoff_seconds,
            transport=transport,
        )
        self._prefix = "" if self.http.base_url.endswith(API_PREFIX) else API_PREFIX
        self._auth.session_url = f"{self.http.base_url}{self._prefix}/session"

    def __repr__(self) -> str:
        return f"AcuitasClient(practice={self.practice.practice_id!r}, database={self.database!r})"

    # --- errors ------------------------------------------------------------------------------------

    def _secrets(self) -> tuple[Secret, ...]:
        # The username too, should a message quote what Acuitas said about the login.
        return (
            Secret(self._auth.token or "", "<session token>"),
            Secret(self._password, "<password>"),
            Secret(self._username, "<api username>", whole_word=True),
        )

    def _reply(self, body: Any) -> tuple[str, str]:
        if isinstance(body, dict):
            return _error_code(body), str(body.get("Message") or "")
        return "", str(body or "")[:200]

    def _error_context(self) -> dict[str, Any]:
        return {**super()._error_context(), "db": self.database}

    # --- version and connection --------------------------------------------------------------------

    def _check_version(self) -> str:
        """Refuse servers before 8.0 (once per client: the first call of a sync does it too)."""
        if self._version is not None:
            return self._version
        body = self._get(f"{self._prefix}/version")
        raw = body.get("ProductVersion") if isinstance(body, dict) else None
        version = parse_version(raw)
        if version is None:
            raise self._fail(
                "api_not_found",
                f"{self.http.base_url} did not report an Acuitas version (got {str(raw)[:40]!r}).",
                CHECK_URL,
            )
        if version < MIN_VERSION:
            raise self._fail(
                "unsupported_version",
                f"Acuitas {version[0]}.{version[1]} is not supported: the API needs version "
                f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or later; ask the practice to upgrade.",
                CHECK_VERSION,
            )
        self._version = str(raw).strip()
        return self._version

    def test_connection(self) -> ConnectionInfo:
        """Check the version, log in (URL, database, username, password), then the user's roles."""
        version = self._check_version()
        session = self._get(f"{self._prefix}/session")
        roles = set(session.get("Roles") or []) if isinstance(session, dict) else set()
        missing = [role for role in REQUIRED_ROLES if role not in roles]
        if missing:
            names = " and ".join(f'"{r}"' for r in missing)
            raise self._fail(
                "insufficient_permissions",
                f"the Acuitas user NVC logs in as lacks the {names} role{'s' if len(missing) > 1 else ''} "
                "(reading patients needs API Read; writing bookings and call notes needs Diary Write).",
                CHECK_ROLES,
            )
        practice = self._get(f"{self._prefix}/practice")
        name = practice.get("PracticeName") if isinstance(practice, dict) else None
        return ConnectionInfo(
            pms=PMS_NAME,
            practice_name=name,
            version=version,
            detail=f"Acuitas database {self.database} on {self.http.base_url}",
        )

    # --- reads -------------------------------------------------------------------------------------

    def _iter_list(self, path: str, since: datetime | None, what: str, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every record of an offset-paged list, in Acuitas's id order, until `TotalCount` is reached.

        Records are never deleted and edits do not reorder the list, so a full read cannot skip a
        row. With `modifiedSince`, a record edited mid-read can join the list ahead of the current
        offset: the next page then repeats a row and the newcomer is not seen. `TotalCount` growing
        during a pass shows that happened, so the filtered list is read again (it is small), up to
        `MAX_PASSES` times. Repeated rows are for the caller to collapse (the later copy wins).
        """
        self._check_version()
        params: dict[str, Any] = {"limit": self.page_size, **filters}
        if since is not None:
            params["modifiedSince"] = uk_local(since)
        for _ in range(MAX_PASSES):
            offset, first_total, total = 0, None, 0
            while True:
                body = self._get(path, offset=offset, **params)
                records = body.get("Records") if isinstance(body, dict) else None
                page_total = body.get("TotalCount") if isinstance(body, dict) else None
                if not isinstance(records, list) or not isinstance(page_total, int):
                    raise self._fail(
                        "pms_error", f"Acuitas returned a {what} page without Records and TotalCount.", CHECK_URL
                    )
                total = page_total
                first_total = total if first_total is None else first_total
                for row in records:
                    # A malformed row is passed on (and ends as a rejected row), never silently dropped.
                    yield row if isinstance(row, dict) else {"unexpected": row}
                offset += len(records)
                if not records or offset >= total:
                    break
            if since is None or total == first_total:
                return
            log.info(
                "%s practice %s: %d %s records changed during the read; reading the changes again",
                PMS_NAME,
                self.practice.practice_id,
                total - (first_total or 0),
                what,
            )

    def iter_patient_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        return self._iter_list(f"{self._prefix}/patients", since, "patient")

    @staticmethod
    def _latest(
        rows: Iterator[dict[str, Any]], id_field: str
    ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """Offset paging repeats a row when a record that now matches `modifiedSince` joins the list
        ahead of the current page; keep the later copy of each id (rows only ever join, none leave)."""
        latest: dict[str, dict[str, Any]] = {}
        anonymous: list[dict[str, Any]] = []
        for row in rows:
            key = _text(row.get(id_field))
            if key:
                latest.pop(key, None)
                latest[key] = row
            else:
                anonymous.append(row)
        return latest, anonymous

    def _scope(self, since: datetime | None) -> str:
        return "full" if since is None else f"since {uk_local(since)} UK"

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """Patients modified since `since` (inclusive, to the second; all when None), normalised."""
        latest, anonymous = self._latest(self.iter_patient_rows(since), "PatientId")
        refs = [(pid, raw) for pid, raw in latest.items()]
        refs += [(f"acuitas:patient-without-id-{n}", raw) for n, raw in enumerate(anonymous, 1)]
        rows, unreadable = [], []
        for ref, raw in refs:
            try:
                rows.append((ref, raw, acuitas_draft(raw)))
            except InvalidValue as exc:  # a status or consent word this client cannot read
                unreadable.append(RejectedRow(ref, str(exc), raw))
        source_ref = f"acuitas:{self.database} patients {self._scope(since)}"
        result = collect(self.practice.practice_id, rows, today, strict=False, source_ref=source_ref)
        result.rejected.extend(unreadable)
        return result

    def _read_records(
        self,
        path: str,
        since: datetime | None,
        what: str,
        id_field: str,
        draft: Callable[[dict[str, Any]], Any],
        build: Callable[[Any], Any],
        identity: Callable[[Any], str],
    ) -> RecordBatch:
        latest, anonymous = self._latest(self._iter_list(path, since, what), id_field)
        rows = [(f"acuitas:{what}:{key}", raw, draft(raw)) for key, raw in latest.items()]
        rows += [(f"acuitas:{what}-without-id-{n}", raw, draft(raw)) for n, raw in enumerate(anonymous, 1)]
        source_ref = f"acuitas:{self.database} {what} {self._scope(since)}"
        return collect_records(rows, build, identity, source_ref=source_ref)

    def read_appointments(self, since: datetime | None) -> RecordBatch[Appointment]:
        """Diary entries modified since `since` (all when None); times become UTC."""
        practice_id = self.practice.practice_id
        return self._read_records(
            f"{self._prefix}/diary",
            since,
            "diary",
            "AppointmentId",
            acuitas_appointment_draft,
            lambda d: build_appointment(practice_id, d),
            lambda a: a.pms_appointment_id,
        )

    def read_clinical_records(self, since: datetime | None) -> RecordBatch[ClinicalRecord]:
        """Exam records modified since `since` (all when None), alerts mapped, IOPs as numbers."""
        practice_id = self.practice.practice_id
        today = datetime.now(UK_TZ).date()
        return self._read_records(
            f"{self._prefix}/clinical",
            since,
            "clinical",
            "ExamId",
            acuitas_clinical_draft,
            lambda d: build_clinical(practice_id, d, today),
            lambda r: r.pms_record_id,
        )

    def read_clinicians(self) -> list[Clinician]:
        """The users the diary books against (`GET /clinicians`, modelled), by their user code (a
        booking's `Optom`), with the GOC number Acuitas holds for each (`""`: none)."""
        latest, _ = self._latest(self._iter_list(f"{self._prefix}/clinicians", None, "clinician"), "UserCode")
        return [
            Clinician(
                self.practice.practice_id,
                code.upper(),
                _text(row.get("FullName")) or "",
                _text(row.get("GOCNumber")),
                _text(row.get("JobTitle")) or "",
            )
            for code, row in latest.items()
        ]

    # --- writes ------------------------------------------------------------------------------------

    def _poster(self, path: str, payload: dict[str, Any], id_field: str) -> Callable[[], str | None]:
        """One POST of `payload`; the new record's id, or None when Acuitas's answer names none."""

        def send() -> str | None:
            body = self.http.request("POST", path, retry=False, json=payload)
            return _text(body.get(id_field)) if isinstance(body, dict) else None

        return send

    def _find_booking(self, booking: BookingRequest, key: str, start_text: str) -> str | None:
        """The diary entry for this booking: the one carrying its marker, else an entry for the same
        patient at the same start that no NVC booking made (the practice already booked it)."""
        day = uk_local(booking.starts_at, "%d/%m/%Y")
        fallback = None
        for row in self._iter_list(f"{self._prefix}/diary", None, "diary", patientId=booking.pms_patient_id, date=day):
            marker = find_nvc_reference(_text(row.get("Comments")))
            if marker == key:
                return _text(row.get("AppointmentId"))
            status = str(row.get("Status") or "").upper()
            if marker is None and _text(row.get("Start")) == start_text and status not in ("CAN", "DNA"):
                fallback = fallback or _text(row.get("AppointmentId"))
        return fallback

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        """Book the slot once: `nvc_marker(key)` opens `Comments`; an existing entry is returned."""
        try:
            marker = nvc_marker(booking.idempotency_key)
        except InvalidValue as exc:
            raise self._error("invalid_booking", f"{exc}.", "this is a bug in the booking outbox") from None
        kind = TYPE_FOR_BOOKING.get(booking.appointment_type)
        minutes = math.ceil((booking.ends_at - booking.starts_at).total_seconds() / 60)
        problems = []
        if kind is None:
            problems.append(f"appointment type {booking.appointment_type!r} has no Acuitas diary type")
        if not 5 <= minutes <= 480:
            problems.append(f"a booking of {minutes} minutes is outside Acuitas's 5-480")
        if problems:
            raise self._error("invalid_booking", "; ".join(problems) + ".", "the booking the call made")
        start_text = uk_local(booking.starts_at, "%d/%m/%Y %H:%M")
        comments = f"{marker} {booking.notes or ''}".strip()[:COMMENTS_MAX]
        patient_ref: Any = int(booking.pms_patient_id) if booking.pms_patient_id.isdigit() else booking.pms_patient_id
        payload = {
            "PatientId": patient_ref,
            "Start": start_text,
            "Duration": minutes,
            "AppointmentType": kind,
            "Optom": booking.clinician_ref or "",
            "Comments": comments,
        }
        self._check_version()
        new_id, created = self.write_exactly_once(
            "booking",
            "booking",
            self._poster(f"{self._prefix}/diary", payload, "AppointmentId"),
            lambda: self._find_booking(booking, booking.idempotency_key, start_text),
        )
        return BookingResult(pms_appointment_id=new_id, created=created)

    def _find_note(self, patient_id: str, key: str) -> str | None:
        path = f"{self._prefix}/patients/{quote(patient_id, safe='')}/callnotes"
        for row in self._iter_list(path, None, "call note"):
            if find_nvc_reference(_text(row.get("Reference")), _text(row.get("NoteText"))) == key:
                return _text(row.get("CallNoteId"))
        return None

    def add_note(self, note: PatientNote) -> NoteResult:
        """A call outcome or call attempt as an Acuitas call note, marked in `Reference`, once."""
        try:
            marker = nvc_marker(note.idempotency_key)
        except InvalidValue as exc:
            raise self._error("invalid_note", f"{exc}.", "this is a bug in the notes outbox") from None
        label = "NVC call attempt" if note.kind == NoteKind.CALL_ATTEMPT else "NVC call outcome"
        default = "ATTEMPTED" if note.kind == NoteKind.CALL_ATTEMPT else "SPOKE"
        outcome = re.sub(r"[^A-Z0-9]+", "_", (note.outcome or default).upper()).strip("_")[:30] or default
        payload = {
            "Outcome": outcome,
            "NoteText": f"{label}: {note.text}".strip()[:NOTE_TEXT_MAX],
            "CallDateTime": uk_local(note.occurred_at),
            "Reference": marker,
        }
        path = f"{self._prefix}/patients/{quote(note.pms_patient_id, safe='')}/callnotes"
        self._check_version()
        new_id, created = self.write_exactly_once(
            "note",
            "call note",
            self._poster(path, payload, "CallNoteId"),
            lambda: self._find_note(note.pms_patient_id, note.idempotency_key),
        )
        return NoteResult(pms_note_id=new_id, created=created)


class AcuitasResource(HttpPmsResource):
    """Acuitas connections. Per practice: `server_url` (the practice server's Acuitas API address) and
    `database` (the Acuitas database name); secrets: `api_username`, `api_password`."""

    def required_settings(self) -> tuple[str, ...]:
        return ("server_url", "database")

    def required_secrets(self) -> tuple[str, ...]:
        return ("api_username", "api_password")

    def open(self, practice: Practice, credentials: dict[str, str]) -> AcuitasClient:
        checks = {
            "server_url": "the server_url setting: the https:// address (and port) of the Acuitas API on the practice "
            "server",
            "database": CHECK_DATABASE,
            "api_username": CHECK_LOGIN,
            "api_password": CHECK_LOGIN,
        }
        # The password is used exactly as stored (it may really start or end with a space).
        values = self.required_values(practice, credentials, PMS_NAME, checks, verbatim=("api_password",))
        return AcuitasClient(
            practice,
            server_url=values["server_url"],
            database=values["database"],
            username=values["api_username"],
            password=values["api_password"],
            **self.client_options(practice),
        )
