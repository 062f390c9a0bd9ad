"""A Sycle account on loopback, speaking Sycle's vendor API: one account, several clinics.

**What follows public material.** A public integration (a WordPress plugin that books appointments
through Sycle) shows how Sycle's vendor API is called, and this sandbox serves exactly that:

- Every endpoint is `/api/vendor/{endpoint}/` (trailing slash) on the account's own host
  (`https://{subdomain}.sycle.net`), and every call is an HTTP **GET with a JSON body** (sent with
  `Content-Type: application/x-www-form-urlencoded`, though the body is JSON; the content type is not
  checked). The token travels **inside the body** (`{"token": ...}`), never in a header.
- `token/`: `{"username", "password"}` -> `{"token"}`.
- `clinics/`: `{"token"}` (optionally `"proximity": {...}`, accepted and ignored) ->
  `{"clinic_details": [detail, ...]}`; `clinics/{clinic_id}/` -> `{"clinic_details": detail}`. A
  detail is `{"clinic": {"clinic_id", "clinic_name", "address": {"street1", "street2", "city",
  "state", "country", "zip"}, "phone1", "phone2", "collision_limit"}, "appointment_types":
  [{"appt_type_id", "name", "length"}], "referral_sources": [{"ref_source_id", "name",
  "referral_subcategories": [{"sub_ref_id", "name"}]}]}`. Ids are strings prefixed by the account
  number (`2803-9506`, `2803-1`).
- `open_slots/`: `{"token", "clinic_id", "start_date", "end_date", "length"}` ->
  `{"open_slots": [{"staff": {"title", "first_name", "last_name"}, "slots": [{"time"}]}]}`.
- `appointment/`: `{"token", "start": "YYYY-MM-DD HH:MM:SS", "clinic_id", "appt_type_id",
  "ref_source_name", "sub_ref_name", "patient": {"first_name", "last_name", "phone", "email"}}`
  books it; the patient is identified by these details, not by an id.

**What is modelled** (no public description exists; kept in the same style: under `/api/vendor/`,
GET with the token in a JSON body, account-prefixed string ids): the error envelope
`{"errors": [{"code", "detail"}]}` and its statuses (401 `invalid_credentials` / `token_invalid` /
`token_expired`, 403 `api_disabled`, 404 `clinic_not_found` / `patient_not_found`, 409
`slot_unavailable`, 422 `invalid_*`); tokens expiring after `token_ttl_seconds`; the slot `time`
format (`YYYY-MM-DD HH:MM:SS`, clinic local time, the form `appointment` takes); what `appointment`
answers (`{"appointment": {"appt_id", ...}}`) and its optional `notes`; how it matches the patient
(first and last name, plus phone or email; no match makes a new patient, as a web booking would); the
clinic's diary grid (every 15 minutes, 08:00-19:00, every day) and `collision_limit` as the number
of appointments the clinic takes at once; and the reads NVC needs: `patient_fields/`, `patients/`,
`patients/{patient_id}/`, `clinical_alerts/`, `recall_recommendations/`, `appointments/`, `staff/`
(with GOC numbers), `communications/` and `communication/` (a call note). Lists take `page` /
`per_page` in the body and answer `meta.total_pages` / `total_count`; `updated_since` (ISO 8601
with an offset) and `patient_ids` (a list) filter them.

Sycle's patient data, as the client has to cope with it: `phone` and `cell_phone` as separate fields
written however the receptionist typed them, timestamps in UK local time with their offset, and the
clinical data the recall rules need spread over custom fields (`custom_fields.custom_3` holds the
last eye exam in the default account layout), clinical alerts and recall recommendations. What the
practice recorded about reaching a patient is in Sycle's words: `status` (`active`, `inactive`,
`deceased` or `moved`), the opt-out boxes `do_not_call`, `do_not_text` and `do_not_email` (Sycle
records refusals, not consent), `recall_opt_out` and `responsible_party` (`Self` for a patient
responsible for themselves). The date of death is a custom field (`custom_fields.custom_6`, "Date of
Death", typed day first, in the default layout).

Only GET is routed: nothing NVC does may remove data from a practice's system.
"""

from __future__ import annotations

import math
import random
import re
import secrets
import time
import zlib
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

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

BASE = "/api/vendor"
ACCOUNT = "2803"
DEMO_USERNAME = "nvc-demo"
DEMO_PASSWORD = "sycle-demo-password"
WRITE_ENDPOINTS = frozenset({BASE + "/appointment/", BASE + "/communication/"})
SLOT_STEP_MINUTES = 15
DAY_OPENS, DAY_CLOSES = 8 * 60, 19 * 60  # the diary grid, minutes after midnight (clinic local time)
SLOT_FORMAT = "%Y-%m-%d %H:%M:%S"
MAX_SLOT_DAYS = 31

DEFAULT_PER_PAGE = 25
MAX_PER_PAGE = 200
UK_TZ = ZoneInfo("Europe/London")

# The standard patient fields every Sycle account has: (key, label, type).
STANDARD_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("patient_id", "Patient ID", "text"),
    ("title", "Title", "text"),
    ("first_name", "First Name", "text"),
    ("last_name", "Last Name", "text"),
    ("birth_date", "Date of Birth", "date"),
    ("phone", "Home Phone", "phone"),
    ("cell_phone", "Cell Phone", "phone"),
    ("email", "Email", "email"),
    ("address_1", "Address Line 1", "text"),
    ("address_2", "Address Line 2", "text"),
    ("city", "City", "text"),
    ("postcode", "Postcode", "text"),
    ("notes", "Notes", "text"),
    ("status", "Patient Status", "choice"),
    ("do_not_call", "Do Not Call", "boolean"),
    ("do_not_text", "Do Not Text", "boolean"),
    ("do_not_email", "Do Not Email", "boolean"),
    ("recall_opt_out", "Opt Out of Recalls", "boolean"),
    ("responsible_party", "Responsible Party", "text"),
    ("updated_at", "Last Updated", "datetime"),
)
# Canonical patient status -> Sycle's. A status a test stores that is not canonical is rendered verbatim.
SYCLE_PATIENT_STATUSES: dict[str, str] = {
    "active": "active",
    "inactive": "inactive",
    "deceased": "deceased",
    "gone_away": "moved",
}
SELF = "Self"  # Sycle's responsible party for a patient who has no guardian

# The account's custom fields: key -> (label, type, what the sandbox puts there). The "what" names
# are the sandbox's own: see `_custom_value`. Tests may change the layout with `set_custom_fields`.
DEFAULT_CUSTOM_FIELDS: dict[str, tuple[str, str, str]] = {
    "custom_1": ("Referral Source", "text", "referral_source"),
    "custom_2": ("Preferred Contact Time", "text", "contact_time"),
    "custom_3": ("Last Eye Exam", "date", "last_eye_test"),
    "custom_4": ("Previous Eye Exam", "date", "previous_eye_test"),
    "custom_5": ("Recall Due", "date", "recall_due"),
    "custom_6": ("Date of Death", "date", "date_of_death"),
}
CUSTOM_SOURCES = frozenset(
    {"referral_source", "contact_time", "last_eye_test", "previous_eye_test", "recall_due", "date_of_death", "blank"}
)

# Canonical flag -> the alert labels receptionists and optometrists pick or type for it in Sycle.
ALERT_LABELS: dict[str, tuple[str, ...]] = {
    "diabetic": ("Diabetic", "Diabetic", "Diabetes Type 2", "DM"),
    "glaucoma": ("Glaucoma",),
    "glaucoma_suspect": ("Glaucoma Suspect",),
    "ocular_hypertension": ("OHT", "OHT", "Ocular Hypertension"),
    "glaucoma_family_history": ("Family Hx Glaucoma", "Family Hx Glaucoma", "FH Glaucoma"),
    "binocular_vision_anomaly": ("Squint", "Amblyopia", "Binocular Vision Anomaly"),
    "corrected_refractive_error": ("Corrected Refractive Error",),
    "progressive_myopia": ("Progressive Myopia", "Rapidly Progressing Myopia"),
}
# Free-text alerts that are not recall risks (kept raw by the client, never dropped).
OTHER_ALERTS = ("Allergic to fluorescein", "Latex allergy", "Wheelchair user - ground floor room")

APPOINTMENT_TYPES: dict[str, str] = {
    "eye_test": "Eye Exam",
    "contact_lens": "Contact Lens Check",
    "follow_up": "Follow Up",
    "collection": "Collection",
}
KNOWN_APPOINTMENT_TYPES = frozenset({*APPOINTMENT_TYPES.values(), "Other"})
APPOINTMENT_STATUSES = frozenset({"scheduled", "confirmed", "arrived", "completed", "cancelled", "no_show"})
COMMUNICATION_TYPES = frozenset({"call", "email", "sms", "letter"})
CALL_OUTCOMES = frozenset({"connected", "no_answer", "left_voicemail", "busy", "wrong_number", "other"})

_TOWNS = ("Leeds", "Harrogate", "York", "Wakefield", "Bradford", "Halifax", "Huddersfield", "Ilkley")
_REFERRAL = ("Walk-in", "Website", "GP referral", "Friend/family", "Google", "")
_CONTACT_TIMES = ("Morning", "Afternoon", "After 5pm", "Any time", "")


def sycle_timestamp(value: datetime) -> str:
    """Sycle's timestamps: UK local time with its offset, to the second (`2025-06-01T10:15:30+01:00`)."""
    return value.astimezone(UK_TZ).isoformat(timespec="seconds")


def _uk_date(value: date | None) -> str:
    """Custom fields are text as typed: UK receptionists type dates day first."""
    return value.strftime("%d/%m/%Y") if value else ""


def _sycle_error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> HttpProblem:
    return HttpProblem(status, {"errors": [{"code": code, "detail": detail}]}, headers)


def _format_phone(national: str | None, variant: int) -> str | None:
    """The same UK number typed three ways, as real Sycle data has it."""
    if not national:
        return None
    if variant == 1:
        return "+44 " + national[1:]
    if variant == 2:
        return national.replace(" ", "")
    return national


def _out(value: Any) -> Any:
    """Internal row -> JSON: datetimes in Sycle's local-offset form, dates in ISO."""
    if isinstance(value, datetime):
        return sycle_timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _out(v) for k, v in value.items()}
    return value


# Appointment types per clinic: (suffix, name, length in minutes).
CLINIC_APPOINTMENT_TYPES: tuple[tuple[str, str, int], ...] = (
    ("1", "Eye Exam", 30),
    ("2", "Contact Lens Check", 20),
    ("3", "Follow Up", 15),
    ("4", "Collection", 15),
    ("5", "Hearing Test", 60),
)
# Referral sources per clinic: (suffix, name, subcategories).
REFERRAL_SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("1", "Recall", ("Phone recall", "Letter recall")),
    ("2", "Website", ("Online booking",)),
    ("3", "Walk-in", ()),
    ("4", "GP referral", ()),
)
# Staff who are not GOC registrants (Sycle accounts are often audiology first): no GOC number.
OTHER_STAFF: tuple[tuple[str, str, str, str], ...] = (("Ms", "Priya", "Raman", "Hearing Care Practitioner"),)
_HONORIFICS = frozenset({"mr", "mrs", "ms", "miss", "dr", "prof", "mx"})


def staff_name(name: str) -> tuple[str, str, str]:
    """A seed clinician's name as Sycle's staff `title`, `first_name`, `last_name`."""
    parts = name.replace(".", "").split()
    title = parts.pop(0) if len(parts) > 2 and parts[0].lower() in _HONORIFICS else ""
    while len(parts) > 2 and parts[-1].upper() in {"MBE", "OBE", "PHD", "BSC", "MSC", "DDS", "MD", "JR", "SR"}:
        parts.pop()
    return title, parts[0], " ".join(parts[1:]) or parts[0]


@dataclass(slots=True)
class _Clinic:
    """One clinic's data. Rows other than patients are kept as dicts with real datetimes."""

    clinic_id: str
    name: str
    town: str
    base: int  # patient numbers are base + seed index: unique across the account
    patients: dict[str, SeedPatient]
    order: list[str]  # patient ids in Sycle's order
    rendered: dict[str, dict[str, Any]]
    alerts: list[dict[str, Any]]
    recalls: list[dict[str, Any]]
    appointments: list[dict[str, Any]]
    communications: list[dict[str, Any]]
    web_patients: dict[str, dict[str, Any]]  # patients `appointment` made from details that matched no one
    next_id: int = 1


class SycleSandbox(SandboxServer):
    """A faithful stand-in for Sycle's vendor API, served for real over HTTP.

    `clinics` maps clinic ids (account-prefixed, `2803-9506`) to patient counts (each clinic is a
    separate NVC practice: the integration guide's "Location ID"); `logins` maps vendor API user
    names to passwords (one login reads every clinic of the account). Each clinic is seeded from
    `(seed, clinic id)` on first use.
    """

    name = "sycle"
    problem = staticmethod(_sycle_error)
    stock_errors = {
        404: ("not_found", "No endpoint {path}."),
        429: ("rate_limited", "Rate limit exceeded; retry later."),
        500: ("internal_error", "Something went wrong."),
        503: ("maintenance", "Sycle is down for maintenance."),
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        account: str = ACCOUNT,
        clinics: dict[str, int] | None = None,
        logins: dict[str, str] | None = None,
        api_enabled: bool = True,
        seed: int = 7,
        rate_limit_per_second: float = 50.0,
        today: date | None = None,
        collision_limit: int = 1,
        token_ttl_seconds: float = 3600.0,
    ):
        super().__init__(host, port, seed=seed, rate_limit_per_second=rate_limit_per_second)
        self.account = account
        default_clinics = {f"{account}-9506": 50, f"{account}-9507": 20}
        self.clinics: dict[str, int] = dict(clinics if clinics is not None else default_clinics)
        self.logins: dict[str, str] = dict(logins if logins is not None else {DEMO_USERNAME: DEMO_PASSWORD})
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (user name, expires at, monotonic)
        self.api_enabled = api_enabled
        self.seed = seed
        self.today = today
        self.collision_limit = collision_limit
        self.token_ttl_seconds = token_ttl_seconds
        self.custom_fields: dict[str, tuple[str, str, str]] = dict(DEFAULT_CUSTOM_FIELDS)
        self.clinicians = seed_clinicians(seed)
        self.staff: dict[str, dict[str, Any]] = {}
        for clinician in self.clinicians:
            title, first, last = staff_name(clinician.name)
            role = "Optometrist" if clinician.goc_number.startswith("01-") else "Dispensing Optician"
            self.staff[_staff_id(account, clinician)] = {
                "title": title,
                "first_name": first,
                "last_name": last,
                "role": role,
                "goc_number": clinician.goc_number,
            }
        for n, (title, first, last, role) in enumerate(OTHER_STAFF, 90):
            self.staff[f"{account}-S{n}"] = {
                "title": title,
                "first_name": first,
                "last_name": last,
                "role": role,
                "goc_number": None,
            }
        self._data: dict[str, _Clinic] = {}
        for endpoint, handler in (
            ("token", self._token),
            ("clinics", self._list_clinics),
            ("clinics/{clinic_id}", self._get_clinic),
            ("open_slots", self._open_slots),
            ("appointment", self._book),
            ("patient_fields", self._list_fields),
            ("staff", self._list_staff),
            ("patients", self._list_patients),
            ("patients/{patient_id}", self._get_patient),
            ("clinical_alerts", self._list_alerts),
            ("recall_recommendations", self._list_recalls),
            ("appointments", self._list_appointments),
            ("communications", self._list_communications),
            ("communication", self._create_communication),
        ):
            self.route("GET", f"{BASE}/{endpoint}/", handler)

    # --- seeding -----------------------------------------------------------------------------------

    def _clinic_seed(self, clinic_id: str) -> int:
        """The clinic's seed, from its place in the account (the n-th clinic is seeded alike in every sandbox)."""
        ordinal = list(self.clinics).index(clinic_id) + 1
        return self.seed * 1_000_003 + zlib.crc32(f"LOC-{ordinal}".encode())

    def _load(self, clinic_id: str) -> _Clinic:
        """The clinic, seeded on first use."""
        return self.once(self._data, clinic_id, lambda: self._seed_clinic(clinic_id))

    def _id(self, number: int | str) -> str:
        return f"{self.account}-{number}"

    def _seed_clinic(self, clinic_id: str) -> _Clinic:
        ordinal = list(self.clinics).index(clinic_id) + 1
        seed = self._clinic_seed(clinic_id)
        base = ordinal * 1_000_000
        records = seed_patients(self.clinics[clinic_id], seed=seed, today=self.today)
        by_index = {p.index: p for p in records}
        patients = {self._id(base + p.index): p for p in records}
        town = _TOWNS[(ordinal - 1) % len(_TOWNS)]
        data = _Clinic(
            clinic_id=clinic_id,
            name=f"Brightsight Opticians {town}",
            town=town,
            base=base,
            patients=patients,
            order=sorted(patients, key=_number),
            rendered={},
            alerts=[],
            recalls=[],
            appointments=[],
            communications=[],
            web_patients={},
        )
        rng = random.Random(seed)
        exams = {c.patient_index: c for c in seed_clinical_records(records, seed=seed, today=self.today)}
        optometrists = [c for c in self.clinicians if c.goc_number.startswith("01-")]
        for p in records:
            pid = self._id(base + p.index)
            exam = exams.get(p.index)
            recorded_on = exam.exam_date if exam else p.updated_at.date()
            staff = _staff_id(self.account, exam.clinician if exam else optometrists[p.index % len(optometrists)])
            for flag in p.flags:
                label = rng.choice(ALERT_LABELS[flag])
                comment = exam.notes if exam else None
                self._add_alert(data, pid, label, comment, recorded_on, staff, True, p.updated_at)
            roll = rng.random()
            if roll < 0.04 and "glaucoma_suspect" not in p.flags and "glaucoma" not in p.flags:
                # Discharged: a resolved alert must not flag the patient.
                comment = "Discharged by HES, discs stable"
                self._add_alert(data, pid, "Glaucoma Suspect", comment, recorded_on, staff, False, p.updated_at)
            elif roll < 0.08:
                self._add_alert(data, pid, rng.choice(OTHER_ALERTS), None, recorded_on, None, True, p.updated_at)
            if p.recall_due:
                self._add_recall(data, pid, "Eye Exam", p.recall_due, "open", p.updated_at)
            if p.clinical_notes and "ontact lens" in p.clinical_notes:
                due = (p.last_eye_test or p.updated_at.date()) + timedelta(days=180)
                self._add_recall(data, pid, "Contact Lens Check", due, "open", p.updated_at)
            if p.last_eye_test and rng.random() < 0.25:
                self._add_recall(data, pid, "Eye Exam", p.last_eye_test, "completed", p.updated_at)
        for appt in seed_appointments(records, seed=seed, today=self.today):
            start = appt.starts_at.replace(tzinfo=UK_TZ)
            status = {"booked": "scheduled", "completed": "completed", "cancelled": "cancelled"}.get(
                appt.status, appt.status
            )
            if status == "scheduled" and appt.index % 3 == 0:
                status = "confirmed"
            kind = APPOINTMENT_TYPES.get(appt.appointment_type, "Other")
            data.appointments.append(
                {
                    "appt_id": self._id(f"{ordinal}{appt.index:07d}"),
                    "patient_id": self._id(base + appt.patient_index),
                    "clinic_id": clinic_id,
                    "start": start,
                    "end": start + timedelta(minutes=appt.duration_minutes),
                    "appt_type_id": self._appt_type_id(kind),
                    "appt_type": kind,
                    "status": status,
                    "staff_id": _staff_id(self.account, appt.clinician),
                    "notes": appt.notes,
                    "updated_at": max(appt.updated_at, by_index[appt.patient_index].updated_at),
                }
            )
        data.next_id = ordinal * 10_000_000 + 5_000_000
        return data

    def _appt_type_id(self, name: str) -> str | None:
        return next((self._id(k) for k, n, _ in CLINIC_APPOINTMENT_TYPES if n == name), None)

    @staticmethod
    def _add_alert(
        data: _Clinic,
        patient_id: str,
        label: str,
        comment: str | None,
        recorded_on: date,
        staff_id: str | None,
        active: bool,
        updated_at: datetime,
    ) -> None:
        data.alerts.append(
            {
                "alert_id": f"{data.clinic_id.split('-')[0]}-{len(data.alerts) + 1}",
                "patient_id": patient_id,
                "alert": label,
                "comment": comment,
                "active": active,
                "recorded_on": recorded_on,
                "staff_id": staff_id,
                "updated_at": updated_at,
            }
        )

    @staticmethod
    def _add_recall(
        data: _Clinic, patient_id: str, recall_type: str, due: date, status: str, updated_at: datetime
    ) -> None:
        data.recalls.append(
            {
                "recall_id": f"{data.clinic_id.split('-')[0]}-{len(data.recalls) + 1}",
                "patient_id": patient_id,
                "recall_type": recall_type,
                "due_date": due,
                "status": status,
                "updated_at": updated_at,
            }
        )

    # --- rendering ---------------------------------------------------------------------------------

    def set_custom_fields(self, layout: dict[str, tuple[str, str, str]]) -> None:
        """Change the account's custom field layout: key -> (label, type, source), see CUSTOM_SOURCES."""
        unknown = {source for _, _, source in layout.values()} - CUSTOM_SOURCES
        if unknown:
            raise ValueError(f"unknown custom field sources {sorted(unknown)}")
        with self.lock:
            self.custom_fields = dict(layout)
            for data in self._data.values():
                data.rendered.clear()

    @staticmethod
    def _previous_eye_test(patient: SeedPatient) -> date | None:
        if not patient.last_eye_test:
            return None
        previous = patient.last_eye_test - timedelta(days=700 + patient.index % 60)
        if patient.date_of_birth and previous <= patient.date_of_birth:
            return None
        return previous

    def _custom_value(self, patient: SeedPatient, source: str) -> str:
        if source == "referral_source":
            return _REFERRAL[patient.index % len(_REFERRAL)]
        if source == "contact_time":
            return _CONTACT_TIMES[patient.index % len(_CONTACT_TIMES)]
        if source == "last_eye_test":
            return _uk_date(patient.last_eye_test)
        if source == "previous_eye_test":
            return _uk_date(self._previous_eye_test(patient))
        if source == "recall_due":
            return _uk_date(patient.recall_due)
        if source == "date_of_death":
            return _uk_date(patient.status_date if patient.status == "deceased" else None)
        return ""

    def render(self, data: _Clinic, patient_id: str) -> dict[str, Any]:
        """A patient as Sycle's API returns it."""
        p = data.patients[patient_id]
        mobile = _format_phone(p.mobile, p.index % 3)
        landline = _format_phone(p.landline, (p.index // 3) % 3)
        if p.index % 11 == 0 and mobile and landline:
            mobile, landline = landline, mobile  # typed into the wrong boxes, as happens
        address_1, rest = p.address_line1, ""
        if address_1.startswith("Flat") and ", " in address_1:
            address_1, rest = address_1.split(", ", 1)
        return {
            "patient_id": patient_id,
            "title": p.title,
            "first_name": p.first_name,
            "last_name": p.last_name,
            "birth_date": p.date_of_birth.isoformat() if p.date_of_birth else None,
            "phone": landline,
            "cell_phone": mobile,
            "email": p.email,
            "address_1": address_1,
            "address_2": rest or None,
            "city": p.town,
            "postcode": p.postcode,
            "notes": p.clinical_notes,
            "status": SYCLE_PATIENT_STATUSES.get(p.status, p.status),
            "do_not_call": not p.phone_recall,
            "do_not_text": p.sms_consent is False,
            "do_not_email": p.email_consent is False,
            "recall_opt_out": p.no_recall,
            "responsible_party": p.guardian_name or SELF,
            "custom_fields": {key: self._custom_value(p, source) for key, (_, _, source) in self.custom_fields.items()},
            "updated_at": sycle_timestamp(p.updated_at),
        }

    def _rendered(self, data: _Clinic, patient_id: str) -> dict[str, Any]:
        cached = data.rendered.get(patient_id)
        if cached is None:
            cached = data.rendered[patient_id] = self.render(data, patient_id)
        return cached

    # --- inspection hooks ----------------------------------------------------------------------------

    def patient_count(self, practice_ref: str) -> int:
        return len(self._load(practice_ref).patients)

    def patients(self, location_id: str) -> dict[str, SeedPatient]:
        """The location's current records (after any `touch`), by Sycle patient id."""
        data = self._load(location_id)
        with self.lock:
            return {pid: data.patients[pid] for pid in data.order}

    def seed_records(self, location_id: str) -> dict[str, SeedPatient]:
        """Sycle patient id -> the canonical record the API renders (current, after any edits)."""
        return self.patients(location_id)

    def patient_row(self, location_id: str, patient_id: str) -> dict[str, Any]:
        data = self._load(location_id)
        with self.lock:
            return dict(self._rendered(data, patient_id))

    def alerts(self, location_id: str) -> list[dict[str, Any]]:
        data = self._load(location_id)
        with self.lock:
            return [dict(a) for a in data.alerts]

    def recalls(self, location_id: str) -> list[dict[str, Any]]:
        data = self._load(location_id)
        with self.lock:
            return [dict(r) for r in data.recalls]

    def expire_tokens(self) -> None:
        """Every token issued so far expires now (as after the token's lifetime)."""
        with self.lock:
            self.tokens = {t: (user, 0.0) for t, (user, _) in self.tokens.items()}

    def staff_goc_numbers(self) -> dict[str, str | None]:
        """Staff id -> the GOC number Sycle holds for them (None: not a GOC registrant)."""
        return {sid: s["goc_number"] for sid, s in self.staff.items()}

    def update_patient(
        self, location_id: str, patient_id: str, *, now: datetime | None = None, **changes: Any
    ) -> SeedPatient:
        """Change fields of one `SeedPatient` as a receptionist would, bumping `updated_at`.

        Any field may change, the contact ones too (`status`, `status_date`, `phone_recall`,
        `no_recall`, `sms_consent`, `email_consent`, `guardian_name`), so an incremental read sees a
        patient marked deceased or opted out mid-day; a `status` NVC does not know is sent verbatim.
        """
        data = self._load(location_id)
        with self.lock:
            return self._edit(data, patient_id, now or datetime.now(UTC), changes)

    def add_alert(
        self, location_id: str, patient_id: str, label: str, *, active: bool = True, now: datetime | None = None
    ) -> None:
        """An optometrist adds an alert; the patient record itself is not changed."""
        data = self._load(location_id)
        stamp = now or datetime.now(UTC)
        with self.lock:
            self._add_alert(data, patient_id, label, None, stamp.date(), None, active, stamp)

    def touch(self, practice_ref: str, count: int, now: datetime | None = None) -> list[str]:
        """Edit `count` patients (a new mobile, or an eye exam today) so an incremental sync sees them.

        An exam today also completes the patient's open eye exam recall. Returns the patient ids.
        """
        data = self._load(practice_ref)
        stamp = now or datetime.now(UTC)
        with self.lock:
            chosen = self.touch_sample(data.order, count, self._clinic_seed(practice_ref), stamp, key=_number)
            wanted = set(chosen)
            open_recalls: dict[str, list[dict[str, Any]]] = {}
            for recall in data.recalls:
                if (
                    recall["patient_id"] in wanted
                    and recall["status"] == "open"
                    and recall["recall_type"] == "Eye Exam"
                ):
                    open_recalls.setdefault(recall["patient_id"], []).append(recall)
            for k, patient_id in enumerate(chosen):
                changes = self.touch_change(data.patients[patient_id], k, stamp.date())
                if "last_eye_test" in changes:
                    for recall in open_recalls.get(patient_id, []):
                        recall.update(status="completed", updated_at=stamp)
                self._edit(data, patient_id, stamp, changes)
        return chosen

    @staticmethod
    def _edit(data: _Clinic, patient_id: str, stamp: datetime, changes: dict[str, Any]) -> SeedPatient:
        new = replace(data.patients[patient_id], **changes, updated_at=stamp.astimezone(UTC))
        data.patients[patient_id] = new
        data.rendered.pop(patient_id, None)
        return new

    def nvc_appointments(self, practice_ref: str) -> list[dict[str, Any]]:
        data = self._load(practice_ref)
        with self.lock:
            rows = [dict(a) for a in data.appointments]
        out = []
        for row in rows:
            reference = find_nvc_reference(row.get("notes"))
            if reference:
                out.append(
                    {
                        "pms_appointment_id": row["appt_id"],
                        "pms_patient_id": row["patient_id"],
                        "starts_at": row["start"].astimezone(UTC),
                        "ends_at": row["end"].astimezone(UTC),
                        "staff_id": row["staff_id"],
                        "nvc_reference": reference,
                    }
                )
        return out

    def nvc_notes(self, practice_ref: str) -> list[dict[str, Any]]:
        data = self._load(practice_ref)
        with self.lock:
            rows = [dict(c) for c in data.communications]
        out = []
        for row in rows:
            reference = find_nvc_reference(row.get("note"))
            if reference:
                out.append(
                    {
                        "pms_note_id": row["communication_id"],
                        "pms_patient_id": row["patient_id"],
                        "kind": row["type"],
                        "outcome": row["outcome"],
                        "occurred_at": row["occurred_at"].astimezone(UTC),
                        "note": row["note"],
                        "nvc_reference": reference,
                    }
                )
        return out

    # --- dialect: the JSON body, the token, paging, filters -----------------------------------------

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        """The call's JSON body (Sycle reads it whatever the Content-Type says); anything else is refused."""
        if request.body is None:
            return {}
        if not isinstance(request.body, dict):
            raise _sycle_error(400, "invalid_body", "The request body must be a JSON object.")
        return request.body

    def faults_apply(self, path: str) -> bool:
        return True

    def loses_response(self, request: Request, response: Response, roll: float) -> bool:
        """Sycle writes are GETs too: a booking or a note whose answer is lost after it was made."""
        rate = self.faults.lost_response_after_write_rate
        return request.path in WRITE_ENDPOINTS and bool(rate) and roll < rate and response.status < 400

    def _authorise(self, request: Request) -> dict[str, Any]:
        body = self._body(request)
        token = body.get("token")
        with self.lock:
            found = self.tokens.get(token) if isinstance(token, str) else None
            if found is not None and found[1] <= time.monotonic():
                raise _sycle_error(401, "token_expired", "The token has expired; request a new one.")
        if found is None:
            raise _sycle_error(401, "token_invalid", "The token is missing or invalid.")
        if not self.api_enabled:
            raise _sycle_error(403, "api_disabled", "Vendor API access is not enabled for this account.")
        return body

    def _clinic(self, request: Request, clinic_id: Any = None) -> tuple[_Clinic, dict[str, Any]]:
        body = self._authorise(request)
        wanted = clinic_id if clinic_id is not None else body.get("clinic_id")
        if wanted not in self.clinics:
            raise _sycle_error(404, "clinic_not_found", f"No clinic {wanted} in this account.")
        return self._load(wanted), body

    def bad_parameter(self, name: str, message: str) -> HttpProblem:
        return _sycle_error(422, f"invalid_{name}", message)

    def _int_field(self, body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
        raw = body.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except (TypeError, ValueError):
            value = low - 1
        if isinstance(raw, bool) or not low <= value <= high:
            raise self.bad_parameter(name, f"{name} must be a whole number from {low} to {high}.")
        return value

    @staticmethod
    def _since(body: dict[str, Any]) -> datetime | None:
        raw = body.get("updated_since")
        if raw is None:
            return None
        try:
            value = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError:
            raise _sycle_error(422, "invalid_updated_since", "updated_since must be an ISO 8601 timestamp.") from None
        if value.tzinfo is None:
            raise _sycle_error(422, "invalid_updated_since", "updated_since needs a UTC offset.")
        return value

    @staticmethod
    def _patient_filter(body: dict[str, Any]) -> set[str] | None:
        raw = body.get("patient_ids")
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) > 100:
            raise _sycle_error(422, "invalid_patient_ids", "patient_ids must be a list of at most 100 ids.")
        return {str(x) for x in raw}

    def _page(self, body: dict[str, Any], key: str, rows: list[Any], render: Any = None) -> Response:
        page = self._int_field(body, "page", 1, 1, 1_000_000)
        per_page = self._int_field(body, "per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
        total = len(rows)
        chunk = rows[(page - 1) * per_page : page * per_page]
        meta = {"page": page, "per_page": per_page, "total_pages": math.ceil(total / per_page), "total_count": total}
        return Response(200, {key: [(render or _out)(r) for r in chunk], "meta": meta})

    def _filtered(self, body: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        since = self._since(body)
        wanted = self._patient_filter(body)
        return [
            r
            for r in rows
            if (since is None or r["updated_at"] >= since) and (wanted is None or r["patient_id"] in wanted)
        ]

    # --- published endpoints -------------------------------------------------------------------------

    def _token(self, request: Request) -> Response:
        body = self._body(request)
        username, password = body.get("username"), body.get("password")
        with self.lock:
            known = isinstance(username, str) and self.logins.get(username)
            if not known or not isinstance(password, str) or not secrets.compare_digest(known, password):
                raise _sycle_error(401, "invalid_credentials", "The user name or password is not correct.")
            if not self.api_enabled:
                raise _sycle_error(403, "api_disabled", "Vendor API access is not enabled for this account.")
            token = secrets.token_hex(20)
            self.tokens[token] = (username, time.monotonic() + self.token_ttl_seconds)
        return Response(200, {"token": token})

    def _clinic_detail(self, clinic_id: str) -> dict[str, Any]:
        ordinal = list(self.clinics).index(clinic_id) + 1
        data = self._data.get(clinic_id)
        town = data.town if data else _TOWNS[(ordinal - 1) % len(_TOWNS)]
        return {
            "clinic": {
                "clinic_id": clinic_id,
                "clinic_name": data.name if data else f"Brightsight Opticians {town}",
                "address": {
                    "street1": f"{10 + ordinal} High Street",
                    "street2": "",
                    "city": town,
                    "state": "West Yorkshire",
                    "country": "GB",
                    "zip": f"LS{ordinal} {ordinal}AB",
                },
                "phone1": f"0113 496 0{ordinal:03d}",
                "phone2": "",
                "collision_limit": self.collision_limit,
            },
            "appointment_types": [
                {"appt_type_id": self._id(k), "name": n, "length": length} for k, n, length in CLINIC_APPOINTMENT_TYPES
            ],
            "referral_sources": [
                {
                    "ref_source_id": self._id(k),
                    "name": n,
                    "referral_subcategories": [
                        {"sub_ref_id": self._id(f"{k}{j}"), "name": sub} for j, sub in enumerate(subs, 1)
                    ],
                }
                for k, n, subs in REFERRAL_SOURCES
            ],
        }

    def _list_clinics(self, request: Request) -> Response:
        self._authorise(request)  # `proximity` is accepted and ignored: every clinic is listed
        return Response(200, {"clinic_details": [self._clinic_detail(c) for c in self.clinics]})

    def _get_clinic(self, request: Request) -> Response:
        self._clinic(request, request.params["clinic_id"])
        return Response(200, {"clinic_details": self._clinic_detail(request.params["clinic_id"])})

    @staticmethod
    def _day(body: dict[str, Any], name: str) -> date:
        try:
            return date.fromisoformat(str(body.get(name) or "")[:10])
        except ValueError:
            raise _sycle_error(422, f"invalid_{name}", f"{name} must be YYYY-MM-DD.") from None

    def _busy(self, data: _Clinic, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return [
            a
            for a in data.appointments
            if a["status"] not in ("cancelled", "no_show") and a["start"] < end and start < a["end"]
        ]

    def _free_staff(self, data: _Clinic, start: datetime, minutes: int) -> list[str]:
        """The staff who can see a patient from `start` for `minutes`: the clinic below its
        collision limit, and the member without an appointment then."""
        end = start + timedelta(minutes=minutes)
        busy = self._busy(data, start, end)
        if len(busy) >= self.collision_limit:
            return []
        taken = {a["staff_id"] for a in busy}
        return [sid for sid, s in self.staff.items() if s["goc_number"] and sid not in taken]

    def _open_slots(self, request: Request) -> Response:
        data, body = self._clinic(request)
        first, last = self._day(body, "start_date"), self._day(body, "end_date")
        if last < first or (last - first).days > MAX_SLOT_DAYS:
            raise _sycle_error(422, "invalid_end_date", f"end_date must be 0 to {MAX_SLOT_DAYS} days after start_date.")
        length = self._int_field(body, "length", 30, 5, 240)
        slots: dict[str, list[dict[str, str]]] = {sid: [] for sid, s in self.staff.items() if s["goc_number"]}
        with self.lock:
            day = first
            while day <= last:
                for minute in range(DAY_OPENS, DAY_CLOSES - length + 1, SLOT_STEP_MINUTES):
                    start = datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=UK_TZ)
                    for sid in self._free_staff(data, start, length):
                        slots[sid].append({"time": start.strftime(SLOT_FORMAT)})
                day += timedelta(days=1)
        out = []
        for sid, times in slots.items():
            s = self.staff[sid]
            out.append({"staff": {k: s[k] for k in ("title", "first_name", "last_name")}, "slots": times})
        return Response(200, {"open_slots": out})

    def _match_patient(self, data: _Clinic, details: dict[str, Any]) -> str | None:
        """The patient these details name: first and last name, plus phone (digits) or email."""
        first, last = _folded(details.get("first_name")), _folded(details.get("last_name"))
        phone, email = _digits(details.get("phone")), _folded(details.get("email"))
        candidates = list(data.order) + list(data.web_patients)
        for pid in candidates:
            row = data.web_patients.get(pid) or self._rendered(data, pid)
            if (_folded(row.get("first_name")), _folded(row.get("last_name"))) != (first, last):
                continue
            phones = {_digits(row.get("phone")), _digits(row.get("cell_phone"))} - {""}
            mail = _folded(row.get("email"))
            if (phone and phone in phones) or (email and email == mail) or (not phone and not email):
                return pid
        return None

    def _book(self, request: Request) -> Response:
        data, body = self._clinic(request)
        raw = body.get("start")
        try:
            start = datetime.strptime(str(raw), SLOT_FORMAT).replace(tzinfo=UK_TZ)
        except ValueError:
            raise _sycle_error(422, "invalid_start", "start must be YYYY-MM-DD HH:MM:SS (clinic local time).") from None
        kind = next((t for t in CLINIC_APPOINTMENT_TYPES if self._id(t[0]) == body.get("appt_type_id")), None)
        if kind is None:
            raise _sycle_error(422, "invalid_appt_type_id", f"No appointment type {body.get('appt_type_id')!r}.")
        source = next((r for r in REFERRAL_SOURCES if r[1] == body.get("ref_source_name")), None)
        if body.get("ref_source_name") and source is None:
            raise _sycle_error(422, "invalid_ref_source_name", f"No referral source {body.get('ref_source_name')!r}.")
        sub = body.get("sub_ref_name")
        if sub and (source is None or sub not in source[2]):
            raise _sycle_error(422, "invalid_sub_ref_name", f"No referral subcategory {sub!r}.")
        patient = body.get("patient")
        if not isinstance(patient, dict) or not str(patient.get("last_name") or "").strip():
            raise _sycle_error(422, "invalid_patient", "patient needs at least a last_name.")
        notes = body.get("notes")  # modelled: an optional note on the appointment
        if notes is not None and (not isinstance(notes, str) or len(notes) > 2000):
            raise _sycle_error(422, "invalid_notes", "notes must be text of at most 2000 characters.")
        with self.lock:
            free = self._free_staff(data, start, kind[2])
            if not free or not DAY_OPENS <= start.hour * 60 + start.minute <= DAY_CLOSES - kind[2]:
                raise _sycle_error(409, "slot_unavailable", "That time is not an open slot at this clinic.")
            patient_id = self._match_patient(data, patient)
            if patient_id is None:  # a new patient, as a booking from the practice's website makes one
                patient_id = self._id(f"W{data.next_id}")
                data.next_id += 1
                data.web_patients[patient_id] = {
                    "patient_id": patient_id,
                    **{k: patient.get(k) for k in ("first_name", "last_name", "phone", "email")},
                }
            stamp = datetime.now(UTC)
            row = {
                "appt_id": self._id(data.next_id),
                "patient_id": patient_id,
                "clinic_id": data.clinic_id,
                "start": start,
                "end": start + timedelta(minutes=kind[2]),
                "appt_type_id": self._id(kind[0]),
                "appt_type": kind[1],
                "status": "scheduled",
                "staff_id": free[0],
                "ref_source_name": body.get("ref_source_name"),
                "sub_ref_name": sub,
                "notes": notes,
                "updated_at": stamp,
            }
            data.next_id += 1
            data.appointments.append(row)
            return Response(200, {"appointment": _out(row)})

    # --- modelled endpoints (no public description; same style) -------------------------------------

    def _list_fields(self, request: Request) -> Response:
        self._clinic(request)
        with self.lock:
            custom = list(self.custom_fields.items())
        fields = [{"key": k, "label": label, "type": kind, "custom": False} for k, label, kind in STANDARD_FIELDS]
        fields += [{"key": k, "label": label, "type": kind, "custom": True} for k, (label, kind, _) in custom]
        return Response(200, {"fields": fields})

    def _list_staff(self, request: Request) -> Response:
        self._clinic(request)
        return Response(200, {"staff": [{"staff_id": sid, **s} for sid, s in self.staff.items()]})

    def _list_patients(self, request: Request) -> Response:
        data, body = self._clinic(request)
        since = self._since(body)
        wanted = self._patient_filter(body)
        with self.lock:
            ids = data.order if wanted is None else [pid for pid in data.order if pid in wanted]
            if since is not None:
                ids = [pid for pid in ids if data.patients[pid].updated_at >= since]
            return self._page(body, "patients", ids, lambda pid: self._rendered(data, pid))

    def _get_patient(self, request: Request) -> Response:
        data, _ = self._clinic(request)
        patient_id = request.params["patient_id"]
        with self.lock:
            if patient_id not in data.patients:
                raise _sycle_error(404, "patient_not_found", f"No patient {patient_id} at this clinic.")
            return Response(200, {"patient": self._rendered(data, patient_id)})

    def _list_alerts(self, request: Request) -> Response:
        data, body = self._clinic(request)
        with self.lock:
            return self._page(body, "clinical_alerts", self._filtered(body, data.alerts))

    def _list_recalls(self, request: Request) -> Response:
        data, body = self._clinic(request)
        with self.lock:
            return self._page(body, "recall_recommendations", self._filtered(body, data.recalls))

    def _list_appointments(self, request: Request) -> Response:
        data, body = self._clinic(request)
        day = body.get("date")
        try:
            on = date.fromisoformat(day) if day else None
        except (TypeError, ValueError):
            raise _sycle_error(422, "invalid_date", "date must be YYYY-MM-DD.") from None
        with self.lock:
            rows = self._filtered(body, data.appointments)
            if on is not None:
                rows = [r for r in rows if r["start"].astimezone(UK_TZ).date() == on]
            return self._page(body, "appointments", rows)

    def _patient_id(self, data: _Clinic, raw: Any) -> str:
        text = str(raw if raw is not None else "").strip()
        if text not in data.patients:
            raise _sycle_error(404, "patient_not_found", f"No patient {text or '(none)'} at this clinic.")
        return text

    def _list_communications(self, request: Request) -> Response:
        data, body = self._clinic(request)
        kind = body.get("type")
        with self.lock:
            patient_id = self._patient_id(data, body.get("patient_id"))
            rows = [
                c for c in data.communications if c["patient_id"] == patient_id and (kind is None or c["type"] == kind)
            ]
            return self._page(body, "communications", rows)

    def _create_communication(self, request: Request) -> Response:
        data, body = self._clinic(request)
        with self.lock:
            patient_id = self._patient_id(data, body.get("patient_id"))
            if body.get("type") not in COMMUNICATION_TYPES:
                raise _sycle_error(422, "invalid_type", f"type must be one of {sorted(COMMUNICATION_TYPES)}.")
            if body.get("direction") not in ("inbound", "outbound"):
                raise _sycle_error(422, "invalid_direction", "direction must be inbound or outbound.")
            if body.get("type") == "call" and body.get("outcome") not in CALL_OUTCOMES:
                raise _sycle_error(422, "invalid_outcome", f"outcome must be one of {sorted(CALL_OUTCOMES)}.")
            note = body.get("note")
            if not isinstance(note, str) or not note.strip() or len(note) > 2000:
                raise _sycle_error(422, "invalid_note", "note must be text of 1 to 2000 characters.")
            try:
                occurred = datetime.fromisoformat(str(body.get("occurred_at")))
            except ValueError:
                occurred = None
            if occurred is None or occurred.tzinfo is None:
                raise _sycle_error(422, "invalid_occurred_at", "occurred_at must be ISO 8601 with an offset.")
            stamp = datetime.now(UTC)
            row = {
                "communication_id": self._id(data.next_id),
                "patient_id": patient_id,
                "type": body["type"],
                "direction": body["direction"],
                "outcome": body.get("outcome"),
                "note": note,
                "occurred_at": occurred,
                "created_at": stamp,
                "updated_at": stamp,
            }
            data.next_id += 1
            data.communications.append(row)
            return Response(200, {"communication": _out(row)})


def _number(patient_id: str) -> tuple[int, str]:
    """Sycle's order of account-prefixed ids: by the number after the prefix."""
    tail = patient_id.rpartition("-")[2]
    return (int(tail), "") if tail.isdigit() else (10**12, tail)


def _staff_id(account: str, clinician: SeedClinician) -> str:
    return f"{account}-S{clinician.code[1:]}"


def _folded(value: Any) -> str:
    return " ".join(str(value or "").split()).casefold()


def _digits(value: Any) -> str:
    """A phone number's digits, +44 read as the leading 0."""
    digits = re.sub(r"\D", "", str(value or ""))
    return "0" + digits[2:] if digits.startswith("44") else digits
