"""UK sight-test recall intervals.

A recall date from the PMS always wins. Otherwise the due date is the last eye test plus the
shortest interval among the rules that apply (age is taken at the last test, which is what the
optometrist recalled against, and keeps the result stable between syncs). Each practice can
override any interval through its settings (`recall_interval.<rule>=<months>`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

from dateutil.relativedelta import relativedelta

from nvc_pipelines.model import Patient, Recall

DEFAULT_INTERVALS: dict[str, int] = {
    "default": 24,
    "under_16": 12,
    "aged_70_plus": 12,
    "diabetic": 12,
    "glaucoma": 12,
    "glaucoma_suspect": 12,
    "ocular_hypertension": 12,
    "glaucoma_family_history": 12,  # applies at 40 or over, or when the age is unknown
}

SETTING_PREFIX = "recall_interval."


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


def add_months(start: date, months: int) -> date:
    """Calendar months, clamped to the month's end (2024-02-29 + 12 months = 2025-02-28)."""
    return start + relativedelta(months=months)


def age_on(dob: date, on: date) -> int:
    return on.year - dob.year - ((on.month, on.day) < (dob.month, dob.day))


def applicable_rules(patient: Patient) -> list[str]:
    """The rules that apply to a patient, before intervals are compared."""
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
        if flag in patient.risk_flags:
            rules.append(flag)
    if "glaucoma_family_history" in patient.risk_flags and (age is None or age >= 40):
        rules.append("glaucoma_family_history")
    return rules


def compute_recall(patient: Patient, rules: RecallRules) -> Recall | None:
    """The patient's recall, or None when there is neither a PMS date nor a last eye test to count from."""
    if patient.pms_recall_due_date is not None:
        return Recall(patient.pms_patient_id, patient.pms_recall_due_date, "pms", "pms", None)
    if patient.last_eye_test_date is None:
        return None
    candidates = applicable_rules(patient)
    # Shortest interval wins; on a tie the most specific (last added) rule is named as the reason.
    rule = min(reversed(candidates), key=lambda r: rules.intervals[r])
    months = rules.intervals[rule]
    return Recall(patient.pms_patient_id, add_months(patient.last_eye_test_date, months), "computed", rule, months)
