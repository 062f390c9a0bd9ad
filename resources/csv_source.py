"""The generic CSV upload: a file, or a folder the practice drops its exports into (newest file wins).

Format: `first_name,last_name,phone_number,last_eye_test_date,risk_category,last_clinical_test_date,
clinical_condition_notes` plus optional `date_of_birth,email,address,pms_patient_id`. Headers match
case-insensitively, ignoring spaces, underscores and a BOM. A file is either read whole (each row
imported or rejected with its reason) or refused whole with a message; never half-imported.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource

from nvc_pipelines.model import (
    Appointment,
    BookingRequest,
    BookingResult,
    ClinicalRecord,
    NoteResult,
    PatientNote,
    PmsKind,
    Practice,
    ReadResult,
    RecordBatch,
)
from nvc_pipelines.normalise import PatientDraft, collect
from resources.protocol import ConnectionInfo, PmsConnectionFailed, PmsError

SEED_COLUMNS = (
    "first_name",
    "last_name",
    "phone_number",
    "last_eye_test_date",
    "risk_category",
    "last_clinical_test_date",
    "clinical_condition_notes",
)
OPTIONAL_COLUMNS = ("date_of_birth", "email", "address", "pms_patient_id")
REQUIRED_COLUMNS = ("first_name", "last_name", "phone_number", "last_eye_test_date")
TEMPLATE_ROWS = (
    ("Siân", "Jones", "07700 900123", "15/01/2024", "diabetic", "15/01/2024", "Type 2 diabetes - annual review"),
    ("Tom", "O'Neill", "+44 161 496 0456", "2023-06-30", "standard", "", ""),
)
MAX_FILE_BYTES = 512 * 1024 * 1024


class CsvFileRefused(PmsError):
    """The whole file was refused (nothing imported); the message says what to fix."""

    def __init__(self, practice_id: str, problem: str, message: str, check: str = ""):
        super().__init__("CSV import", practice_id, problem, message, check)


def header_key(name: str) -> str:
    """`First Name`, `first_name`, `FIRSTNAME` and `\ufefffirst_name` are the same column."""
    return re.sub(r"[\s_\-]+", "", name.replace("\ufeff", "")).casefold()


_KNOWN = {header_key(c): c for c in (*SEED_COLUMNS, *OPTIONAL_COLUMNS)}


def template_text() -> str:
    """The CSV template with two example rows (what `nvc csv-template` writes)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(SEED_COLUMNS)
    writer.writerows(TEMPLATE_ROWS)
    return out.getvalue()


def decode(data: bytes, practice_id: str, name: str) -> str:
    """UTF-8 (with or without BOM) first, then Windows-1252 as Excel on Windows saves it."""
    if b"\x00" in data[:8192]:
        raise CsvFileRefused(
            practice_id, "not_csv", f"{name} is a binary file, not a CSV", "export the patient list as CSV"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def sniff_delimiter(text: str) -> str:
    sample = "\n".join(text.splitlines()[:20])
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def parse_csv(text: str, practice_id: str, name: str, today: date) -> ReadResult:
    """Read one CSV file's text into patients and rejected rows (or refuse it whole)."""
    if not text.strip():
        raise CsvFileRefused(practice_id, "empty_file", f"{name} is empty", "export the patient list again")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sniff_delimiter(text))
    header = next(reader)
    columns = [_KNOWN.get(header_key(h)) for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise CsvFileRefused(
            practice_id,
            "missing_columns",
            f"{name} is missing the required column(s) {', '.join(missing)} (found: {', '.join(header)})",
            f"the header row must include {', '.join(REQUIRED_COLUMNS)}; `nvc csv-template` writes an example",
        )

    def rows() -> Iterator[tuple[str, dict[str, Any], PatientDraft]]:
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue  # blank line
            line = reader.line_num
            raw = {h or f"column_{i + 1}": v for i, (h, v) in enumerate(zip(header, record, strict=False))}
            if len(record) > len(header):
                raw["_extra_cells"] = record[len(header) :]
            value = {c: record[i] for i, c in enumerate(columns) if c and i < len(record)}
            yield (
                f"{name}:line {line}",
                raw,
                PatientDraft(
                    pms_patient_id=value.get("pms_patient_id"),
                    first_name=value.get("first_name"),
                    last_name=value.get("last_name"),
                    phones=[value.get("phone_number")],
                    date_of_birth=value.get("date_of_birth"),
                    email=value.get("email"),
                    address=value.get("address"),
                    last_eye_test_date=value.get("last_eye_test_date"),
                    last_clinical_test_date=value.get("last_clinical_test_date"),
                    risk_category=value.get("risk_category"),
                    clinical_notes=value.get("clinical_condition_notes"),
                ),
            )

    try:
        result = collect(practice_id, rows(), today, strict=True, source_ref=name)
    except csv.Error as exc:
        raise CsvFileRefused(
            practice_id, "malformed_csv", f"{name} is not a readable CSV ({exc})", "export the file again"
        ) from None
    if result.rows_read == 0:
        raise CsvFileRefused(
            practice_id, "no_rows", f"{name} has a header but no patient rows", "check the export included patients"
        )
    return result


class CsvClient:
    """One practice's CSV drop."""

    kind = PmsKind.CSV

    def __init__(self, practice: Practice):
        self.practice = practice
        self.path = Path(practice.settings.get("path", "")).expanduser()

    def _fail(self, problem: str, message: str, check: str) -> PmsConnectionFailed:
        return PmsConnectionFailed("CSV import", self.practice.practice_id, problem, message, check)

    def newest_file(self) -> Path | None:
        if not str(self.path) or not self.path.exists():
            raise self._fail(
                "path_not_found",
                f"the path {str(self.path)!r} does not exist",
                "the `path` setting: a CSV file, or the folder the practice's exports are dropped into",
            )
        if self.path.is_file():
            return self.path
        files = [p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".txt")]
        return max(files, key=lambda p: (p.stat().st_mtime, p.name)) if files else None

    def test_connection(self) -> ConnectionInfo:
        newest = self.newest_file()
        if newest is None:
            return ConnectionInfo("CSV import", detail=f"folder {self.path} is empty: waiting for the first export")
        text = self._read_text(newest)
        parse_csv(text, self.practice.practice_id, newest.name, date.today())
        return ConnectionInfo("CSV import", detail=f"newest file {newest.name}")

    def _read_text(self, path: Path) -> str:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise CsvFileRefused(
                self.practice.practice_id,
                "file_too_large",
                f"{path.name} is {size // (1024 * 1024)} MB; the limit is {MAX_FILE_BYTES // (1024 * 1024)} MB",
                "split the export",
            )
        return decode(path.read_bytes(), self.practice.practice_id, path.name)

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """The newest file, whole: a CSV export is always a full list, so `since` does not apply."""
        newest = self.newest_file()
        if newest is None:
            raise CsvFileRefused(
                self.practice.practice_id, "no_file", f"no CSV file in {self.path}", "drop the export into the folder"
            )
        return parse_csv(self._read_text(newest), self.practice.practice_id, newest.name, today)

    def read_appointments(self, since: datetime | None) -> RecordBatch[Appointment]:
        """A CSV export carries no diary: always empty."""
        return RecordBatch(source_ref="csv has no appointments")

    def read_clinical_records(self, since: datetime | None) -> RecordBatch[ClinicalRecord]:
        """Clinical notes and the last clinical test date ride on each patient row (see `read_patients`)."""
        return RecordBatch(source_ref="csv clinical data is on patient rows")

    def _no_writeback(self) -> PmsError:
        return PmsError(
            "CSV import",
            self.practice.practice_id,
            "writeback_unsupported",
            "this practice sends a CSV export and has no PMS connection to write bookings or notes into.",
            "connect the practice's PMS to write back; meanwhile the practice enters bookings by hand",
        )

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        raise self._no_writeback()

    def add_note(self, note: PatientNote) -> NoteResult:
        raise self._no_writeback()

    def close(self) -> None:
        return None


class CsvResource(ConfigurableResource):
    """Reads practices' CSV exports from the path in each practice's settings."""

    def required_settings(self) -> tuple[str, ...]:
        return ("path",)

    def optional_settings(self) -> tuple[str, ...]:
        return ()

    def required_secrets(self) -> tuple[str, ...]:
        return ()

    def open(self, practice: Practice, credentials: dict[str, str]) -> CsvClient:
        return CsvClient(practice)
