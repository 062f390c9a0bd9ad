"""The export: everything held about one practice's patients (or one patient), in the documented shape."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import RowMapping, text

from nvc_pipelines.store.base import PracticeNotFound, StoreBase

# The sections of an export, in the file's order (after `practice_id`).
EXPORT_SECTIONS = (
    "patients",
    "appointments",
    "clinical_records",
    "call_events",
    "contact_suppressions",
    "rejected_rows",
)
_BATCH = 2_000  # rows fetched at a time from each section's cursor
_ONE = "(CAST(:one AS text) IS NULL OR {col} = :one)"
_QUERIES = {
    "patients": "SELECT pt.*, r.due_date AS recall_due_date, r.recall_source, r.rule AS recall_rule, "
    "r.reason AS recall_reason, r.inferred_flags, m.pms_patient_id AS merged_into_id "
    "FROM patients pt LEFT JOIN recalls r ON r.patient_id = pt.patient_id "
    "LEFT JOIN patients m ON m.patient_id = pt.merged_into "
    f"WHERE pt.practice_id = :p AND {_ONE.format(col='pt.pms_patient_id')} ORDER BY pt.pms_patient_id",
    "appointments": "SELECT pms_appointment_id, pms_patient_id, starts_at, ends_at, status, appointment_type, "
    f"clinician, notes, nvc_reference, active FROM appointments WHERE practice_id = :p AND {_ONE.format(col='pms_patient_id')} "
    "ORDER BY starts_at, pms_appointment_id",
    "clinical_records": "SELECT pms_record_id, pms_patient_id, exam_date, record_type, flags, unknown_flags, notes, "
    "iop_right_mmhg, iop_left_mmhg, clinician, active FROM clinical_records WHERE practice_id = :p "
    f"AND {_ONE.format(col='pms_patient_id')} ORDER BY exam_date, pms_record_id",
    "call_events": "SELECT pms_patient_id, kind, outcome, phone, recall_due_date, occurred_at, actor "
    f"FROM call_events WHERE practice_id = :p AND {_ONE.format(col='pms_patient_id')} ORDER BY event_id",
    "contact_suppressions": "SELECT pms_patient_id, reason, created_at, lifted_at, lifted_by, lift_reason "
    f"FROM contact_suppressions WHERE practice_id = :p AND {_ONE.format(col='pms_patient_id')} ORDER BY suppression_id",
    # A patient's export has no rejected rows: they are the practice's, not filed by patient.
    "rejected_rows": "SELECT source, source_ref, row_ref, reason, raw, rejected_at FROM rejected_rows "
    "WHERE practice_id = :p AND CAST(:one AS text) IS NULL ORDER BY rejected_id",
}


def _iso(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    return value.isoformat() if isinstance(value, date | datetime) else value


def _patient(p: RowMapping) -> dict[str, Any]:
    return {
        "pms_patient_id": p["pms_patient_id"],
        "first_name": p["first_name"],
        "last_name": p["last_name"],
        "date_of_birth": _iso(p["date_of_birth"]),
        "email": p["email"],
        "address": p["address"],
        "phones": list(p["phones"]),
        "last_eye_test_date": _iso(p["last_eye_test_date"]),
        "last_clinical_test_date": _iso(p["last_clinical_test_date"]),
        "risk_flags": list(p["risk_flags"]),
        "unknown_risk_values": list(p["unknown_risk_values"]),
        "clinical_notes": p["clinical_notes"],
        "recall_due_date": _iso(p["recall_due_date"]),
        "recall_source": p["recall_source"],
        "recall_rule": p["recall_rule"],
        "recall_reason": p["recall_reason"],
        "inferred_flags": list(p["inferred_flags"] or []),
        "active": p["active"],
        "merged_into": p["merged_into_id"],
        "status": p["pms_status"],
        "status_date": _iso(p["status_date"]),
        "phone_recall": p["phone_recall"],
        "no_recall": p["no_recall"],
        "contact_channels": None if p["contact_channels"] is None else list(p["contact_channels"]),
        "guardian_name": p["guardian_name"],
    }


def _plain(row: RowMapping) -> dict[str, Any]:
    """A row with dates as ISO text and numerics as floats (arrays stay lists)."""
    return {k: _iso(v) for k, v in row.items()}


_SHAPES: dict[str, Callable[[RowMapping], dict[str, Any]]] = {
    "patients": _patient,
    "appointments": _plain,
    "clinical_records": _plain,
    "call_events": _plain,
    "contact_suppressions": _plain,
    "rejected_rows": _plain,
}


class ExportMixin(StoreBase):
    """Subject access and practice exports."""

    def export_practice(self, practice_id: str, patient_ref: str | None = None) -> dict[str, Any]:
        """Everything held about one practice's patients (or one patient: `patient_ref` is a PMS id),
        in the documented export shape, in memory: for one patient or a small practice. A whole
        practice's file is written from `export_rows`, a row at a time."""
        data: dict[str, Any] = {"practice_id": practice_id, **{name: [] for name in EXPORT_SECTIONS}}
        for section, row in self.export_rows(practice_id, patient_ref):
            data[section].append(row)
        if patient_ref is not None:
            data["patient"] = patient_ref
        return data

    def export_rows(
        self, practice_id: str, patient_ref: str | None = None, sections: Sequence[str] = EXPORT_SECTIONS
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(section, row) for every row of the export, section by section in `EXPORT_SECTIONS` order
        (only `sections`), read from server-side cursors in one transaction: a practice of any size
        is exported holding one batch of rows, not the practice (200,000 patients built as dicts came
        to 1.35 GB). An unknown practice, patient or section is refused here, before any row."""
        unknown = set(sections) - set(EXPORT_SECTIONS)
        if unknown:
            raise ValueError(f"an export has no section(s) {', '.join(sorted(unknown))}")
        self.get_practice(practice_id)
        if patient_ref is not None and not self.has_patient(practice_id, patient_ref):
            raise PracticeNotFound(f"practice {practice_id} has no patient {patient_ref!r}")
        return self._export_rows(practice_id, patient_ref, sections)

    def _export_rows(
        self, practice_id: str, patient_ref: str | None, sections: Sequence[str]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        params = {"p": practice_id, "one": patient_ref}
        with self.begin(practice_id) as conn:
            streamed = conn.execution_options(stream_results=True, max_row_buffer=_BATCH)
            for section in EXPORT_SECTIONS:
                if section not in sections:
                    continue
                shape = _SHAPES[section]
                for row in streamed.execute(text(_QUERIES[section]), params).mappings():
                    yield section, shape(row)
