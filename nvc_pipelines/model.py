"""The canonical data model: every PMS dialect is translated to and from these records."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")

DERIVED_PREFIX = "nvc-"  # identities made up for rows without a PMS id (see normalise.derived_patient_key)
# Where records came from, by their id in the read: the row reference and the raw values.
RowOrigins = dict[str, tuple[str, dict[str, Any]]]


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
# The last three are the child rules of the 2002 memorandum (they shorten a child's interval only).
RISK_FLAGS: frozenset[str] = frozenset(
    {
        "diabetic",
        "glaucoma",
        "glaucoma_suspect",
        "ocular_hypertension",
        "glaucoma_family_history",
        "binocular_vision_anomaly",
        "corrected_refractive_error",
        "progressive_myopia",
    }
)


class PatientStatus(StrEnum):
    """What the practice's record says about the person, in NVC's words (each PMS has its own)."""

    ACTIVE = "active"
    DECEASED = "deceased"
    GONE_AWAY = "gone_away"  # moved away / "gone away" returned post: the practice has lost them
    INACTIVE = "inactive"  # archived, left the practice, or otherwise not to be recalled


class Channel(StrEnum):
    PHONE = "phone"
    SMS = "sms"
    EMAIL = "email"


@dataclass(frozen=True, slots=True)
class ContactPreferences:
    """What the patient agreed to be contacted by, as the practice recorded it.

    `phone_recall` False means the practice must not phone them about recalls ("do not call",
    "no telephone recall"). `no_recall` is a recall-suppression flag: no recall by any channel.
    `channels` are the channels the patient may be contacted by, where the PMS records consent
    (None: it records none, which is not a refusal). A PMS that records consent for some channels
    only (SMS and email, say) lists `phone` unless the patient refused it, so an unasked question is
    never read as a "no".
    """

    phone_recall: bool = True
    no_recall: bool = False
    channels: frozenset[Channel] | None = None

    @property
    def may_phone(self) -> bool:
        return self.phone_recall and not self.no_recall and (self.channels is None or Channel.PHONE in self.channels)


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
    status: PatientStatus = PatientStatus.ACTIVE
    status_date: date | None = None  # e.g. the date of death, where the PMS records it
    contact: ContactPreferences = field(default_factory=ContactPreferences)
    guardian_name: str | None = None  # parent or guardian to ask for when calling about a child
    # Why a person should look at the name before it is said on a call (mixed-script look-alike
    # letters, e.g. a Cyrillic "а" inside "Anna"); None when the name reads as it looks.
    name_review: str | None = None


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A source row that could not be imported, kept with its reason and raw values."""

    row_ref: str
    reason: str
    raw: dict[str, Any]
    # Who the row seems to be about, as far as it could be read (not stored): lets an erased person's
    # invalid row be recognised and left out, before anything of it is kept.
    identity: RowIdentity | None = None


@dataclass(frozen=True, slots=True)
class RowIdentity:
    pms_patient_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    phones: tuple[str, ...] = ()  # E.164


@dataclass(slots=True)
class ReadResult:
    """What one read of a source produced: accepted patients plus rejected rows, nothing dropped."""

    patients: list[Patient] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    source_ref: str = ""
    # The row each patient without a PMS id came from (its reference and raw values), by its derived
    # id: matching may still find it a duplicate after normalising, and then keeps it with its row.
    origins: RowOrigins = field(default_factory=dict)

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
    reason: str = ""
    flags: tuple[str, ...] = ()
    inferred_flags: tuple[str, ...] = ()
    based_on: date | None = None  # the last eye test a computed date counts from
    # "pms_later_than_guideline": the PMS date (which wins) is later than the rules would give.
    warnings: tuple[str, ...] = ()
    guideline_due_date: date | None = None  # what the rules give, beside a PMS date


class AppointmentStatus(StrEnum):
    BOOKED = "booked"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    NO_SHOW = "no_show"


APPOINTMENT_TYPES: frozenset[str] = frozenset({"eye_test", "contact_lens", "follow_up", "collection", "other"})


@dataclass(slots=True)
class Appointment:
    """An appointment in the PMS diary. Times are timezone-aware (UTC once normalised).

    `nvc_reference` is the idempotency key NVC wrote into the PMS record when it made the booking,
    read back so the next sync links the appointment to the booking instead of duplicating it.
    """

    practice_id: str
    pms_appointment_id: str
    pms_patient_id: str
    starts_at: datetime
    ends_at: datetime
    status: AppointmentStatus
    appointment_type: str = "eye_test"
    clinician: str | None = None
    notes: str | None = None
    nvc_reference: str | None = None
    source_updated_at: datetime | None = None


@dataclass(slots=True)
class ClinicalRecord:
    """One examination or clinical entry: flags the PMS set, free-text notes, measurements."""

    practice_id: str
    pms_record_id: str
    pms_patient_id: str
    exam_date: date
    record_type: str = "sight_test"
    flags: list[str] = field(default_factory=list)
    unknown_flags: list[str] = field(default_factory=list)
    notes: str | None = None
    iop_right_mmhg: float | None = None
    iop_left_mmhg: float | None = None
    clinician: str | None = None
    source_updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Clinician:
    """A member of the practice's staff as its PMS lists them, with the General Optical Council
    number the PMS holds (`01-` optometrists, `02-` dispensing opticians), as typed there; None when
    the PMS holds none. Whether the number is valid and registered is `nvc_pipelines.goc`'s to say."""

    practice_id: str
    pms_clinician_ref: str  # what a booking's `clinician_ref` names (the PMS's own id for them)
    name: str
    goc_number: str | None = None
    role: str = ""


@dataclass(slots=True)
class RecordBatch(Generic[T]):  # noqa: UP046 (Python 3.11)
    """Records of one kind read from a source, plus the rows that could not be read, nothing dropped."""

    records: list[T] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    source_ref: str = ""

    @property
    def rows_read(self) -> int:
        return len(self.records) + len(self.rejected)


@dataclass(frozen=True, slots=True)
class BookingRequest:
    """An appointment booked on an AI call, to be created in the PMS exactly once.

    `idempotency_key` is written into the PMS record (a reference or notes field, per dialect) so a
    retry after a lost response finds the first write instead of booking twice.
    """

    idempotency_key: str
    pms_patient_id: str
    starts_at: datetime
    ends_at: datetime
    appointment_type: str = "eye_test"
    clinician_ref: str | None = None
    notes: str | None = None


@dataclass(frozen=True, slots=True)
class BookingResult:
    """A booking in the PMS. `created`: True when this call's write made it, including a write whose
    answer was lost and that was then found by its marker; False only when it was there before this
    call wrote anything (an earlier call, or the practice, made it). The same for every PMS
    (`resources.base.PmsClientBase.write_exactly_once`), so the outbox's `already_there` counts
    deliveries that wrote nothing."""

    pms_appointment_id: str
    created: bool


class CallOutcome(StrEnum):
    """What a call (or an attempt at one) came to: the one vocabulary of the AI calling system."""

    BOOKED = "booked"
    NO_ANSWER = "no_answer"
    VOICEMAIL = "voicemail"
    BUSY = "busy"
    WRONG_NUMBER = "wrong_number"
    DECLINED = "declined"
    CALL_BACK_LATER = "call_back_later"
    ASKED_NOT_TO_BE_CALLED = "asked_not_to_be_called"
    DECEASED = "deceased"


class NoteKind(StrEnum):
    CALL_OUTCOME = "call_outcome"
    CALL_ATTEMPT = "call_attempt"


@dataclass(frozen=True, slots=True)
class PatientNote:
    """A call outcome note or call attempt log for the patient's record in the PMS."""

    idempotency_key: str
    pms_patient_id: str
    kind: NoteKind
    occurred_at: datetime
    text: str
    outcome: str | None = None  # e.g. "booked", "no_answer", "voicemail", "declined", "wrong_number"


@dataclass(frozen=True, slots=True)
class NoteResult:
    """A note in the PMS; `created` means what it means for `BookingResult`."""

    pms_note_id: str
    created: bool
