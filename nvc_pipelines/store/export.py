"""The export: everything held about one practice's patients (or one patient), in the documented shape."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from nvc_pipelines.store.base import PracticeNotFound, StoreBase


class ExportMixin(StoreBase):
    """Subject access and practice exports."""

    def export_practice(self, practice_id: str, patient_ref: str | None = None) -> dict[str, Any]:
        """Everything held about one practice's patients (or one patient: `patient_ref` is a PMS id),
        in the documented export shape."""
        self.get_practice(practice_id)
        if patient_ref is not None and not self.has_patient(practice_id, patient_ref):
            raise PracticeNotFound(f"practice {practice_id} has no patient {patient_ref!r}")
        with self.begin(practice_id) as conn:
            patients = (
                conn.execute(
                    text(
                        "SELECT pt.*, r.due_date AS recall_due_date, r.recall_source, r.rule AS recall_rule, "
                        "r.reason AS recall_reason, r.inferred_flags, m.pms_patient_id AS merged_into_id "
                        "FROM patients pt LEFT JOIN recalls r ON r.patient_id = pt.patient_id "
                        "LEFT JOIN patients m ON m.patient_id = pt.merged_into "
                        "WHERE pt.practice_id = :p AND (CAST(:one AS text) IS NULL OR pt.pms_patient_id = :one) "
                        "ORDER BY pt.pms_patient_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            appointments = (
                conn.execute(
                    text(
                        "SELECT pms_appointment_id, pms_patient_id, starts_at, ends_at, status, appointment_type, "
                        "clinician, notes, nvc_reference, active FROM appointments WHERE practice_id = :p "
                        "AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) "
                        "ORDER BY starts_at, pms_appointment_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            clinical = (
                conn.execute(
                    text(
                        "SELECT pms_record_id, pms_patient_id, exam_date, record_type, flags, unknown_flags, notes, "
                        "iop_right_mmhg, iop_left_mmhg, clinician, active FROM clinical_records WHERE practice_id = :p "
                        "AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) "
                        "ORDER BY exam_date, pms_record_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            call_events = (
                conn.execute(
                    text(
                        "SELECT pms_patient_id, kind, outcome, phone, recall_due_date, occurred_at, actor "
                        "FROM call_events WHERE practice_id = :p AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) "
                        "ORDER BY event_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            contact_suppressions = (
                conn.execute(
                    text(
                        "SELECT pms_patient_id, reason, created_at, lifted_at, lifted_by, lift_reason "
                        "FROM contact_suppressions WHERE practice_id = :p "
                        "AND (CAST(:one AS text) IS NULL OR pms_patient_id = :one) ORDER BY suppression_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )
            rejected = (
                conn.execute(
                    text(
                        "SELECT source, source_ref, row_ref, reason, raw, rejected_at FROM rejected_rows "
                        "WHERE practice_id = :p AND CAST(:one AS text) IS NULL ORDER BY rejected_id"
                    ),
                    {"p": practice_id, "one": patient_ref},
                )
                .mappings()
                .all()
            )

        def iso(value: Any) -> Any:
            if isinstance(value, Decimal):
                return float(value)
            return value.isoformat() if isinstance(value, date | datetime) else value

        data = {
            "practice_id": practice_id,
            "patients": [
                {
                    "pms_patient_id": p["pms_patient_id"],
                    "first_name": p["first_name"],
                    "last_name": p["last_name"],
                    "date_of_birth": iso(p["date_of_birth"]),
                    "email": p["email"],
                    "address": p["address"],
                    "phones": list(p["phones"]),
                    "last_eye_test_date": iso(p["last_eye_test_date"]),
                    "last_clinical_test_date": iso(p["last_clinical_test_date"]),
                    "risk_flags": list(p["risk_flags"]),
                    "unknown_risk_values": list(p["unknown_risk_values"]),
                    "clinical_notes": p["clinical_notes"],
                    "recall_due_date": iso(p["recall_due_date"]),
                    "recall_source": p["recall_source"],
                    "recall_rule": p["recall_rule"],
                    "recall_reason": p["recall_reason"],
                    "inferred_flags": list(p["inferred_flags"] or []),
                    "active": p["active"],
                    "merged_into": p["merged_into_id"],
                    "status": p["pms_status"],
                    "status_date": iso(p["status_date"]),
                    "phone_recall": p["phone_recall"],
                    "no_recall": p["no_recall"],
                    "contact_channels": None if p["contact_channels"] is None else list(p["contact_channels"]),
                    "guardian_name": p["guardian_name"],
                }
                for p in patients
            ],
            "appointments": [
                {k: iso(float(v) if isinstance(v, Decimal) else v) for k, v in a.items()} for a in appointments
            ],
            "clinical_records": [
                {
                    k: (float(v) if isinstance(v, Decimal) else list(v) if isinstance(v, list) else iso(v))
                    for k, v in c.items()
                }
                for c in clinical
            ],
            "call_events": [{k: iso(v) for k, v in e.items()} for e in call_events],
            "contact_suppressions": [{k: iso(v) for k, v in c.items()} for c in contact_suppressions],
            "rejected_rows": [{k: iso(v) for k, v in r.items()} for r in rejected],
        }
        if patient_ref is not None:
            data["patient"] = patient_ref
        return data
