"""An Optix-style cloud PMS on loopback: API key + Practice ID, cursor paging, camelCase patients.

Optix's dialect, as the client has to cope with it: everything under `/api/v2`, a Bearer API key
scoped to one practice, patients ordered by `(updatedAt, patientId)` with an opaque `nextCursor`,
clinical flags as Optix's own short codes, and errors as `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
import threading
import zlib
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any

from nvc_pipelines.sandboxes.base import HttpProblem, Request, Response, SandboxServer
from nvc_pipelines.sandboxes.seed import SeedPatient, seed_patients

BASE = "/api/v2"
DEFAULT_LIMIT = 100

# Canonical flag -> Optix clinical flag code. Anything else a test stores is rendered verbatim.
OPTIX_FLAG_CODES: dict[str, str] = {
    "diabetic": "DIAB",
    "glaucoma": "GLAU",
    "glaucoma_suspect": "GLS",
    "ocular_hypertension": "OHT",
    "glaucoma_family_history": "FHG",
}
_PRACTICE_NAMES = ("Vision", "Eyecare", "Opticians", "Eye Centre", "Optometrists")


def optix_timestamp(value: datetime) -> str:
    """Optix's fixed-width UTC timestamp (milliseconds, `Z`): lexical order is time order."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _patient_id(index: int) -> str:
    return f"P{index:07d}"


def _optix_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HttpProblem:
    return HttpProblem(status, {"error": {"code": code, "message": message}}, headers)


@dataclass(slots=True)
class _PracticeData:
    """One practice's patients: the records, their rendered JSON and the `(updatedAt, id)` index."""

    name: str
    patients: dict[str, SeedPatient]
    rendered: dict[str, dict[str, Any]]
    order: list[tuple[str, str]]


class OptixSandbox(SandboxServer):
    """A faithful stand-in for Optix's REST API, served for real over HTTP.

    `practices` maps Optix Practice IDs to patient counts; `api_keys` maps each key to the one
    practice it may read. Each practice is seeded from `(seed, practice id)`, so practices differ but
    every run is the same; seeding happens on first use, so a sandbox with a 200,000-patient practice
    starts instantly and pays the few seconds once.
    """

    name = "optix"

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
        self.throttled = 0  # 429s sent (token bucket or injected), so tests can prove a retry happened
        self._data: dict[str, _PracticeData] = {}
        self._load_lock = threading.Lock()
        self.route("GET", BASE + "/practices/{practice_id}", self._get_practice)
        self.route("GET", BASE + "/practices/{practice_id}/patients", self._list_patients)

    # --- data --------------------------------------------------------------------------------------

    def _practice_seed(self, practice_id: str) -> int:
        return self.seed * 1_000_003 + zlib.crc32(practice_id.encode())

    def _load(self, practice_id: str) -> _PracticeData:
        """Seed a practice on first use (once, even with concurrent requests)."""
        data = self._data.get(practice_id)
        if data is not None:
            return data
        with self._load_lock:
            if practice_id not in self._data:
                seed = self._practice_seed(practice_id)
                records = seed_patients(self.practices[practice_id], seed=seed, today=self.today)
                patients = {_patient_id(p.index): p for p in records}
                order = sorted((optix_timestamp(p.updated_at), pid) for pid, p in patients.items())
                rng = random.Random(seed)
                name = f"{rng.choice(records).last_name if records else 'Demo'} {rng.choice(_PRACTICE_NAMES)}"
                self._data[practice_id] = _PracticeData(name, patients, {}, order)
            return self._data[practice_id]

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
            "updatedAt": optix_timestamp(patient.updated_at),
        }

    def update_patient(
        self, practice_id: str, patient_id: str, *, now: datetime | None = None, **changes: Any
    ) -> SeedPatient:
        """Change fields of one `SeedPatient` as a receptionist would, bumping `updatedAt`.

        `flags` may hold codes Optix knows but the recall rules do not; they are sent verbatim.
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
            wanted = round(len(ids) * fraction_or_count) if isinstance(fraction_or_count, float) else fraction_or_count
            rng = random.Random(f"{self._practice_seed(practice_id)}:{stamp.isoformat()}")
            chosen = sorted(rng.sample(ids, max(0, min(wanted, len(ids)))))
            for k, patient_id in enumerate(chosen):
                patient = data.patients[patient_id]
                if k % 2 == 0:
                    changes: dict[str, Any] = {"mobile": f"07700 900{(patient.index * 7 + k) % 1000:03d}"}
                else:
                    changes = {"last_eye_test": stamp.date(), "recall_due": None}
                self._edit(data, patient_id, stamp, changes)
            data.order = sorted((optix_timestamp(p.updated_at), pid) for pid, p in data.patients.items())
        return chosen

    @staticmethod
    def _edit(data: _PracticeData, patient_id: str, stamp: datetime, changes: dict[str, Any]) -> SeedPatient:
        new = replace(data.patients[patient_id], **changes, updated_at=stamp.astimezone(UTC))
        data.patients[patient_id] = new
        data.rendered.pop(patient_id, None)
        return new

    # --- dialect -----------------------------------------------------------------------------------

    def _authorise(self, request: Request) -> _PracticeData:
        practice_id = request.params["practice_id"]
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            raise _optix_error(
                401, "invalid_api_key", "The API key is missing, invalid or revoked.", {"WWW-Authenticate": "Bearer"}
            )
        if self.api_keys[key.strip()] != practice_id or practice_id not in self.practices:
            raise _optix_error(404, "practice_not_found", f"No practice {practice_id} is available to this API key.")
        if practice_id in self.api_access_disabled:
            raise _optix_error(403, "api_access_disabled", "API access is disabled for this practice.")
        return self._load(practice_id)

    def _get_practice(self, request: Request) -> Response:
        data = self._authorise(request)
        return Response(200, {"practiceId": request.params["practice_id"], "name": data.name, "apiAccess": True})

    def _list_patients(self, request: Request) -> Response:
        data = self._authorise(request)
        limit = self._limit(request.query.get("limit"))
        start_key: tuple[str, str] | None = None
        if "updatedSince" in request.query:
            start_key = (optix_timestamp(self._since(request.query["updatedSince"])), "")
        after = self._decode_cursor(request.query["cursor"]) if request.query.get("cursor") else None
        with self.lock:
            start = bisect_left(data.order, start_key) if start_key else 0
            if after is not None:
                start = max(start, bisect_right(data.order, after))
            keys = data.order[start : start + limit]
            more = start + limit < len(data.order)
            page = [self._rendered(data, pid) for _, pid in keys]
        next_cursor = self._encode_cursor(keys[-1]) if more and keys else None
        return Response(200, {"data": page, "pagination": {"nextCursor": next_cursor}})

    def _rendered(self, data: _PracticeData, patient_id: str) -> dict[str, Any]:
        cached = data.rendered.get(patient_id)
        if cached is None:
            cached = data.rendered[patient_id] = self.render(data.patients[patient_id])
        return cached

    def _limit(self, raw: str | None) -> int:
        if raw is None:
            return DEFAULT_LIMIT
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= self.page_size_max:
            raise _optix_error(400, "invalid_limit", f"limit must be between 1 and {self.page_size_max}.")
        return limit

    @staticmethod
    def _since(raw: str) -> datetime:
        try:
            value = datetime.fromisoformat(raw)
        except ValueError:
            raise _optix_error(400, "invalid_parameter", "updatedSince must be an ISO-8601 timestamp.") from None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

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

    # --- errors in Optix's envelope ----------------------------------------------------------------

    def rate_limit_response(self, retry_after: float) -> Response:
        with self.lock:
            self.throttled += 1
        return Response(
            429,
            {"error": {"code": "rate_limited", "message": "Too many requests; slow down."}},
            {"Retry-After": str(max(1, math.ceil(retry_after)))},
        )

    def server_error_response(self) -> Response:
        return Response(500, {"error": {"code": "internal_error", "message": "An unexpected error occurred."}})

    def unavailable_response(self) -> Response:
        return Response(
            503,
            {"error": {"code": "service_unavailable", "message": "Optix is under maintenance."}},
            {"Retry-After": "1"},
        )

    def dispatch(self, request: Request) -> Response:
        response = super().dispatch(request)
        if response.status == 404 and isinstance(response.body, dict) and response.body.get("error") == "not_found":
            return Response(404, {"error": {"code": "not_found", "message": f"No route for {request.path}."}})
        return response
