"""An Optix-style cloud PMS on loopback: API key + Practice ID, cursor paging, camelCase records.

Optix's dialect, as the client has to cope with it: everything under `/api/v2/practices/{id}`, a
Bearer API key scoped to one practice, lists ordered by `(updatedAt, id)` with an opaque
`nextCursor`, clinical flags as Optix's own short codes, and errors as `{"error": {"code", "message"}}`.

A patient also carries what the practice recorded about reaching them, in Optix's words:

- `status`: `Active`, `Deceased`, `GoneAway` (post came back "gone away": the practice has lost
  them) or `Archived` (left the practice, not to be recalled), with `deceasedDate` (ISO date or null).
- `contactPreferences`: `phoneRecall` (false: "no telephone recall"), `smsConsent` and
  `emailConsent` (true, false, or null when never asked) and `excludeFromRecalls` (no recall by
  any channel). The whole object is null for a patient whose preferences were never recorded.
- `responsibleAdult`: `{"name", "relationship"}` of a child's parent or guardian, else null.

Routes (all under `/api/v2/practices/{practiceId}`):

- `GET ""`: the practice record; `GET /clinicians`: the diary's clinicians.
- `GET /patients?updatedSince=&cursor=&limit=`.
- `GET /appointments?updatedSince=&cursor=&limit=&patientId=&from=&to=` (`from`/`to` filter on the
  start, `from` inclusive, `to` exclusive) and `POST /appointments` (201; 409 `slot_unavailable`,
  404 `patient_not_found`, 422 `validation_error`). Optix has no idempotency keys: a client that
  wants to find its own bookings again writes its reference into `externalReference`.
- `GET /clinical-records?updatedSince=&cursor=&limit=`.
- `GET` and `POST /patients/{patientId}/notes` (categories `RECALL_CALL`, `CALL_ATTEMPT`).

There is no DELETE anywhere. Appointments, clinical records and notes are seeded on first use of
any of them, so a sandbox used only for patients (the 200,000-patient case) never pays for them.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import zlib
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from nvc_pipelines.model import NoteKind
from nvc_pipelines.normalise import find_nvc_reference
from sandboxes.base import HttpProblem, Request, Response, SandboxServer
from sandboxes.seed import (
    SeedClinician,
    SeedPatient,
    seed_appointments,
    seed_clinical_records,
    seed_clinicians,
    seed_patients,
)

BASE = "/api/v2"
DEFAULT_LIMIT = 100

# Canonical flag -> Optix clinical flag code. Anything else a test stores is rendered verbatim.
OPTIX_FLAG_CODES: dict[str, str] = {
    "diabetic": "DIAB",
    "glaucoma": "GLAU",
    "glaucoma_suspect": "GLS",
    "ocular_hypertension": "OHT",
    "glaucoma_family_history": "FHG",
    "binocular_vision_anomaly": "BVA",
    "corrected_refractive_error": "RXC",
    "progressive_myopia": "MYP",
}
_PRACTICE_NAMES = ("Vision", "Eyecare", "Opticians", "Eye Centre", "Optometrists")

# Canonical appointment status / type -> Optix's. Optix also has "Arrived" (a booked patient in the
# waiting room); the seed never produces it, but a client must read it.
OPTIX_STATUSES: dict[str, str] = {
    "booked": "Booked",
    "completed": "Completed",
    "cancelled": "Cancelled",
    "no_show": "DNA",
}
OPTIX_TYPES: dict[str, str] = {
    "eye_test": "SIGHT_TEST",
    "contact_lens": "CL_CHECK",
    "follow_up": "FOLLOW_UP",
    "collection": "COLLECTION",
}
# Canonical patient status -> Optix's. A status a test stores that is not canonical is rendered verbatim.
OPTIX_PATIENT_STATUSES: dict[str, str] = {
    "active": "Active",
    "deceased": "Deceased",
    "gone_away": "GoneAway",
    "inactive": "Archived",
}
BOOKED_STATUSES = frozenset({"Booked", "Arrived"})  # statuses that hold a slot in the diary
NOTE_CATEGORIES: dict[str, NoteKind] = {"RECALL_CALL": NoteKind.CALL_OUTCOME, "CALL_ATTEMPT": NoteKind.CALL_ATTEMPT}
UK_TZ = ZoneInfo("Europe/London")
MAX_REFERENCE_LENGTH = 100
MAX_TEXT_LENGTH = 4000
MIN_DURATION, MAX_DURATION = 5, 480


def optix_timestamp(value: datetime) -> str:
    """Optix's fixed-width UTC timestamp (milliseconds, `Z`): lexical order is time order."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _patient_id(index: int) -> str:
    return f"P{index:07d}"


def _appointment_id(index: int) -> str:
    return f"A{index:07d}"


def _record_id(index: int) -> str:
    return f"R{index:07d}"


def _note_id(index: int) -> str:
    return f"N{index:07d}"


def _optix_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HttpProblem:
    return HttpProblem(status, {"error": {"code": code, "message": message}}, headers)


@dataclass(slots=True)
class _Appointment:
    """One diary entry. `start` is aware UTC; `via_api` marks the ones a client created."""

    appointment_id: str
    patient_id: str
    start: datetime
    duration_minutes: int
    status: str  # Optix's: Booked, Arrived, Completed, Cancelled, DNA
    type: str  # Optix's: SIGHT_TEST, CL_CHECK, FOLLOW_UP, COLLECTION
    clinician_id: str
    external_reference: str | None
    notes: str | None
    updated_at: datetime
    via_api: bool = False

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.duration_minutes)

    def render(self) -> dict[str, Any]:
        return {
            "appointmentId": self.appointment_id,
            "patientId": self.patient_id,
            "start": optix_timestamp(self.start),
            "durationMinutes": self.duration_minutes,
            "status": self.status,
            "type": self.type,
            "clinicianId": self.clinician_id,
            "externalReference": self.external_reference,
            "notes": self.notes,
            "updatedAt": optix_timestamp(self.updated_at),
        }


@dataclass(slots=True)
class _Diary:
    """One practice's appointments, clinical records and patient notes, indexed for the routes."""

    clinicians: dict[str, SeedClinician]
    appointments: dict[str, _Appointment]
    appointment_order: list[tuple[str, str]]  # (updatedAt, appointmentId)
    by_patient: dict[str, list[str]]  # patientId -> appointmentIds
    by_day: dict[date, list[str]]  # UTC date of start -> appointmentIds
    records: dict[str, dict[str, Any]]  # rendered clinical records
    record_order: list[tuple[str, str]]  # (updatedAt, recordId)
    notes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # patientId -> rendered notes
    note_count: int = 0

    def add(self, appointment: _Appointment) -> None:
        self.appointments[appointment.appointment_id] = appointment
        insort(self.appointment_order, (optix_timestamp(appointment.updated_at), appointment.appointment_id))
        self.by_patient.setdefault(appointment.patient_id, []).append(appointment.appointment_id)
        self.by_day.setdefault(appointment.start.date(), []).append(appointment.appointment_id)


@dataclass(slots=True)
class _PracticeData:
    """One practice's patients: the records, their rendered JSON and the `(updatedAt, id)` index.

    `seeded` keeps the patients as first seeded, so the diary is the same whatever `touch` did since.
    """

    name: str
    patients: dict[str, SeedPatient]
    rendered: dict[str, dict[str, Any]]
    order: list[tuple[str, str]]
    seeded: list[SeedPatient]


class OptixSandbox(SandboxServer):
    """A faithful stand-in for Optix's REST API, served for real over HTTP.

    `practices` maps Optix Practice IDs to patient counts; `api_keys` maps each key to the one
    practice it may read. Each practice is seeded from `(seed, practice id)`, so practices differ but
    every run is the same; seeding happens on first use, so a sandbox with a 200,000-patient practice
    starts instantly and pays the few seconds once.
    """

    name = "optix"
    problem = staticmethod(_optix_error)
    stock_errors = {
        404: ("not_found", "No route for {path}."),
        429: ("rate_limited", "Too many requests; slow down."),
        500: ("internal_error", "An unexpected error occurred."),
        503: ("service_unavailable", "Optix is under maintenance."),
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        practices: dict[str, int] | None = None,
        api_keys: dict[str, str] | None = None,
        seed: int = 7,
        rate_limit_per_second: float = 50.0,
        page_size_max: int = 1000,
        today: date | None = None,
    ):
        super().__init__(host, port, seed=seed, rate_limit_per_second=rate_limit_per_second)
        self.practices: dict[str, int] = dict(practices if practices is not None else {"OPX-1001": 50})
        self.api_keys: dict[str, str] = dict(api_keys if api_keys is not None else {"optix-demo-key": "OPX-1001"})
        self.api_access_disabled: set[str] = set()
        self.seed = seed
        self.page_size_max = page_size_max
        self.today = today
        self._data: dict[str, _PracticeData] = {}
        self._diaries: dict[str, _Diary] = {}
        self.route("GET", BASE + "/practices/{practice_id}", self._get_practice)
        self.route("GET", BASE + "/practices/{practice_id}/patients", self._list_patients)
        self.route("GET", BASE + "/practices/{practice_id}/clinicians", self._list_clinicians)
        self.route("GET", BASE + "/practices/{practice_id}/appointments", self._list_appointments)
        self.route("POST", BASE + "/practices/{practice_id}/appointments", self._create_appointment)
        self.route("GET", BASE + "/practices/{practice_id}/clinical-records", self._list_clinical_records)
        self.route("GET", BASE + "/practices/{practice_id}/patients/{patient_id}/notes", self._list_notes)
        self.route("POST", BASE + "/practices/{practice_id}/patients/{patient_id}/notes", self._create_note)

    # --- data --------------------------------------------------------------------------------------

    def _practice_seed(self, practice_id: str) -> int:
        return self.seed * 1_000_003 + zlib.crc32(practice_id.encode())

    def _load(self, practice_id: str) -> _PracticeData:
        """The practice's patients, seeded on first use."""
        return self.once(self._data, practice_id, lambda: self._seed_practice(practice_id))

    def _seed_practice(self, practice_id: str) -> _PracticeData:
        seed = self._practice_seed(practice_id)
        records = seed_patients(self.practices[practice_id], seed=seed, today=self.today)
        patients = {_patient_id(p.index): p for p in records}
        order = sorted((optix_timestamp(p.updated_at), pid) for pid, p in patients.items())
        rng = random.Random(seed)
        name = f"{rng.choice(records).last_name if records else 'Demo'} {rng.choice(_PRACTICE_NAMES)}"
        return _PracticeData(name, patients, {}, order, records)

    def _diary(self, practice_id: str) -> _Diary:
        """The practice's appointments and clinical records, seeded on first use (from the patients
        as first seeded, so the diary is the same whatever `touch` did since)."""
        return self.once(
            self._diaries, practice_id, lambda: self._seed_diary(practice_id, self._load(practice_id).seeded)
        )

    def _seed_diary(self, practice_id: str, patients: list[SeedPatient]) -> _Diary:
        seed = self._practice_seed(practice_id)
        clinicians = {c.code: c for c in seed_clinicians(seed)}
        diary = _Diary(clinicians, {}, [], {}, {}, {}, [])
        for a in seed_appointments(patients, seed=seed, today=self.today):
            diary.add(
                _Appointment(
                    appointment_id=_appointment_id(a.index),
                    patient_id=_patient_id(a.patient_index),
                    start=a.starts_at.replace(tzinfo=UK_TZ).astimezone(UTC),  # diaries are kept in UK time
                    duration_minutes=a.duration_minutes,
                    status=OPTIX_STATUSES[a.status],
                    type=OPTIX_TYPES[a.appointment_type],
                    clinician_id=a.clinician.code,
                    external_reference=None,
                    notes=a.notes,
                    updated_at=a.updated_at,
                )
            )
        for r in seed_clinical_records(patients, seed=seed, today=self.today):
            record_id = _record_id(r.index)
            diary.records[record_id] = {
                "recordId": record_id,
                "patientId": _patient_id(r.patient_index),
                "examDate": r.exam_date.isoformat(),
                "flags": [OPTIX_FLAG_CODES.get(flag, flag) for flag in r.flags],
                "iop": {"right": r.iop_right, "left": r.iop_left},
                "notes": r.notes,
                "optometristId": r.clinician.code,
                "updatedAt": optix_timestamp(r.updated_at),
            }
        diary.record_order = sorted((row["updatedAt"], rid) for rid, row in diary.records.items())
        return diary

    def patient_count(self, practice_id: str) -> int:
        return len(self._load(practice_id).patients)

    def patients(self, practice_id: str) -> list[SeedPatient]:
        """The practice's current records (after any `touch`), in patient-id order."""
        data = self._load(practice_id)
        with self.lock:
            return [data.patients[pid] for pid in sorted(data.patients)]

    def render(self, patient: SeedPatient) -> dict[str, Any]:
        """A patient as Optix's API returns it."""
        return {
            "patientId": _patient_id(patient.index),
            "title": patient.title,
            "forename": patient.first_name,
            "surname": patient.last_name,
            "dateOfBirth": patient.date_of_birth.isoformat() if patient.date_of_birth else None,
            "contact": {"mobile": patient.mobile, "home": patient.landline, "email": patient.email},
            "address": {"line1": patient.address_line1, "town": patient.town, "postcode": patient.postcode},
            "lastSightTest": patient.last_eye_test.isoformat() if patient.last_eye_test else None,
            "recallDue": patient.recall_due.isoformat() if patient.recall_due else None,
            "clinicalFlags": [OPTIX_FLAG_CODES.get(flag, flag) for flag in patient.flags],
            "notes": patient.clinical_notes,
            "status": OPTIX_PATIENT_STATUSES.get(patient.status, patient.status),
            "deceasedDate": (
                patient.status_date.isoformat() if patient.status == "deceased" and patient.status_date else None
            ),
            "contactPreferences": self._contact_preferences(patient),
            "responsibleAdult": (
                {"name": patient.guardian_name, "relationship": "Parent/Guardian"} if patient.guardian_name else None
            ),
            "updatedAt": optix_timestamp(patient.updated_at),
        }

    @staticmethod
    def _contact_preferences(patient: SeedPatient) -> dict[str, Any] | None:
        """Optix's preferences block; null when nothing was ever recorded (all defaults, never asked)."""
        if (
            patient.phone_recall
            and not patient.no_recall
            and patient.sms_consent is None
            and patient.email_consent is None
        ):
            return None
        return {
            "phoneRecall": patient.phone_recall,
            "smsConsent": patient.sms_consent,
            "emailConsent": patient.email_consent,
            "excludeFromRecalls": patient.no_recall,
        }

    def seed_records(self, practice_id: str) -> dict[str, SeedPatient]:
        """Optix patient id -> the canonical record the API renders (current, after any edits)."""
        data = self._load(practice_id)
        with self.lock:
            return {pid: data.patients[pid] for pid in sorted(data.patients)}

    def update_patient(
        self, practice_id: str, patient_id: str, *, now: datetime | None = None, **changes: Any
    ) -> SeedPatient:
        """Change fields of one `SeedPatient` as a receptionist would, bumping `updatedAt`.

        Any field may change, the contact ones too (`status`, `status_date`, `phone_recall`,
        `no_recall`, `sms_consent`, `email_consent`, `guardian_name`), so an incremental read sees a
        patient marked deceased or opted out mid-day. `flags` may hold codes Optix knows but the
        recall rules do not, and `status` a word Optix has but NVC does not; they are sent verbatim.
        """
        data = self._load(practice_id)
        with self.lock:
            old = data.patients[patient_id]
            new = self._edit(data, patient_id, now or datetime.now(UTC), changes)
            data.order.remove((optix_timestamp(old.updated_at), patient_id))
            insort(data.order, (optix_timestamp(new.updated_at), patient_id))
        return new

    def touch(self, practice_id: str, fraction_or_count: float | int, now: datetime | None = None) -> list[str]:
        """Edit some patients (a new mobile, or a sight test today) so an incremental sync sees them.

        A float is a fraction of the practice, an int a count. Returns the touched patient ids.
        """
        data = self._load(practice_id)
        stamp = now or datetime.now(UTC)
        with self.lock:
            ids = sorted(data.patients)
            chosen = self.touch_sample(ids, fraction_or_count, self._practice_seed(practice_id), stamp)
            for k, patient_id in enumerate(chosen):
                self._edit(data, patient_id, stamp, self.touch_change(data.patients[patient_id], k, stamp.date()))
            data.order = sorted((optix_timestamp(p.updated_at), pid) for pid, p in data.patients.items())
        return chosen

    @staticmethod
    def _edit(data: _PracticeData, patient_id: str, stamp: datetime, changes: dict[str, Any]) -> SeedPatient:
        new = replace(data.patients[patient_id], **changes, updated_at=stamp.astimezone(UTC))
        data.patients[patient_id] = new
        data.rendered.pop(patient_id, None)
        return new

    def appointments(self, practice_id: str) -> list[dict[str, Any]]:
        """Every appointment as Optix renders it, in appointment-id order."""
        diary = self._diary(practice_id)
        with self.lock:
            return [diary.appointments[aid].render() for aid in sorted(diary.appointments)]

    def clinical_records(self, practice_id: str) -> list[dict[str, Any]]:
        """Every clinical record as Optix renders it, in record-id order."""
        diary = self._diary(practice_id)
        with self.lock:
            return [dict(diary.records[rid]) for rid in sorted(diary.records)]

    def clinicians(self, practice_id: str) -> list[SeedClinician]:
        return list(self._diary(practice_id).clinicians.values())

    def nvc_appointments(self, practice_id: str) -> list[dict[str, Any]]:
        """Appointments created through the API, with the NVC idempotency key found in each (or None)."""
        diary = self._diary(practice_id)
        with self.lock:
            made = [a for a in diary.appointments.values() if a.via_api]
            return [
                {
                    "pms_appointment_id": a.appointment_id,
                    "pms_patient_id": a.patient_id,
                    "starts_at": a.start,
                    "nvc_reference": find_nvc_reference(a.external_reference, a.notes),
                }
                for a in sorted(made, key=lambda a: a.appointment_id)
            ]

    def nvc_notes(self, practice_id: str) -> list[dict[str, Any]]:
        """Notes added through the API (the only way notes are made here), with their NVC key (or None)."""
        diary = self._diary(practice_id)
        with self.lock:
            notes = sorted((n for ns in diary.notes.values() for n in ns), key=lambda n: n["noteId"])
            return [
                {
                    "pms_note_id": n["noteId"],
                    "pms_patient_id": n["patientId"],
                    "kind": NOTE_CATEGORIES[n["category"]].value,
                    "nvc_reference": find_nvc_reference(n["externalReference"], n["text"]),
                }
                for n in notes
            ]

    # --- dialect -----------------------------------------------------------------------------------

    def _authorise(self, request: Request) -> _PracticeData:
        practice_id = request.params["practice_id"]
        key = self.credential(request, "Bearer")
        if key not in self.api_keys:
            raise _optix_error(
                401, "invalid_api_key", "The API key is missing, invalid or revoked.", {"WWW-Authenticate": "Bearer"}
            )
        if self.api_keys[key] != practice_id or practice_id not in self.practices:
            raise _optix_error(404, "practice_not_found", f"No practice {practice_id} is available to this API key.")
        if practice_id in self.api_access_disabled:
            raise _optix_error(403, "api_access_disabled", "API access is disabled for this practice.")
        return self._load(practice_id)

    def _get_practice(self, request: Request) -> Response:
        data = self._authorise(request)
        return Response(200, {"practiceId": request.params["practice_id"], "name": data.name, "apiAccess": True})

    def _list_patients(self, request: Request) -> Response:
        data = self._authorise(request)
        return self._page(request, lambda: data.order, lambda pid: self._rendered(data, pid))

    def _page(
        self, request: Request, order: Callable[[], list[tuple[str, str]]], render: Callable[[str], dict[str, Any]]
    ) -> Response:
        """One page of `order()` (sorted `(updatedAt, id)` keys, read under the lock) after
        `updatedSince` and `cursor`, rendered by `render(id)`."""
        limit = self.int_query(request, "limit", DEFAULT_LIMIT, 1, self.page_size_max)
        start_key: tuple[str, str] | None = None
        if "updatedSince" in request.query:
            start_key = (optix_timestamp(self._timestamp(request.query["updatedSince"], "updatedSince")), "")
        after = self._decode_cursor(request.query["cursor"]) if request.query.get("cursor") else None
        with self.lock:
            keys_all = order()
            start = bisect_left(keys_all, start_key) if start_key else 0
            if after is not None:
                start = max(start, bisect_right(keys_all, after))
            keys = keys_all[start : start + limit]
            more = start + limit < len(keys_all)
            page = [render(key) for _, key in keys]
        next_cursor = self._encode_cursor(keys[-1]) if more and keys else None
        return Response(200, {"data": page, "pagination": {"nextCursor": next_cursor}})

    def _list_clinicians(self, request: Request) -> Response:
        self._authorise(request)
        diary = self._diary(request.params["practice_id"])
        rows = [
            {
                "clinicianId": c.code,
                "name": c.name,
                "gocNumber": c.goc_number,
                "role": "Optometrist" if c.goc_number.startswith("01-") else "Dispensing Optician",
            }
            for c in diary.clinicians.values()
        ]
        return Response(200, {"data": rows, "pagination": {"nextCursor": None}})

    def _list_appointments(self, request: Request) -> Response:
        self._authorise(request)
        diary = self._diary(request.params["practice_id"])
        patient_id = request.query.get("patientId")
        lower = self._timestamp(request.query["from"], "from") if request.query.get("from") else None
        upper = self._timestamp(request.query["to"], "to") if request.query.get("to") else None

        def order() -> list[tuple[str, str]]:
            if patient_id is None and lower is None and upper is None:
                return diary.appointment_order
            ids = diary.by_patient.get(patient_id, []) if patient_id is not None else diary.appointments
            chosen = [diary.appointments[aid] for aid in ids]
            chosen = [a for a in chosen if (lower is None or a.start >= lower) and (upper is None or a.start < upper)]
            return sorted((optix_timestamp(a.updated_at), a.appointment_id) for a in chosen)

        return self._page(request, order, lambda aid: diary.appointments[aid].render())

    def _list_clinical_records(self, request: Request) -> Response:
        self._authorise(request)
        diary = self._diary(request.params["practice_id"])
        return self._page(request, lambda: diary.record_order, lambda rid: dict(diary.records[rid]))

    def _create_appointment(self, request: Request) -> Response:
        data = self._authorise(request)
        diary = self._diary(request.params["practice_id"])
        body = request.body if isinstance(request.body, dict) else None
        if body is None:
            raise _optix_error(422, "validation_error", "The request body must be a JSON object.")
        problems: list[str] = []
        patient_id = body.get("patientId")
        if not isinstance(patient_id, str) or not patient_id.strip():
            problems.append("patientId is required")
        start = self._body_timestamp(body.get("start"), "start", problems)
        duration = body.get("durationMinutes")
        if isinstance(duration, bool) or not isinstance(duration, int) or not MIN_DURATION <= duration <= MAX_DURATION:
            problems.append(f"durationMinutes must be a whole number from {MIN_DURATION} to {MAX_DURATION}")
        kind = body.get("type")
        if kind not in OPTIX_TYPES.values():
            problems.append(f"type must be one of {', '.join(OPTIX_TYPES.values())}")
        clinician_id = body.get("clinicianId")
        if clinician_id is not None and clinician_id not in diary.clinicians:
            problems.append(f"clinicianId {clinician_id!r} is not a clinician at this practice")
        reference = self._optional_text(body, "externalReference", MAX_REFERENCE_LENGTH, problems)
        notes = self._optional_text(body, "notes", MAX_TEXT_LENGTH, problems)
        now = datetime.now(UTC)
        if start is not None and start < now:
            problems.append("start is in the past")
        if problems:
            raise _optix_error(422, "validation_error", "; ".join(problems) + ".")
        assert start is not None and isinstance(duration, int) and isinstance(patient_id, str)
        with self.lock:
            if patient_id not in data.patients:
                raise _optix_error(404, "patient_not_found", f"No patient {patient_id} at this practice.")
            end = start + timedelta(minutes=duration)
            clash = self._clash(diary, start, end, clinician_id)
            if clash is not None:
                who = f"clinician {clinician_id}" if clinician_id else "the diary"
                raise _optix_error(
                    409, "slot_unavailable", f"The slot at {optix_timestamp(start)} is already booked for {who}."
                )
            appointment = _Appointment(
                appointment_id=_appointment_id(len(diary.appointments) + 1),
                patient_id=patient_id,
                start=start,
                duration_minutes=duration,
                status="Booked",
                type=str(kind),
                clinician_id=clinician_id or self._free_clinician(diary, start, end),
                external_reference=reference,
                notes=notes,
                updated_at=now,
                via_api=True,
            )
            diary.add(appointment)
            return Response(201, appointment.render())

    @staticmethod
    def _clash(diary: _Diary, start: datetime, end: datetime, clinician_id: str | None) -> _Appointment | None:
        """A booked appointment in the way: with a clinician, one of theirs overlapping `[start, end)`;
        without one, any booked appointment at the same start."""
        for day in (start.date() - timedelta(days=1), start.date(), start.date() + timedelta(days=1)):
            for aid in diary.by_day.get(day, ()):
                other = diary.appointments[aid]
                if other.status not in BOOKED_STATUSES:
                    continue
                if clinician_id is None:
                    if other.start == start:
                        return other
                elif other.clinician_id == clinician_id and other.start < end and start < other.end:
                    return other
        return None

    @staticmethod
    def _free_clinician(diary: _Diary, start: datetime, end: datetime) -> str:
        """The first optometrist with nothing booked across `[start, end)` (Optix assigns one)."""
        optometrists = [c.code for c in diary.clinicians.values() if c.goc_number.startswith("01-")]
        for code in optometrists:
            if OptixSandbox._clash(diary, start, end, code) is None:
                return code
        return optometrists[0]

    def _patient_notes(self, request: Request) -> tuple[_Diary, str]:
        data = self._authorise(request)
        patient_id = request.params["patient_id"]
        if patient_id not in data.patients:
            raise _optix_error(404, "patient_not_found", f"No patient {patient_id} at this practice.")
        return self._diary(request.params["practice_id"]), patient_id

    def _list_notes(self, request: Request) -> Response:
        diary, patient_id = self._patient_notes(request)
        with self.lock:
            rows = [dict(n) for n in diary.notes.get(patient_id, [])]
        return Response(200, {"data": rows, "pagination": {"nextCursor": None}})

    def _create_note(self, request: Request) -> Response:
        diary, patient_id = self._patient_notes(request)
        body = request.body if isinstance(request.body, dict) else None
        if body is None:
            raise _optix_error(422, "validation_error", "The request body must be a JSON object.")
        problems: list[str] = []
        category = body.get("category")
        if category not in NOTE_CATEGORIES:
            problems.append(f"category must be one of {', '.join(NOTE_CATEGORIES)}")
        text = body.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_LENGTH:
            problems.append(f"text is required (at most {MAX_TEXT_LENGTH} characters)")
        occurred = self._body_timestamp(body.get("occurredAt"), "occurredAt", problems)
        reference = self._optional_text(body, "externalReference", MAX_REFERENCE_LENGTH, problems)
        if problems:
            raise _optix_error(422, "validation_error", "; ".join(problems) + ".")
        assert occurred is not None
        with self.lock:
            diary.note_count += 1
            note = {
                "noteId": _note_id(diary.note_count),
                "patientId": patient_id,
                "category": category,
                "text": text,
                "occurredAt": optix_timestamp(occurred),
                "externalReference": reference,
                "createdAt": optix_timestamp(datetime.now(UTC)),
            }
            diary.notes.setdefault(patient_id, []).append(note)
            return Response(201, dict(note))

    @staticmethod
    def _body_timestamp(raw: Any, name: str, problems: list[str]) -> datetime | None:
        """An ISO-8601 timestamp with an offset (Optix refuses local times in request bodies)."""
        if not isinstance(raw, str):
            problems.append(f"{name} is required (ISO-8601 with an offset, e.g. 2025-06-01T09:00:00Z)")
            return None
        try:
            value = datetime.fromisoformat(raw)
        except ValueError:
            value = None
        if value is None or value.tzinfo is None:
            problems.append(f"{name} must be ISO-8601 with an offset, e.g. 2025-06-01T09:00:00Z")
            return None
        return value.astimezone(UTC)

    @staticmethod
    def _optional_text(body: dict[str, Any], name: str, limit: int, problems: list[str]) -> str | None:
        value = body.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > limit:
            problems.append(f"{name} must be text of at most {limit} characters")
            return None
        return value

    def _rendered(self, data: _PracticeData, patient_id: str) -> dict[str, Any]:
        cached = data.rendered.get(patient_id)
        if cached is None:
            cached = data.rendered[patient_id] = self.render(data.patients[patient_id])
        return cached

    @staticmethod
    def _timestamp(raw: str, name: str) -> datetime:
        """A query-string timestamp; one without an offset is UTC, as Optix documents."""
        try:
            value = datetime.fromisoformat(raw)
        except ValueError:
            raise _optix_error(400, "invalid_parameter", f"{name} must be an ISO-8601 timestamp.") from None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @staticmethod
    def _encode_cursor(key: tuple[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: str) -> tuple[str, str]:
        try:
            stamp, patient_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if not isinstance(stamp, str) or not isinstance(patient_id, str):
                raise ValueError(cursor)
        except (ValueError, TypeError, binascii.Error):
            raise _optix_error(400, "invalid_cursor", "The cursor is malformed or has expired.") from None
        return stamp, patient_id
