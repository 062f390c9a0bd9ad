"""A Sycle-style cloud PMS on loopback: one account, several locations, a `Token` API key, page numbers.

Sycle's dialect, as the client has to cope with it: everything under `/api/v1`, an account-wide
API token sent as `Authorization: Token <token>` (tokens can expire), each location of the account
addressed as `/locations/{location_id}/...`, snake_case JSON, `page`/`per_page` paging with
`meta.total_pages`/`total_count`, numeric patient ids, `phone` and `cell_phone` as separate fields
written however the receptionist typed them, timestamps in UK local time with their offset, and the
clinical data the recall rules need spread over custom fields (`custom_fields.custom_3` holds the
last eye exam in the default account layout), clinical alerts and recall recommendations. Errors
are `{"errors": [{"code", "detail"}]}`.

What the practice recorded about reaching a patient is in Sycle's words too. Standard fields:
`status` (`active`, `inactive`, `deceased` or `moved`), Sycle's opt-out boxes `do_not_call`,
`do_not_text` and `do_not_email` (Sycle records refusals, not consent: an unticked box is not a
refusal), `recall_opt_out` (no recall by any channel) and `responsible_party` (a child's parent or
guardian as typed, `Self` for a patient responsible for themselves). The date of death is not a
standard field: UK accounts keep it in a custom field (`custom_fields.custom_6`, "Date of Death",
typed day first, in the default layout), read through the same field mapping as the last eye exam.

There is no DELETE route: nothing NVC does may remove data from a practice's system.
"""

from __future__ import annotations

import math
import random
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

BASE = "/api/v1"
DEFAULT_PER_PAGE = 25
MAX_PER_PAGE = 200
UK_TZ = ZoneInfo("Europe/London")

# The standard patient fields every Sycle account has: (key, label, type).
STANDARD_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("patient_id", "Patient ID", "number"),
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


def _provider_id(clinician: SeedClinician) -> str:
    return f"PRV-{clinician.code[1:]}"


def _out(value: Any) -> Any:
    """Internal row -> JSON: datetimes in Sycle's local-offset form, dates in ISO."""
    if isinstance(value, datetime):
        return sycle_timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _out(v) for k, v in value.items()}
    return value


@dataclass(slots=True)
class _Location:
    """One location's data. Rows other than patients are kept as dicts with real datetimes."""

    location_id: str
    name: str
    base: int  # patient ids are base + seed index: unique across the account
    patients: dict[str, SeedPatient]
    order: list[str]  # patient ids in Sycle's (numeric id) order
    rendered: dict[str, dict[str, Any]]
    alerts: list[dict[str, Any]]
    recalls: list[dict[str, Any]]
    appointments: list[dict[str, Any]]
    communications: list[dict[str, Any]]
    next_id: int = 1


class SycleSandbox(SandboxServer):
    """A faithful stand-in for Sycle's REST API, served for real over HTTP.

    `locations` maps location ids to patient counts (each location is a separate NVC practice);
    `tokens` maps API tokens to "active" or "expired" (a token reads every location of the
    account). Each location is seeded from `(seed, location id)` on first use.
    """

    name = "sycle"
    problem = staticmethod(_sycle_error)
    stock_errors = {
        404: ("not_found", "No route for {path}."),
        429: ("rate_limited", "Rate limit exceeded; retry later."),
        500: ("internal_error", "Something went wrong."),
        503: ("maintenance", "Sycle is down for maintenance."),
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        locations: dict[str, int] | None = None,
        tokens: dict[str, str] | None = None,
        api_enabled: bool = True,
        seed: int = 7,
        rate_limit_per_second: float = 50.0,
        today: date | None = None,
    ):
        super().__init__(host, port, seed=seed, rate_limit_per_second=rate_limit_per_second)
        self.locations: dict[str, int] = dict(locations if locations is not None else {"LOC-1": 50, "LOC-2": 20})
        self.tokens: dict[str, str] = dict(tokens if tokens is not None else {"sycle-demo-token": "active"})
        self.api_enabled = api_enabled
        self.seed = seed
        self.today = today
        self.custom_fields: dict[str, tuple[str, str, str]] = dict(DEFAULT_CUSTOM_FIELDS)
        self.clinicians = seed_clinicians(seed)
        self._providers = {_provider_id(c): c for c in self.clinicians}
        self._data: dict[str, _Location] = {}
        loc = BASE + "/locations/{location_id}"
        self.route("GET", BASE + "/locations", self._list_locations)
        self.route("GET", loc + "/fields", self._list_fields)
        self.route("GET", loc + "/providers", self._list_providers)
        self.route("GET", loc + "/patients", self._list_patients)
        self.route("GET", loc + "/patients/{patient_id}", self._get_patient)
        self.route("GET", loc + "/clinical_alerts", self._list_alerts)
        self.route("GET", loc + "/recall_recommendations", self._list_recalls)
        self.route("GET", loc + "/appointments", self._list_appointments)
        self.route("POST", loc + "/appointments", self._create_appointment)
        self.route("GET", loc + "/patients/{patient_id}/communications", self._list_communications)
        self.route("POST", loc + "/patients/{patient_id}/communications", self._create_communication)

    # --- seeding -----------------------------------------------------------------------------------

    def _location_seed(self, location_id: str) -> int:
        return self.seed * 1_000_003 + zlib.crc32(location_id.encode())

    def _load(self, location_id: str) -> _Location:
        """The location, seeded on first use."""
        return self.once(self._data, location_id, lambda: self._seed_location(location_id))

    def _seed_location(self, location_id: str) -> _Location:
        ordinal = list(self.locations).index(location_id) + 1
        seed = self._location_seed(location_id)
        base = ordinal * 1_000_000
        records = seed_patients(self.locations[location_id], seed=seed, today=self.today)
        by_index = {p.index: p for p in records}
        patients = {str(base + p.index): p for p in records}
        data = _Location(
            location_id=location_id,
            name=f"Brightsight Opticians {_TOWNS[(ordinal - 1) % len(_TOWNS)]}",
            base=base,
            patients=patients,
            order=sorted(patients, key=int),
            rendered={},
            alerts=[],
            recalls=[],
            appointments=[],
            communications=[],
        )
        rng = random.Random(seed)
        exams = {c.patient_index: c for c in seed_clinical_records(records, seed=seed, today=self.today)}
        optometrists = [c for c in self.clinicians if c.goc_number.startswith("01-")]
        for p in records:
            pid = base + p.index
            exam = exams.get(p.index)
            recorded_on = exam.exam_date if exam else p.updated_at.date()
            provider = _provider_id(exam.clinician if exam else optometrists[p.index % len(optometrists)])
            for flag in p.flags:
                label = rng.choice(ALERT_LABELS[flag])
                comment = exam.notes if exam else None
                self._add_alert(data, pid, label, comment, recorded_on, provider, True, p.updated_at)
            roll = rng.random()
            if roll < 0.04 and "glaucoma_suspect" not in p.flags and "glaucoma" not in p.flags:
                # Discharged: a resolved alert must not flag the patient.
                comment = "Discharged by HES, discs stable"
                self._add_alert(data, pid, "Glaucoma Suspect", comment, recorded_on, provider, False, p.updated_at)
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
            data.appointments.append(
                {
                    "appointment_id": int(f"{ordinal}{appt.index:07d}"),
                    "patient_id": base + appt.patient_index,
                    "location_id": location_id,
                    "start_time": start,
                    "end_time": start + timedelta(minutes=appt.duration_minutes),
                    "appointment_type": APPOINTMENT_TYPES.get(appt.appointment_type, "Other"),
                    "status": status,
                    "provider_id": _provider_id(appt.clinician),
                    "notes": appt.notes,
                    "updated_at": max(appt.updated_at, by_index[appt.patient_index].updated_at),
                }
            )
        data.next_id = ordinal * 10_000_000 + 5_000_000
        return data

    @staticmethod
    def _add_alert(
        data: _Location,
        patient_id: int,
        label: str,
        comment: str | None,
        recorded_on: date,
        provider_id: str | None,
        active: bool,
        updated_at: datetime,
    ) -> None:
        data.alerts.append(
            {
                "alert_id": len(data.alerts) + 1,
                "patient_id": patient_id,
                "alert": label,
                "comment": comment,
                "active": active,
                "recorded_on": recorded_on,
                "provider_id": provider_id,
                "updated_at": updated_at,
            }
        )

    @staticmethod
    def _add_recall(
        data: _Location, patient_id: int, recall_type: str, due: date, status: str, updated_at: datetime
    ) -> None:
        data.recalls.append(
            {
                "recall_id": len(data.recalls) + 1,
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

    def render(self, data: _Location, patient_id: str) -> dict[str, Any]:
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
            "patient_id": int(patient_id),
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

    def _rendered(self, data: _Location, patient_id: str) -> dict[str, Any]:
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

    def expire_token(self, token: str) -> None:
        with self.lock:
            self.tokens[token] = "expired"

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
            self._add_alert(data, int(patient_id), label, None, stamp.date(), None, active, stamp)

    def touch(self, practice_ref: str, count: int, now: datetime | None = None) -> list[str]:
        """Edit `count` patients (a new mobile, or an eye exam today) so an incremental sync sees them.

        An exam today also completes the patient's open eye exam recall. Returns the patient ids.
        """
        data = self._load(practice_ref)
        stamp = now or datetime.now(UTC)
        with self.lock:
            chosen = self.touch_sample(data.order, count, self._location_seed(practice_ref), stamp, key=int)
            wanted = {int(pid) for pid in chosen}
            open_recalls: dict[int, list[dict[str, Any]]] = {}
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
                    for recall in open_recalls.get(int(patient_id), []):
                        recall.update(status="completed", updated_at=stamp)
                self._edit(data, patient_id, stamp, changes)
        return chosen

    @staticmethod
    def _edit(data: _Location, patient_id: str, stamp: datetime, changes: dict[str, Any]) -> SeedPatient:
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
                        "pms_appointment_id": str(row["appointment_id"]),
                        "pms_patient_id": str(row["patient_id"]),
                        "starts_at": row["start_time"].astimezone(UTC),
                        "ends_at": row["end_time"].astimezone(UTC),
                        "provider_id": row["provider_id"],
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
                        "pms_note_id": str(row["communication_id"]),
                        "pms_patient_id": str(row["patient_id"]),
                        "kind": row["type"],
                        "outcome": row["outcome"],
                        "occurred_at": row["occurred_at"].astimezone(UTC),
                        "note": row["note"],
                        "nvc_reference": reference,
                    }
                )
        return out

    # --- dialect: auth, paging, filters ------------------------------------------------------------

    def _authorise(self, request: Request) -> None:
        token = self.credential(request, "Token")
        with self.lock:
            status = self.tokens.get(token) if token else None
        if status is None:
            raise _sycle_error(
                401, "token_invalid", "The API token is missing or invalid.", {"WWW-Authenticate": "Token"}
            )
        if status != "active":
            raise _sycle_error(
                401, "token_expired", "The API token has expired; generate a new one.", {"WWW-Authenticate": "Token"}
            )
        if not self.api_enabled:
            raise _sycle_error(403, "api_disabled", "The API add-on is not enabled for this account.")

    def _location(self, request: Request) -> _Location:
        self._authorise(request)
        location_id = request.params["location_id"]
        if location_id not in self.locations:
            raise _sycle_error(404, "location_not_found", f"No location {location_id} in this account.")
        return self._load(location_id)

    def bad_parameter(self, name: str, message: str) -> HttpProblem:
        return _sycle_error(422, f"invalid_{name}", message)

    @staticmethod
    def _since(request: Request) -> datetime | None:
        raw = request.query.get("updated_since")
        if raw is None:
            return None
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise _sycle_error(422, "invalid_updated_since", "updated_since must be an ISO 8601 timestamp.") from None
        if value.tzinfo is None:
            raise _sycle_error(422, "invalid_updated_since", "updated_since needs a UTC offset.")
        return value

    @staticmethod
    def _patient_filter(request: Request) -> set[int] | None:
        raw = request.query.get("patient_id")
        if raw is None:
            return None
        wanted = set()
        for part in raw.split(","):
            part = part.strip()
            if part.isdigit():
                wanted.add(int(part))
        if len(raw.split(",")) > 100:
            raise _sycle_error(422, "invalid_patient_id", "At most 100 patient ids per request.")
        return wanted

    def _page(self, request: Request, key: str, rows: list[Any], render: Any = _out) -> Response:
        page = self.int_query(request, "page", 1, 1, 1_000_000)
        per_page = self.int_query(request, "per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
        total = len(rows)
        chunk = rows[(page - 1) * per_page : page * per_page]
        meta = {"page": page, "per_page": per_page, "total_pages": math.ceil(total / per_page), "total_count": total}
        return Response(200, {key: [render(r) for r in chunk], "meta": meta})

    def _filtered(self, request: Request, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        since = self._since(request)
        wanted = self._patient_filter(request)
        return [
            r
            for r in rows
            if (since is None or r["updated_at"] >= since) and (wanted is None or r["patient_id"] in wanted)
        ]

    # --- routes --------------------------------------------------------------------------------------

    def _list_locations(self, request: Request) -> Response:
        self._authorise(request)
        rows = []
        for k, location_id in enumerate(self.locations):
            name = self._data[location_id].name if location_id in self._data else None
            rows.append(
                {
                    "location_id": location_id,
                    "name": name or f"Brightsight Opticians {_TOWNS[k % len(_TOWNS)]}",
                    "timezone": "Europe/London",
                    "active": True,
                }
            )
        return Response(200, {"locations": rows})

    def _list_fields(self, request: Request) -> Response:
        self._location(request)
        with self.lock:
            custom = list(self.custom_fields.items())
        fields = [{"key": k, "label": label, "type": kind, "custom": False} for k, label, kind in STANDARD_FIELDS]
        fields += [{"key": k, "label": label, "type": kind, "custom": True} for k, (label, kind, _) in custom]
        return Response(200, {"fields": fields})

    def _list_providers(self, request: Request) -> Response:
        self._location(request)
        rows = [
            {
                "provider_id": pid,
                "name": c.name,
                "title": "Optometrist" if c.goc_number.startswith("01-") else "Dispensing Optician",
                "goc_number": c.goc_number,
            }
            for pid, c in self._providers.items()
        ]
        return Response(200, {"providers": rows})

    def _list_patients(self, request: Request) -> Response:
        data = self._location(request)
        since = self._since(request)
        wanted = self._patient_filter(request)
        with self.lock:
            ids = data.order if wanted is None else [pid for pid in data.order if int(pid) in wanted]
            if since is not None:
                ids = [pid for pid in ids if data.patients[pid].updated_at >= since]
            return self._page(request, "patients", ids, lambda pid: self._rendered(data, pid))

    def _get_patient(self, request: Request) -> Response:
        data = self._location(request)
        patient_id = request.params["patient_id"]
        with self.lock:
            if patient_id not in data.patients:
                raise _sycle_error(404, "patient_not_found", f"No patient {patient_id} at this location.")
            return Response(200, {"patient": self._rendered(data, patient_id)})

    def _list_alerts(self, request: Request) -> Response:
        data = self._location(request)
        with self.lock:
            return self._page(request, "clinical_alerts", self._filtered(request, data.alerts))

    def _list_recalls(self, request: Request) -> Response:
        data = self._location(request)
        with self.lock:
            return self._page(request, "recall_recommendations", self._filtered(request, data.recalls))

    def _list_appointments(self, request: Request) -> Response:
        data = self._location(request)
        day = request.query.get("date")
        try:
            on = date.fromisoformat(day) if day else None
        except ValueError:
            raise _sycle_error(422, "invalid_date", "date must be YYYY-MM-DD.") from None
        with self.lock:
            rows = self._filtered(request, data.appointments)
            if on is not None:
                rows = [r for r in rows if r["start_time"].astimezone(UK_TZ).date() == on]
            return self._page(request, "appointments", rows)

    def _patient_id(self, data: _Location, raw: Any) -> int:
        text = str(raw if raw is not None else "").strip()
        if text not in data.patients:
            raise _sycle_error(404, "patient_not_found", f"No patient {text or '(none)'} at this location.")
        return int(text)

    @staticmethod
    def _timestamp(body: dict[str, Any], name: str) -> datetime:
        raw = body.get(name)
        try:
            value = datetime.fromisoformat(str(raw))
        except ValueError:
            raise _sycle_error(422, "invalid_" + name, f"{name} must be an ISO 8601 timestamp with offset.") from None
        if value.tzinfo is None:
            raise _sycle_error(422, "invalid_" + name, f"{name} needs a UTC offset.")
        return value

    def _create_appointment(self, request: Request) -> Response:
        data = self._location(request)
        body = request.body if isinstance(request.body, dict) else {}
        with self.lock:
            patient_id = self._patient_id(data, body.get("patient_id"))
            start, end = self._timestamp(body, "start_time"), self._timestamp(body, "end_time")
            if end <= start:
                raise _sycle_error(422, "invalid_end_time", "end_time must be after start_time.")
            kind = body.get("appointment_type")
            if kind not in KNOWN_APPOINTMENT_TYPES:
                raise _sycle_error(422, "invalid_appointment_type", f"Unknown appointment type {kind!r}.")
            provider = body.get("provider_id")
            if provider is not None and provider not in self._providers:
                raise _sycle_error(422, "provider_not_found", f"No provider {provider}.")
            notes = body.get("notes")
            if notes is not None and (not isinstance(notes, str) or len(notes) > 2000):
                raise _sycle_error(422, "invalid_notes", "notes must be text of at most 2000 characters.")
            for other in data.appointments:
                if (
                    other["status"] != "cancelled"
                    and other["provider_id"] == provider
                    and other["start_time"] < end
                    and start < other["end_time"]
                ):
                    raise _sycle_error(409, "slot_conflict", "The provider already has an appointment then.")
            stamp = datetime.now(UTC)
            row = {
                "appointment_id": data.next_id,
                "patient_id": patient_id,
                "location_id": data.location_id,
                "start_time": start,
                "end_time": end,
                "appointment_type": kind,
                "status": "scheduled",
                "provider_id": provider,
                "notes": notes,
                "updated_at": stamp,
            }
            data.next_id += 1
            data.appointments.append(row)
            return Response(201, {"appointment": _out(row)})

    def _list_communications(self, request: Request) -> Response:
        data = self._location(request)
        kind = request.query.get("type")
        with self.lock:
            patient_id = self._patient_id(data, request.params["patient_id"])
            rows = [
                c for c in data.communications if c["patient_id"] == patient_id and (kind is None or c["type"] == kind)
            ]
            return self._page(request, "communications", rows)

    def _create_communication(self, request: Request) -> Response:
        data = self._location(request)
        body = request.body if isinstance(request.body, dict) else {}
        with self.lock:
            patient_id = self._patient_id(data, request.params["patient_id"])
            if body.get("type") not in COMMUNICATION_TYPES:
                raise _sycle_error(422, "invalid_type", f"type must be one of {sorted(COMMUNICATION_TYPES)}.")
            if body.get("direction") not in ("inbound", "outbound"):
                raise _sycle_error(422, "invalid_direction", "direction must be inbound or outbound.")
            if body.get("type") == "call" and body.get("outcome") not in CALL_OUTCOMES:
                raise _sycle_error(422, "invalid_outcome", f"outcome must be one of {sorted(CALL_OUTCOMES)}.")
            note = body.get("note")
            if not isinstance(note, str) or not note.strip() or len(note) > 2000:
                raise _sycle_error(422, "invalid_note", "note must be text of 1 to 2000 characters.")
            occurred = self._timestamp(body, "occurred_at")
            stamp = datetime.now(UTC)
            row = {
                "communication_id": data.next_id,
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
            return Response(201, {"communication": _out(row)})
