"""An Acuitas-style practice server on loopback: database login, session tokens, offset paging.

Acuitas (by Ocuco) runs on a server in the practice, not in the cloud, and its API shows its age.
The dialect the client has to cope with:

- everything under `/acuitas/api`; `GET /version` answers without logging in (servers before 8.0
  answer nothing else: they have no API);
- `POST /session` with `{"database", "username", "password"}` gives `{"token", "expiresIn"}`;
  every other call sends `X-Acuitas-Token`. Users carry roles: reads need "API Read", writes
  "Diary Write";
- lists are paged by `offset`/`limit` (`{"TotalCount", "Offset", "Records"}`), in id order, filtered
  by `modifiedSince=dd/mm/yyyy HH:MM:SS` in UK local time;
- PascalCase fields, UK day-first dates, local times without an offset, blanks as `""` rather than
  null, clinical alerts as Acuitas codes;
- a patient's state as Acuitas keeps it: `RecordStatus` (`ACT` active, `ARC` archived, `LFT` left
  the practice, `MRG` merged into another record, `DEC` deceased), the `Deceased` tick with
  `DateOfDeath`, the `GoneAway` tick (post came back) with `GoneAwayDate` (a moved-away record stays
  `ACT`), and `ParentGuardian` (the person to ask for, as the practice typed it);
- contact preferences from Acuitas's GDPR "Data Processing" screen, as `DataProcessing`:
  `RecallConsent` (`Agreed`, `Rejected`, `To Be Completed`, `Expired`) and `Channels` with
  `Telephone`, `SMS` and `Email` each `OptIn`, `OptOut` or `""` (never asked);
- errors as `{"Status": "Error", "ErrorCode", "Message"}`;
- the diary has no idempotency key: a booking is found again by what was written into `Comments`;
- `GET /clinicians` (modelled: Acuitas publishes no API reference) lists the users the diary books
  against, `{"UserCode", "FullName", "JobTitle", "GOCNumber"}` (`""` when none is held), paged like
  the other lists; a booking's `Optom` is a `UserCode`. Beside the seeded clinicians every database
  lists `seed.ODD_STAFF` (a suspended, an erased and an unregistered number, a mistyped one, none).
"""

from __future__ import annotations

import hmac
import random
import re
import secrets
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from nvc_pipelines.normalise import find_nvc_reference
from sandboxes.base import HttpProblem, Request, Response, SandboxServer
from sandboxes.seed import (
    ODD_STAFF,
    SeedClinical,
    SeedClinician,
    SeedPatient,
    SeedStaff,
    seed_appointments,
    seed_clinical_records,
    seed_clinicians,
    seed_patients,
)

BASE = "/acuitas/api"
UK_TZ = ZoneInfo("Europe/London")
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
COMMENTS_MAX = 255
NOTE_TEXT_MAX = 2000
REFERENCE_MAX = 100
BUILD_NUMBER = "1045"
ROLE_READ = "API Read"
ROLE_DIARY = "Diary Write"

# Canonical flag -> Acuitas clinical alert code. Anything else a test stores is rendered verbatim.
ACUITAS_ALERT_CODES: dict[str, str] = {
    "diabetic": "DIA",
    "glaucoma": "GLA",
    "glaucoma_suspect": "GLS",
    "ocular_hypertension": "OHT",
    "glaucoma_family_history": "FHG",
    "binocular_vision_anomaly": "BVA",
    "corrected_refractive_error": "SPX",
    "progressive_myopia": "PMY",
}
# Alerts Acuitas also raises that the recall rules do not use: derived from the seeded notes.
_NOTE_ALERTS = (("amblyopia", "AMB"), ("cataract", "CAT"))
STATUS_CODES: dict[str, str] = {"booked": "BK", "completed": "CMP", "cancelled": "CAN", "no_show": "DNA"}
TYPE_CODES: dict[str, str] = {"eye_test": "ST", "contact_lens": "CL", "follow_up": "FU", "collection": "COL"}
# Canonical patient status -> Acuitas RecordStatus. A moved-away record stays ACT, with the GoneAway
# tick; a status Acuitas does not have (one a test stores) is rendered verbatim.
RECORD_STATUS_CODES: dict[str, str] = {"active": "ACT", "deceased": "DEC", "gone_away": "ACT", "inactive": "ARC"}
_PRACTICE_NAMES = ("Opticians", "Eyecare", "Optometrists", "Vision Centre")
_TITLES = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "dame", "rev"}

P = TypeVar("P", bound=SeedClinician | SeedStaff)
PATIENT_BASE = 100_000
APPOINTMENT_BASE = 500_000
EXAM_BASE = 800_000
NOTE_BASE = 900_000


def uk_date(value: date | None) -> str:
    return value.strftime("%d/%m/%Y") if value else ""


def uk_timestamp(value: datetime) -> str:
    """An aware instant as Acuitas writes it: UK wall-clock time, day first, no offset."""
    return value.astimezone(UK_TZ).strftime("%d/%m/%Y %H:%M:%S")


def opt(consent: bool | None) -> str:
    """A channel on the Data Processing screen: opted in, opted out, or never asked."""
    return "" if consent is None else "OptIn" if consent else "OptOut"


def database_seed(seed: int, database: str) -> int:
    return seed * 1_000_003 + zlib.crc32(database.encode())


def _optom_code_base(name: str) -> str:
    words = [w for w in re.split(r"[\s.]+", name) if w and w.lower().strip(".") not in _TITLES]
    letters = [re.sub(r"[^A-Za-z]", "", w) for w in words]
    letters = [w for w in letters if w]
    if not letters:
        return "OPT"
    return (letters[0][0] + letters[-1][:2]).upper()


def acuitas_optoms(clinicians: Sequence[P]) -> dict[str, P]:
    """Acuitas user codes (initials: first-name initial + two letters of the surname) per clinician
    (or member of staff): the first in the list keeps the plain code."""
    codes: dict[str, P] = {}
    for clinician in clinicians:
        base = code = _optom_code_base(clinician.name)
        n = 1
        while code in codes:
            n += 1
            code = f"{base}{n}"
        codes[code] = clinician
    return codes


def optom_codes(database: str, seed: int = 7) -> dict[str, SeedClinician]:
    """The Optom codes a sandbox database uses (the same as `AcuitasSandbox(seed=seed)` serves)."""
    return acuitas_optoms(seed_clinicians(database_seed(seed, database)))


def _add_months(day: date, months: int) -> date:
    month0 = day.month - 1 + months
    year, month = day.year + month0 // 12, month0 % 12 + 1
    for d in (day.day, 30, 29, 28):
        try:
            return date(year, month, d)
        except ValueError:
            continue
    raise ValueError(day)  # pragma: no cover


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HttpProblem:
    return HttpProblem(status, {"Status": "Error", "ErrorCode": code, "Message": message}, headers)


def _parse_local(raw: Any, formats: tuple[str, ...], what: str) -> datetime:
    text = str(raw or "").strip()
    for fmt in formats:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    expected = " or ".join(f.replace("%d", "dd").replace("%m", "mm").replace("%Y", "yyyy") for f in formats)
    expected = expected.replace("%H", "HH").replace("%M", "MM").replace("%S", "SS")
    raise _error(400, "VALIDATION_ERROR", f"{what} must be {expected} (UK local time).")


def _check_contact_changes(changes: dict[str, Any]) -> None:
    """Refuse an edit of the contact fields that the renderer could not show faithfully."""
    problems = []
    if "status" in changes and not (isinstance(changes["status"], str) and changes["status"].strip()):
        problems.append("status must be a word (active, deceased, gone_away, inactive)")
    for name in ("phone_recall", "no_recall"):
        if name in changes and not isinstance(changes[name], bool):
            problems.append(f"{name} must be True or False")
    for name in ("sms_consent", "email_consent"):
        if name in changes and changes[name] is not None and not isinstance(changes[name], bool):
            problems.append(f"{name} must be True, False or None")
    if "status_date" in changes and changes["status_date"] is not None and not isinstance(changes["status_date"], date):
        problems.append("status_date must be a date or None")
    if (
        "guardian_name" in changes
        and changes["guardian_name"] is not None
        and not isinstance(changes["guardian_name"], str)
    ):
        problems.append("guardian_name must be text or None")
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(slots=True)
class _DiaryEntry:
    appointment_id: int
    patient_id: int
    start: datetime  # naive UK local time, as the diary is kept
    duration: int
    status: str
    appointment_type: str
    optom: str | None
    comments: str
    modified: datetime  # aware UTC
    booked_by: str = "RECEPTION"

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.duration)


@dataclass(slots=True)
class _CallNote:
    note_id: int
    patient_id: int
    outcome: str
    text: str
    call_time: datetime  # naive UK local
    reference: str
    created_by: str
    created: datetime  # aware UTC


@dataclass(slots=True)
class _Session:
    username: str
    database: str
    expires_at: float  # time.monotonic()
    revoked: bool = False


@dataclass(slots=True)
class _Database:
    """One Acuitas database (one practice): patients, diary, exams and call notes, with id-ordered indexes."""

    name: str
    practice_name: str
    patients: dict[int, SeedPatient]
    patient_ids: list[int]
    diary: dict[int, _DiaryEntry]
    diary_ids: list[int]
    exams: dict[int, SeedClinical]
    exam_ids: list[int]
    exam_optom: dict[int, str]
    optoms: dict[str, SeedClinician]
    staff: dict[str, SeedStaff]  # other users the practice lists (`ODD_STAFF`): bookable, never seeded in the diary
    call_notes: dict[int, list[_CallNote]] = field(default_factory=dict)
    rendered: dict[int, dict[str, Any]] = field(default_factory=dict)
    filtered: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (list, since) -> ids
    slots: dict[tuple[str | None, date], list[int]] = field(default_factory=dict)  # (optom, day) -> diary ids
    next_appointment: int = APPOINTMENT_BASE + 1
    next_note: int = NOTE_BASE + 1


class AcuitasSandbox(SandboxServer):
    """A faithful stand-in for an Acuitas practice server's REST API, served for real over HTTP.

    `databases` maps database names to patient counts; `users` maps API usernames to
    `(password, roles)` and may log in to any database. Each database is seeded from
    `(seed, database)` on first use. `version` is the Acuitas version the server reports; servers
    before 8.0 answer only `GET /acuitas/api/version`.
    """

    name = "acuitas"
    problem = staticmethod(_error)
    stock_errors = {
        404: ("NOT_FOUND", "No API route {path}."),
        429: ("RATE_LIMITED", "Too many requests; try again shortly."),
        500: ("INTERNAL_ERROR", "An unexpected error occurred."),
        503: ("SERVICE_UNAVAILABLE", "The Acuitas API service is starting."),
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        databases: dict[str, int] | None = None,
        users: dict[str, tuple[str, set[str]]] | None = None,
        version: str = "8.2.1",
        seed: int = 7,
        rate_limit_per_second: float = 50.0,
        today: date | None = None,
    ):
        super().__init__(host, port, seed=seed, rate_limit_per_second=rate_limit_per_second)
        self.databases: dict[str, int] = dict(databases if databases is not None else {"ACUITAS_DEMO": 50})
        default_users = {"nvc_api": ("demo-password", {ROLE_READ, ROLE_DIARY})}
        self.users: dict[str, tuple[str, set[str]]] = {
            name: (password, set(roles)) for name, (password, roles) in (users or default_users).items()
        }
        self.version = version
        self.seed = seed
        self.today = today
        self.token_ttl_seconds = 1200.0
        self.logins = 0  # successful POST /session, so tests can prove a re-login happened
        self._sessions: dict[str, _Session] = {}
        self._data: dict[str, _Database] = {}
        self.route("GET", BASE + "/version", self._get_version)
        if self.version_tuple >= (8, 0):  # Acuitas 7 has no API at all: only the version probe answers
            self.route("POST", BASE + "/session", self._login)
            self.route("GET", BASE + "/session", self._get_session)
            self.route("GET", BASE + "/practice", self._get_practice)
            self.route("GET", BASE + "/patients", self._list_patients)
            self.route("GET", BASE + "/patients/{patient_id}", self._get_patient)
            self.route("GET", BASE + "/patients/{patient_id}/callnotes", self._list_call_notes)
            self.route("POST", BASE + "/patients/{patient_id}/callnotes", self._add_call_note)
            self.route("GET", BASE + "/diary", self._list_diary)
            self.route("POST", BASE + "/diary", self._book)
            self.route("GET", BASE + "/clinical", self._list_clinical)
            self.route("GET", BASE + "/clinicians", self._list_clinicians)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", self.version)[:3])

    @property
    def product_version(self) -> str:
        parts = self.version.split(".")
        return self.version if len(parts) >= 4 else ".".join(parts + ["0"] * (3 - len(parts)) + [BUILD_NUMBER])

    # --- data --------------------------------------------------------------------------------------

    def _load(self, database: str) -> _Database:
        """The database, seeded on first use."""
        return self.once(self._data, database, lambda: self._seed(database))

    def _seed(self, database: str) -> _Database:
        seed = database_seed(self.seed, database)
        records = seed_patients(self.databases[database], seed=seed, today=self.today)
        users = acuitas_optoms([*seed_clinicians(seed), *ODD_STAFF])
        optoms = {code: c for code, c in users.items() if isinstance(c, SeedClinician)}
        staff = {code: s for code, s in users.items() if isinstance(s, SeedStaff)}
        code_of = {c.code: code for code, c in optoms.items()}
        diary: dict[int, _DiaryEntry] = {}
        for a in seed_appointments(records, seed=seed, today=self.today):
            entry = _DiaryEntry(
                appointment_id=APPOINTMENT_BASE + a.index,
                patient_id=PATIENT_BASE + a.patient_index,
                start=a.starts_at,
                duration=a.duration_minutes,
                status=STATUS_CODES[a.status],
                appointment_type=TYPE_CODES[a.appointment_type],
                optom=code_of[a.clinician.code],
                comments=a.notes or "",
                modified=a.updated_at,
            )
            diary[entry.appointment_id] = entry
        exams = {EXAM_BASE + c.index: c for c in seed_clinical_records(records, seed=seed, today=self.today)}
        rng = random.Random(seed)
        name = f"{rng.choice(records).last_name if records else 'Demo'} {rng.choice(_PRACTICE_NAMES)}"
        data = _Database(
            name=database,
            practice_name=name,
            patients={PATIENT_BASE + p.index: p for p in records},
            patient_ids=sorted(PATIENT_BASE + p.index for p in records),
            diary=diary,
            diary_ids=sorted(diary),
            exams=exams,
            exam_ids=sorted(exams),
            exam_optom={i: code_of[c.clinician.code] for i, c in exams.items()},
            optoms=optoms,
            staff=staff,
            next_appointment=max(diary, default=APPOINTMENT_BASE) + 1,
        )
        for entry in diary.values():
            data.slots.setdefault((entry.optom, entry.start.date()), []).append(entry.appointment_id)
        return data

    def patient_count(self, practice_ref: str) -> int:
        return len(self._load(practice_ref).patients)

    def patients(self, database: str) -> dict[str, SeedPatient]:
        """The database's current records (after any edit), by Acuitas PatientId (as a string)."""
        data = self._load(database)
        with self.lock:
            return {str(pid): data.patients[pid] for pid in data.patient_ids}

    def optom_codes(self, database: str) -> dict[str, SeedClinician]:
        return dict(self._load(database).optoms)

    def staff_codes(self, database: str) -> dict[str, SeedStaff]:
        """The other users the database lists as clinicians (`ODD_STAFF`), by Acuitas user code."""
        return dict(self._load(database).staff)

    def diary_entries(self, database: str) -> list[dict[str, Any]]:
        """Every diary entry as the API renders it, in id order."""
        data = self._load(database)
        with self.lock:
            return [self._render_entry(data.diary[i]) for i in data.diary_ids]

    def exams(self, database: str) -> list[dict[str, Any]]:
        data = self._load(database)
        with self.lock:
            return [self._render_exam(data, i) for i in data.exam_ids]

    def update_patient(
        self, database: str, patient_id: str | int, *, now: datetime | None = None, **changes: Any
    ) -> SeedPatient:
        """Change fields of one `SeedPatient` as a receptionist would, bumping `Modified`.

        `flags` may hold alert codes Acuitas knows but the recall rules do not; they are sent verbatim.
        The contact fields are NVC's words, rendered in Acuitas's: `status` ("deceased", "gone_away",
        "inactive", "active"; any other word is sent verbatim as the `RecordStatus`), `status_date`
        (the date of death, or the gone-away date), `phone_recall`, `no_recall`, `sms_consent` and
        `email_consent` (None: never asked) and `guardian_name`.
        """
        _check_contact_changes(changes)
        data = self._load(database)
        with self.lock:
            return self._edit(data, int(patient_id), now or datetime.now(UTC), changes)

    def seed_records(self, practice_ref: str) -> dict[str, SeedPatient]:
        """What the database holds, in NVC's words, by PatientId as the API sends it (the contract
        compares the client's translation of each rendered patient against these)."""
        return self.patients(practice_ref)

    def add_patient(self, database: str, *, now: datetime | None = None, **fields: Any) -> str:
        """Register a new patient (next PatientId) copied from the first one with `fields` changed."""
        data = self._load(database)
        with self.lock:
            new_id = (data.patient_ids[-1] if data.patient_ids else PATIENT_BASE) + 1
            template = data.patients[data.patient_ids[0]]
            stamp = (now or datetime.now(UTC)).astimezone(UTC)
            data.patients[new_id] = replace(template, index=new_id - PATIENT_BASE, **fields, updated_at=stamp)
            data.patient_ids.append(new_id)
            self._changed(data, "patients")
        return str(new_id)

    def touch(self, practice_ref: str, count: float | int, now: datetime | None = None) -> list[str]:
        """Edit some patients (a new mobile, or a sight test today) so an incremental sync sees them.

        A float is a fraction of the database, an int a count. Returns the touched PatientIds.
        """
        data = self._load(practice_ref)
        stamp = now or datetime.now(UTC)
        with self.lock:
            chosen = self.touch_sample(list(data.patient_ids), count, database_seed(self.seed, practice_ref), stamp)
            day = stamp.astimezone(UK_TZ).date()
            for k, patient_id in enumerate(chosen):
                self._edit(data, patient_id, stamp, self.touch_change(data.patients[patient_id], k, day))
        return [str(pid) for pid in chosen]

    def _edit(self, data: _Database, patient_id: int, stamp: datetime, changes: dict[str, Any]) -> SeedPatient:
        new = replace(data.patients[patient_id], **changes, updated_at=stamp.astimezone(UTC))
        data.patients[patient_id] = new
        data.rendered.pop(patient_id, None)
        self._changed(data, "patients")
        return new

    @staticmethod
    def _changed(data: _Database, kind: str) -> None:
        for key in [k for k in data.filtered if k[0] == kind]:
            del data.filtered[key]

    def expire_tokens(self) -> int:
        """End every session now, as Acuitas does after its idle timeout; returns how many ended."""
        with self.lock:
            live = [s for s in self._sessions.values() if not s.revoked]
            for session in live:
                session.revoked = True
        return len(live)

    def nvc_appointments(self, practice_ref: str) -> list[dict[str, Any]]:
        """Diary entries carrying an NVC marker in `Comments` (what NVC booked)."""
        data = self._load(practice_ref)
        with self.lock:
            entries = [data.diary[i] for i in data.diary_ids]
        out = []
        for e in entries:
            key = find_nvc_reference(e.comments)
            if key:
                out.append(
                    {
                        "pms_appointment_id": str(e.appointment_id),
                        "pms_patient_id": str(e.patient_id),
                        "starts_at": e.start.replace(tzinfo=UK_TZ).astimezone(UTC),
                        "duration_minutes": e.duration,
                        "optom": e.optom,
                        "status": e.status,
                        "nvc_reference": key,
                    }
                )
        return out

    def nvc_notes(self, practice_ref: str) -> list[dict[str, Any]]:
        """Call notes carrying an NVC marker in `Reference` (what NVC wrote)."""
        data = self._load(practice_ref)
        with self.lock:
            notes = [n for pid in sorted(data.call_notes) for n in data.call_notes[pid]]
        out = []
        for n in notes:
            key = find_nvc_reference(n.reference, n.text)
            if key:
                kind = "call_attempt" if n.text.lower().startswith("nvc call attempt") else "call_outcome"
                out.append(
                    {
                        "pms_note_id": str(n.note_id),
                        "pms_patient_id": str(n.patient_id),
                        "kind": kind,
                        "outcome": n.outcome,
                        "text": n.text,
                        "call_time": n.call_time.replace(tzinfo=UK_TZ).astimezone(UTC),
                        "nvc_reference": key,
                    }
                )
        return out

    # --- rendering ---------------------------------------------------------------------------------

    @staticmethod
    def _alerts(patient: SeedPatient, flags: list[str]) -> list[str]:
        codes = [ACUITAS_ALERT_CODES.get(flag, flag) for flag in flags]
        notes = (patient.clinical_notes or "").lower()
        codes += [code for word, code in _NOTE_ALERTS if word in notes]
        return list(dict.fromkeys(codes))

    def render_patient(self, patient_id: int, patient: SeedPatient) -> dict[str, Any]:
        """A patient as Acuitas's API returns it. Acuitas always gives a recall date: the one the
        practice set, else 24 months after the last sight test."""
        last = patient.last_eye_test
        recall = patient.recall_due or (_add_months(last, 24) if last else None)
        line1, _, line2 = patient.address_line1.partition(", ")
        if not line2:
            line1, line2 = patient.address_line1, ""
        return {
            "PatientId": patient_id,
            "Title": patient.title,
            "Forename": patient.first_name,
            "Surname": patient.last_name,
            "DateOfBirth": uk_date(patient.date_of_birth),
            "Address1": line1,
            "Address2": line2,
            "Town": patient.town,
            "County": "",
            "Postcode": patient.postcode,
            "MobileTel": patient.mobile or "",
            "HomeTel": patient.landline or "",
            "WorkTel": "",
            "Email": patient.email or "",
            "LastSightTest": uk_date(last),
            "RecallDue": uk_date(recall),
            "ClinicalAlerts": self._alerts(patient, patient.flags),
            "Notes": patient.clinical_notes or "",
            "Modified": uk_timestamp(patient.updated_at),
            **self._state(patient),
        }

    @staticmethod
    def _state(patient: SeedPatient) -> dict[str, Any]:
        """Status, guardian and the Data Processing screen. A deceased record is DEC with the tick and
        date; a gone-away one stays ACT with the GoneAway tick. Telephone is OptOut for a patient the
        practice must not phone, OptIn once the screen was filled in (any channel answered), else
        never asked; recall consent is Rejected for "no recall", else Agreed or To Be Completed."""
        status = patient.status
        channels = {"Telephone": "", "SMS": opt(patient.sms_consent), "Email": opt(patient.email_consent)}
        answered = any(channels.values())
        channels["Telephone"] = opt(False) if not patient.phone_recall else opt(True) if answered else ""
        recall = "Rejected" if patient.no_recall else "Agreed" if answered else "To Be Completed"
        return {
            "RecordStatus": RECORD_STATUS_CODES.get(status, status),
            "Deceased": status == "deceased",
            "DateOfDeath": uk_date(patient.status_date) if status == "deceased" else "",
            "GoneAway": status == "gone_away",
            "GoneAwayDate": uk_date(patient.status_date) if status == "gone_away" else "",
            "ParentGuardian": patient.guardian_name or "",
            "DataProcessing": {"RecallConsent": recall, "Channels": channels},
        }

    def _rendered_patient(self, data: _Database, patient_id: int) -> dict[str, Any]:
        cached = data.rendered.get(patient_id)
        if cached is None:
            cached = data.rendered[patient_id] = self.render_patient(patient_id, data.patients[patient_id])
        return cached

    @staticmethod
    def _render_entry(e: _DiaryEntry) -> dict[str, Any]:
        return {
            "AppointmentId": e.appointment_id,
            "PatientId": e.patient_id,
            "Start": e.start.strftime("%d/%m/%Y %H:%M"),
            "Duration": e.duration,
            "Status": e.status,
            "AppointmentType": e.appointment_type,
            "Optom": e.optom or "",
            "Comments": e.comments,
            "BookedBy": e.booked_by,
            "Modified": uk_timestamp(e.modified),
        }

    def _render_exam(self, data: _Database, exam_id: int) -> dict[str, Any]:
        exam = data.exams[exam_id]
        patient = data.patients.get(PATIENT_BASE + exam.patient_index)
        alerts = self._alerts(patient, exam.flags) if patient else [ACUITAS_ALERT_CODES.get(f, f) for f in exam.flags]
        return {
            "ExamId": exam_id,
            "PatientId": PATIENT_BASE + exam.patient_index,
            "ExamDate": uk_date(exam.exam_date),
            "ExamType": "ST",
            "ClinicalAlerts": alerts,
            "IopRight": f"{exam.iop_right:.1f}" if exam.iop_right is not None else "",
            "IopLeft": f"{exam.iop_left:.1f}" if exam.iop_left is not None else "",
            "Notes": exam.notes or "",
            "Optom": data.exam_optom[exam_id],
            "Modified": uk_timestamp(exam.updated_at),
        }

    # --- sessions ----------------------------------------------------------------------------------

    def _get_version(self, request: Request) -> Response:
        return Response(
            200,
            {
                "Product": "Acuitas",
                "ProductVersion": self.product_version,
                "ServerTime": uk_timestamp(datetime.now(UTC)),
                "ApiAvailable": self.version_tuple >= (8, 0),
            },
        )

    def _login(self, request: Request) -> Response:
        body = request.body if isinstance(request.body, dict) else {}
        database, username, password = (str(body.get(k) or "") for k in ("database", "username", "password"))
        if not (database and username and password):
            raise _error(400, "VALIDATION_ERROR", "database, username and password are all required.")
        if database not in self.databases:
            raise _error(404, "DATABASE_NOT_FOUND", f"Database '{database}' does not exist on this server.")
        user = self.users.get(username)
        if user is None or not hmac.compare_digest(user[0].encode(), password.encode()):
            raise _error(401, "AUTH_FAILED", "Login failed: the username or password is incorrect.")
        token = secrets.token_hex(20)
        with self.lock:
            self._sessions[token] = _Session(username, database, time.monotonic() + self.token_ttl_seconds)
            self.logins += 1
        return Response(200, {"token": token, "expiresIn": int(self.token_ttl_seconds)})

    def _authorise(self, request: Request, role: str | None = ROLE_READ) -> tuple[_Session, _Database]:
        token = request.headers.get("x-acuitas-token", "").strip()
        if not token:
            raise _error(
                401, "NOT_AUTHENTICATED", "Log in first: POST /acuitas/api/session, then send X-Acuitas-Token."
            )
        with self.lock:
            session = self._sessions.get(token)
        if session is None:
            raise _error(401, "INVALID_TOKEN", "The session token is not valid.")
        if session.revoked or time.monotonic() >= session.expires_at:
            raise _error(401, "TOKEN_EXPIRED", "The session has expired; log in again.")
        user = self.users.get(session.username)
        if user is None:
            raise _error(401, "INVALID_TOKEN", "The session token is not valid.")
        if role and role not in user[1]:
            raise _error(
                403, "INSUFFICIENT_PERMISSIONS", f"This user does not have the '{role}' role needed for this request."
            )
        return session, self._load(session.database)

    def _get_session(self, request: Request) -> Response:
        session, _ = self._authorise(request, role=None)
        roles = sorted(self.users[session.username][1])
        remaining = max(0, int(session.expires_at - time.monotonic()))
        return Response(
            200, {"Username": session.username, "Database": session.database, "Roles": roles, "ExpiresIn": remaining}
        )

    def _get_practice(self, request: Request) -> Response:
        _, data = self._authorise(request)
        return Response(200, {"PracticeName": data.practice_name, "Database": data.name, "Branch": "Main"})

    # --- lists -------------------------------------------------------------------------------------

    def bad_parameter(self, name: str, message: str) -> HttpProblem:
        return _error(400, "INVALID_PARAMETER", message)

    def _paging(self, request: Request) -> tuple[int, int]:
        return self.int_query(request, "offset", 0, 0, 10**9), self.int_query(
            request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT
        )

    @staticmethod
    def _since(request: Request) -> datetime | None:
        raw = request.query.get("modifiedSince")
        if raw is None:
            return None
        try:
            local = _parse_local(raw, ("%d/%m/%Y %H:%M:%S", "%d/%m/%Y"), "modifiedSince")
        except HttpProblem:
            raise _error(
                400, "INVALID_PARAMETER", "modifiedSince must be dd/mm/yyyy HH:MM:SS (UK local time)."
            ) from None
        return local.replace(tzinfo=UK_TZ).astimezone(UTC)  # an ambiguous hour (October) is read as the earlier one

    def _filtered(self, data: _Database, kind: str, ids: list[int], modified: Any, since: datetime | None) -> list[int]:
        """Ids (ascending) modified at or after `since` (to the second), cached until the list changes."""
        if since is None:
            return ids
        key = (kind, since.isoformat())
        cached = data.filtered.get(key)
        if cached is None:
            if len(data.filtered) > 64:
                data.filtered.clear()
            cached = data.filtered[key] = [i for i in ids if modified(i).replace(microsecond=0) >= since]
        return cached

    @staticmethod
    def _page(ids: list[int], offset: int, limit: int, render: Any) -> Response:
        records = [render(i) for i in ids[offset : offset + limit]]
        return Response(200, {"TotalCount": len(ids), "Offset": offset, "Records": records})

    def _list_patients(self, request: Request) -> Response:
        _, data = self._authorise(request)
        offset, limit = self._paging(request)
        since = self._since(request)
        with self.lock:
            ids = self._filtered(data, "patients", data.patient_ids, lambda i: data.patients[i].updated_at, since)
            return self._page(ids, offset, limit, lambda i: self._rendered_patient(data, i))

    def _patient_id(self, data: _Database, raw: Any) -> int:
        try:
            patient_id = int(str(raw).strip())
        except ValueError:
            patient_id = -1
        if patient_id not in data.patients:
            raise _error(404, "PATIENT_NOT_FOUND", f"No patient with PatientId {str(raw)[:40]!r}.")
        return patient_id

    def _get_patient(self, request: Request) -> Response:
        _, data = self._authorise(request)
        patient_id = self._patient_id(data, request.params["patient_id"])
        with self.lock:
            return Response(200, self._rendered_patient(data, patient_id))

    def _list_diary(self, request: Request) -> Response:
        _, data = self._authorise(request)
        offset, limit = self._paging(request)
        since = self._since(request)
        with self.lock:
            ids = self._filtered(data, "diary", data.diary_ids, lambda i: data.diary[i].modified, since)
            if "patientId" in request.query:
                patient_id = self._patient_id(data, request.query["patientId"])
                ids = [i for i in ids if data.diary[i].patient_id == patient_id]
            if "date" in request.query:
                day = _parse_local(request.query["date"], ("%d/%m/%Y",), "date").date()
                ids = [i for i in ids if data.diary[i].start.date() == day]
            return self._page(ids, offset, limit, lambda i: self._render_entry(data.diary[i]))

    def _list_clinical(self, request: Request) -> Response:
        _, data = self._authorise(request)
        offset, limit = self._paging(request)
        since = self._since(request)
        with self.lock:
            ids = self._filtered(data, "clinical", data.exam_ids, lambda i: data.exams[i].updated_at, since)
            return self._page(ids, offset, limit, lambda i: self._render_exam(data, i))

    def _list_clinicians(self, request: Request) -> Response:
        """The users the diary can book against (`Optom` codes) with the GOC number Acuitas holds for
        each ("" when none), in user-code order: seeded clinicians, then `ODD_STAFF`."""
        _, data = self._authorise(request)
        offset, limit = self._paging(request)
        users: dict[str, tuple[str, str, str]] = {}
        for code, c in data.optoms.items():
            role = "Optometrist" if c.goc_number.startswith("01-") else "Dispensing Optician"
            users[code] = (c.name, role, c.goc_number)
        for code, s in data.staff.items():
            users[code] = (s.name, s.role, s.goc_number or "")
        codes = sorted(users)

        def render(i: int) -> dict[str, Any]:
            name, role, number = users[codes[i]]
            return {"UserCode": codes[i], "FullName": name, "JobTitle": role, "GOCNumber": number}

        return self._page(list(range(len(codes))), offset, limit, render)

    def _list_call_notes(self, request: Request) -> Response:
        _, data = self._authorise(request)
        offset, limit = self._paging(request)
        patient_id = self._patient_id(data, request.params["patient_id"])
        with self.lock:
            notes = list(data.call_notes.get(patient_id, []))
        records = [
            {
                "CallNoteId": n.note_id,
                "PatientId": n.patient_id,
                "Outcome": n.outcome,
                "NoteText": n.text,
                "CallDateTime": n.call_time.strftime("%d/%m/%Y %H:%M:%S"),
                "Reference": n.reference,
                "CreatedBy": n.created_by,
                "Created": uk_timestamp(n.created),
            }
            for n in notes[offset : offset + limit]
        ]
        return Response(200, {"TotalCount": len(notes), "Offset": offset, "Records": records})

    # --- writes ------------------------------------------------------------------------------------

    @staticmethod
    def _text(body: dict[str, Any], name: str, limit: int, *, required: bool = False) -> str:
        value = body.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise _error(400, "VALIDATION_ERROR", f"{name} must be text.")
        if required and not value.strip():
            raise _error(400, "VALIDATION_ERROR", f"{name} is required.")
        if len(value) > limit:
            raise _error(400, "VALIDATION_ERROR", f"{name} must be {limit} characters or fewer.")
        return value

    def _book(self, request: Request) -> Response:
        session, data = self._authorise(request, ROLE_DIARY)
        body = request.body if isinstance(request.body, dict) else None
        if body is None:
            raise _error(400, "VALIDATION_ERROR", "The request body must be a JSON object.")
        patient_id = self._patient_id(data, body.get("PatientId"))
        start = _parse_local(body.get("Start"), ("%d/%m/%Y %H:%M",), "Start")
        duration = body.get("Duration")
        if not isinstance(duration, int) or isinstance(duration, bool) or not 5 <= duration <= 480:
            raise _error(400, "VALIDATION_ERROR", "Duration must be whole minutes from 5 to 480.")
        kind = body.get("AppointmentType")
        if kind not in TYPE_CODES.values():
            raise _error(400, "VALIDATION_ERROR", f"AppointmentType must be one of {', '.join(TYPE_CODES.values())}.")
        optom = self._text(body, "Optom", 10).strip().upper() or None
        if optom is not None and optom not in data.optoms and optom not in data.staff:
            raise _error(400, "VALIDATION_ERROR", f"Optom '{optom}' is not a user code in this practice.")
        comments = self._text(body, "Comments", COMMENTS_MAX)
        if start < datetime.now(UK_TZ).replace(tzinfo=None):
            raise _error(400, "VALIDATION_ERROR", "Start is in the past.")
        end = start + timedelta(minutes=duration)
        with self.lock:
            for other_id in data.slots.get((optom, start.date()), []):
                other = data.diary[other_id]
                if other.status != "CAN" and other.start < end and start < other.end:
                    who = f"Optom {optom}" if optom else "the unassigned column"
                    raise _error(
                        409,
                        "SLOT_UNAVAILABLE",
                        f"The diary for {who} already has an appointment at {other.start:%H:%M} on {other.start:%d/%m/%Y}.",
                    )
            entry = _DiaryEntry(
                appointment_id=data.next_appointment,
                patient_id=patient_id,
                start=start,
                duration=duration,
                status="BK",
                appointment_type=kind,
                optom=optom,
                comments=comments,
                modified=datetime.now(UTC),
                booked_by=session.username.upper(),
            )
            data.next_appointment += 1
            data.diary[entry.appointment_id] = entry
            data.diary_ids.append(entry.appointment_id)
            data.slots.setdefault((optom, start.date()), []).append(entry.appointment_id)
            self._changed(data, "diary")
            rendered = self._render_entry(entry)
        return Response(201, rendered)

    def _add_call_note(self, request: Request) -> Response:
        session, data = self._authorise(request, ROLE_DIARY)
        patient_id = self._patient_id(data, request.params["patient_id"])
        body = request.body if isinstance(request.body, dict) else None
        if body is None:
            raise _error(400, "VALIDATION_ERROR", "The request body must be a JSON object.")
        outcome = self._text(body, "Outcome", 30, required=True).strip()
        text = self._text(body, "NoteText", NOTE_TEXT_MAX, required=True)
        reference = self._text(body, "Reference", REFERENCE_MAX)
        call_time = _parse_local(body.get("CallDateTime"), ("%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M"), "CallDateTime")
        with self.lock:
            note = _CallNote(
                data.next_note,
                patient_id,
                outcome,
                text,
                call_time,
                reference,
                session.username.upper(),
                datetime.now(UTC),
            )
            data.next_note += 1
            data.call_notes.setdefault(patient_id, []).append(note)
        return Response(201, {"CallNoteId": note.note_id, "PatientId": patient_id})
