"""UK sight-test recall intervals.

A recall date from the PMS always wins. Otherwise the due date is the last eye test plus the
shortest interval among the rules that apply (age is taken at the last test, which is what the
optometrist recalled against, and keeps the result stable between syncs). Each practice can
override any interval through its settings (`recall_interval.<rule>=<months>`).
"""

from __future__ import annotations

import hashlib
import json
from calendar import monthrange
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date

from nvc_pipelines.model import ClinicalRecord, Patient, Recall
from nvc_pipelines.tagging import infer_from_iop, infer_from_text, inferred_flags

# The memorandum of understanding on sight-test intervals (FODO, AOP, College of Optometrists and
# the Department of Health, 2002), as months; each practice may override any of them.
DEFAULT_INTERVALS: dict[str, int] = {
    "default": 24,
    "under_16": 12,
    "aged_70_plus": 12,
    "diabetic": 12,
    "glaucoma": 12,
    "glaucoma_suspect": 12,
    "ocular_hypertension": 12,
    "glaucoma_family_history": 12,  # applies at 40 or over, or when the age is unknown
    # Children: under 7 with a binocular vision anomaly or a corrected refractive error, and 7 to 15
    # with a binocular vision anomaly or rapidly progressing myopia (age known, at the last test).
    "under_7_binocular_vision_anomaly": 6,
    "under_7_corrected_refractive_error": 6,
    "aged_7_to_15_binocular_vision_anomaly": 6,
    "aged_7_to_15_progressive_myopia": 6,
}
# Where each rule comes from, for the operator guide's table.
RULE_SOURCES: dict[str, str] = {
    "default": "memorandum 2002: patients 16-69 without a risk factor, every 2 years",
    "under_16": "memorandum 2002: under 16, every year",
    "aged_70_plus": "memorandum 2002: 70 or over, every year",
    "diabetic": "memorandum 2002: diabetes, every year",
    "glaucoma": "NVC default, not in the memorandum: diagnosed glaucoma, every year (most are also under the HES)",
    "glaucoma_suspect": "NVC default, not in the memorandum: glaucoma suspect, every year",
    "ocular_hypertension": "memorandum 2002: ocular hypertension not in a monitoring scheme, every year",
    "glaucoma_family_history": "memorandum 2002: 40 or over with a first-degree family history of glaucoma, every year",
    "under_7_binocular_vision_anomaly": "memorandum 2002: under 7 with a binocular vision anomaly, every 6 months",
    "under_7_corrected_refractive_error": "memorandum 2002: under 7 with a corrected refractive error, every 6 months",
    "aged_7_to_15_binocular_vision_anomaly": "memorandum 2002: 7 to 15 with a binocular vision anomaly, every 6 months",
    "aged_7_to_15_progressive_myopia": "memorandum 2002: 7 to 15 with rapidly progressing myopia, every 6 months",
}

SETTING_PREFIX = "recall_interval."
# Bump when a change to this module or to the tagger can change a computed recall: every practice's
# recalls are then recomputed in full on its next sync, not just those of patients that changed.
RECALL_LOGIC_VERSION = 2


class RecallConfigError(ValueError):
    """A practice's recall override is not usable."""


@dataclass(frozen=True, slots=True)
class RecallRules:
    intervals: Mapping[str, int]

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> RecallRules:
        """Defaults, overridden by any `recall_interval.<rule>` settings of the practice."""
        intervals = dict(DEFAULT_INTERVALS)
        for key, value in settings.items():
            if not key.startswith(SETTING_PREFIX):
                continue
            rule = key.removeprefix(SETTING_PREFIX)
            if rule not in DEFAULT_INTERVALS:
                known = ", ".join(sorted(DEFAULT_INTERVALS))
                raise RecallConfigError(f"unknown recall rule {rule!r} in setting {key!r}; known rules: {known}")
            try:
                months = int(value)
            except ValueError:
                raise RecallConfigError(f"setting {key!r} must be a whole number of months, got {value!r}") from None
            if not 1 <= months <= 120:
                raise RecallConfigError(f"setting {key!r} must be between 1 and 120 months, got {months}")
            intervals[rule] = months
        return cls(intervals)

    def fingerprint(self) -> str:
        """Identifies these intervals and this version of the recall logic: stored recalls computed
        with another fingerprint are all recomputed."""
        body = json.dumps({"logic": RECALL_LOGIC_VERSION, "intervals": dict(sorted(self.intervals.items()))})
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def add_months(start: date, months: int) -> date:
    """Calendar months, clamped to the month's end (2024-02-29 + 12 months = 2025-02-28), as
    `relativedelta(months=...)` counts them, without building one per patient."""
    year, month0 = divmod(start.month - 1 + months, 12)
    year += start.year
    return date(year, month0 + 1, min(start.day, monthrange(year, month0 + 1)[1]))


def age_on(dob: date, on: date) -> int:
    return on.year - dob.year - ((on.month, on.day) < (dob.month, dob.day))


def applicable_rules(patient: Patient, flags: Collection[str] | None = None) -> list[str]:
    """The rules that apply to a patient (with these risk flags, when given), before intervals are compared."""
    risk_flags = patient.risk_flags if flags is None else flags
    rules = ["default"]
    age = (
        age_on(patient.date_of_birth, patient.last_eye_test_date)
        if (patient.date_of_birth and patient.last_eye_test_date)
        else None
    )
    if age is not None and age < 16:
        rules.append("under_16")
    if age is not None and age >= 70:
        rules.append("aged_70_plus")
    for flag in ("diabetic", "glaucoma", "glaucoma_suspect", "ocular_hypertension"):
        if flag in risk_flags:
            rules.append(flag)
    if "glaucoma_family_history" in risk_flags and (age is None or age >= 40):
        rules.append("glaucoma_family_history")
    if age is not None and age < 7:
        for flag in ("binocular_vision_anomaly", "corrected_refractive_error"):
            if flag in risk_flags:
                rules.append(f"under_7_{flag}")
    elif age is not None and age < 16:
        for flag in ("binocular_vision_anomaly", "progressive_myopia"):
            if flag in risk_flags:
                rules.append(f"aged_7_to_15_{flag}")
    return rules


def compute_recall(patient: Patient, rules: RecallRules, inferred: Mapping[str, str] | None = None) -> Recall | None:
    """The patient's recall, or None when there is neither a PMS date nor a last eye test to count from.

    `inferred` maps flags inferred from clinical notes (not set in the PMS) to their evidence; they
    count like PMS flags, and the reason says when one decided the interval.
    """
    inferred = dict(inferred or {})
    flags = tuple(sorted(set(patient.risk_flags) | set(inferred)))
    guideline = _guideline(patient, flags, rules, inferred)
    if patient.pms_recall_due_date is not None:
        warnings: tuple[str, ...] = ()
        reason = "recall date set in the PMS"
        if guideline is not None and patient.pms_recall_due_date > guideline.due_date:
            warnings = (PMS_LATER,)
            reason += (
                f"; later than the guideline ({guideline.rule}: {guideline.due_date.isoformat()}), "
                "for the practice to review"
            )
        return Recall(
            patient.pms_patient_id,
            patient.pms_recall_due_date,
            "pms",
            "pms",
            None,
            reason,
            flags,
            tuple(sorted(inferred)),
            warnings=warnings,
            guideline_due_date=guideline.due_date if guideline else None,
        )
    return guideline


PMS_LATER = "pms_later_than_guideline"


def _guideline(
    patient: Patient, flags: tuple[str, ...], rules: RecallRules, inferred: Mapping[str, str]
) -> Recall | None:
    """The recall the rules give, from the last eye test (None without one)."""
    if patient.last_eye_test_date is None:
        return None
    candidates = applicable_rules(patient, flags)
    # Shortest interval wins; on a tie the most specific (last added) rule is named as the reason.
    rule = min(reversed(candidates), key=lambda r: rules.intervals[r])
    months = rules.intervals[rule]
    reason = f"{rule}: {months} months after the last eye test on {patient.last_eye_test_date.isoformat()}"
    flag = next((f for f in inferred if rule == f or rule.endswith(f"_{f}")), None)
    if flag is not None:
        reason += f" (flag inferred from clinical notes: {inferred[flag]!r})"
    return Recall(
        patient.pms_patient_id,
        add_months(patient.last_eye_test_date, months),
        "computed",
        rule,
        months,
        reason,
        flags,
        tuple(sorted(inferred)),
        patient.last_eye_test_date,
    )


def recall_with_clinical(patient: Patient, clinical: Sequence[ClinicalRecord], rules: RecallRules) -> Recall | None:
    """Recall from the patient plus their clinical records: PMS flags on either count as set in the
    PMS; flags inferred from notes and pressures are added (never overriding); the latest exam
    stands in for a missing last eye test."""
    pms_flags = set(patient.risk_flags) | {f for c in clinical for f in c.flags}
    evidence = list(infer_from_text(patient.clinical_notes))
    for record in sorted(clinical, key=lambda c: c.exam_date, reverse=True):
        evidence += infer_from_text(record.notes)
        evidence += infer_from_iop(record.iop_right_mmhg, record.iop_left_mmhg)
    last_test = patient.last_eye_test_date
    exams = [c.exam_date for c in clinical if c.record_type == "sight_test"]
    if exams and (last_test is None or max(exams) > last_test):
        last_test = max(exams)
    flags = sorted(pms_flags)
    if flags != patient.risk_flags or last_test != patient.last_eye_test_date:
        patient = replace(patient, risk_flags=flags, last_eye_test_date=last_test)
    return compute_recall(patient, rules, inferred_flags(pms_flags, evidence))
