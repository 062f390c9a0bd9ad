"""The one protocol every PMS connection implements, and the errors they raise.

A resource (a Dagster `ConfigurableResource`, configured once per deployment) opens a `PmsClient`
for one practice from that practice's settings and decrypted secrets. Assets and the CLI only ever
talk to `PmsClient`; nothing PMS-specific leaks past a resource module. No client has a delete.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol, Self, runtime_checkable

from nvc_pipelines.model import (
    Appointment,
    BookingRequest,
    BookingResult,
    ClinicalRecord,
    Clinician,
    NoteResult,
    PatientNote,
    PmsKind,
    Practice,
    ReadResult,
    RecordBatch,
)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What a successful connection test learnt about the practice's system."""

    pms: str
    practice_name: str | None = None
    version: str | None = None
    detail: str = ""


class PmsError(RuntimeError):
    """A PMS call failed in a way an operator can act on.

    `problem` is a stable code (for tests and alerts); the message names the PMS, the practice and
    what to check, and never contains a secret.
    """

    def __init__(self, pms: str, practice_id: str, problem: str, message: str, check: str = ""):
        self.pms = pms
        self.practice_id = practice_id
        self.problem = problem
        self.check = check
        text = f"{pms} (practice {practice_id}): {message}"
        if check:
            text += f" Check: {check}"
        super().__init__(text)


class PmsConnectionFailed(PmsError):
    """The connection test (or the first call of a sync) could not get in."""

    def __init__(self, pms: str, practice_id: str, problem: str, message: str, check: str = ""):
        super().__init__(pms, practice_id, problem, f"Connection failed: {message}", check)


@runtime_checkable
class PmsClient(Protocol):
    """One practice's connection to its PMS."""

    kind: PmsKind
    practice: Practice

    def test_connection(self) -> ConnectionInfo:
        """Prove the settings and secrets work; raise `PmsConnectionFailed` with what to check."""
        ...

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """Patients changed since `since` (all when None), normalised, with rejected rows kept.

        Recall due dates the PMS holds arrive on the patient (`pms_recall_due_date`), joined by the
        resource where the PMS keeps them apart.
        """
        ...

    def iter_patients(self, since: datetime | None, today: date) -> Iterator[ReadResult]:
        """`read_patients` page by page, each page normalised as it arrives (a client that cannot
        page yields its whole read as one page, `PmsClientBase`'s default). A patient edited while
        the read pages through may come back on a later page: the later copy counts."""
        ...

    def iter_appointments(self, since: datetime | None) -> Iterator[RecordBatch[Appointment]]:
        """`read_appointments` page by page."""
        ...

    def iter_clinical_records(self, since: datetime | None) -> Iterator[RecordBatch[ClinicalRecord]]:
        """`read_clinical_records` page by page."""
        ...

    def read_appointments(self, since: datetime | None) -> RecordBatch[Appointment]:
        """Appointments changed since `since` (all when None), with unreadable rows kept as rejected."""
        ...

    def read_clinical_records(self, since: datetime | None) -> RecordBatch[ClinicalRecord]:
        """Clinical records (exams, flags, notes) changed since `since` (all when None)."""
        ...

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        """Create the booking exactly once: look it up first (by the idempotency key written into
        the PMS record, and by patient and start time) and after any lost response before retrying.
        `created` is True when this call's write made it, even if its answer was lost and it was
        found by lookup; False only when it was there before this call wrote anything (see
        `BookingResult`). Raise `PmsError` with problem `slot_taken`, `patient_not_found` or
        `invalid_booking`."""
        ...

    def add_note(self, note: PatientNote) -> NoteResult:
        """Add a call outcome note or call attempt log to the patient's record, exactly once;
        `created` as for `create_appointment`."""
        ...

    def close(self) -> None: ...


def patient_pages(client: PmsClient, since: datetime | None, today: date) -> Iterator[ReadResult]:
    """The client's patients page by page; a client without `iter_patients` (a test double, a file
    source) as one page."""
    pages = getattr(client, "iter_patients", None)
    return pages(since, today) if pages is not None else iter((client.read_patients(since, today),))


def pages_are_snapshot(client: PmsClient) -> bool:
    """Whether a read of the client's patients is one snapshot (a file), in which no record comes
    twice: a repeat is then a duplicate row, not a record edited while the PMS paged."""
    return bool(getattr(client, "snapshot_pages", False))


def appointment_pages(client: PmsClient, since: datetime | None) -> Iterator[RecordBatch[Appointment]]:
    pages = getattr(client, "iter_appointments", None)
    return pages(since) if pages is not None else iter((client.read_appointments(since),))


def clinical_pages(client: PmsClient, since: datetime | None) -> Iterator[RecordBatch[ClinicalRecord]]:
    pages = getattr(client, "iter_clinical_records", None)
    return pages(since) if pages is not None else iter((client.read_clinical_records(since),))


@runtime_checkable
class ClinicianSource(Protocol):
    """A PMS connection that lists the practice's clinicians with their GOC numbers."""

    def read_clinicians(self) -> list[Clinician]:
        """Every clinician the PMS lists for the practice, with the GOC number it holds (or None)."""
        ...


class PmsResourceBase(Protocol):
    """What the gateway needs from each PMS resource."""

    def open(self, practice: Practice, credentials: dict[str, str]) -> PmsClient: ...

    def required_settings(self) -> tuple[str, ...]: ...

    def required_secrets(self) -> tuple[str, ...]:
        """The secrets `open` needs; an HTTP PMS checks both lists in one place
        (`resources.http.HttpPmsResource.required_values`) before it connects."""
        ...

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with some settings changed (each resource is a pydantic model)."""
        ...
