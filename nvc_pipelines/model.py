"""The canonical data model: every PMS dialect is translated to and from these records."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Any


class PmsKind(StrEnum):
    """The practice management systems (and the CSV drop) a practice can connect."""

    CSV = "csv"
    OPTIX = "optix"
    ACUITAS = "acuitas"
    OPTISOFT = "optisoft"
    SYCLE = "sycle"


class PhoneType(StrEnum):
    MOBILE = "mobile"
    LANDLINE = "landline"
    OTHER = "other"


# Clinical flags known to the recall rules. Anything else a source sends is kept raw and reported.
RISK_FLAGS: frozenset[str] = frozenset(
    {"diabetic", "glaucoma", "glaucoma_suspect", "ocular_hypertension", "glaucoma_family_history"}
)


@dataclass(frozen=True, slots=True)
class Phone:
    """A validated UK phone number in E.164 form."""

    e164: str
    type: PhoneType


@dataclass(slots=True)
class Patient:
    """One patient as read from a source, after normalisation.

    `pms_patient_id` is the identity within the practice: the PMS's own id, or for sources without ids
    (CSV without `pms_patient_id`) a stable key derived from name and primary phone.
    """

    practice_id: str
    pms_patient_id: str
    first_name: str
    last_name: str
    phones: list[Phone] = field(default_factory=list)
    date_of_birth: date | None = None
    email: str | None = None
    address: str | None = None
    last_eye_test_date: date | None = None
    last_clinical_test_date: date | None = None
    risk_flags: list[str] = field(default_factory=list)
    unknown_risk_values: list[str] = field(default_factory=list)
    clinical_notes: str | None = None
    pms_recall_due_date: date | None = None
    source_updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A source row that could not be imported, kept with its reason and raw values."""

    row_ref: str
    reason: str
    raw: dict[str, Any]


@dataclass(slots=True)
class ReadResult:
    """What one read of a source produced: accepted patients plus rejected rows, nothing dropped."""

    patients: list[Patient] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    source_ref: str = ""

    @property
    def rows_read(self) -> int:
        return len(self.patients) + len(self.rejected)


@dataclass(frozen=True, slots=True)
class Practice:
    """A connected practice, as held in the registry (secrets stay encrypted until a resource needs them)."""

    practice_id: str
    display_name: str
    pms_kind: PmsKind
    settings: dict[str, str]
    status: str
    connected_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Recall:
    """When a patient is next due an eye test, and why that date was chosen."""

    pms_patient_id: str
    due_date: date
    recall_source: str  # "pms" or "computed"
    rule: str
    interval_months: int | None
