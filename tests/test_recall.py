from datetime import date

import pytest

from nvc_pipelines.model import Patient
from nvc_pipelines.recall import RecallConfigError, RecallRules, add_months, compute_recall

RULES = RecallRules.from_settings({})


def patient(**kw) -> Patient:
    base = dict(practice_id="p", pms_patient_id="1", first_name="A", last_name="B", last_eye_test_date=date(2024, 3, 1))
    return Patient(**{**base, **kw})


def test_month_arithmetic_clamps_to_month_end() -> None:
    assert add_months(date(2024, 2, 29), 12) == date(2025, 2, 28)
    assert add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)


def test_pms_date_wins() -> None:
    r = compute_recall(patient(pms_recall_due_date=date(2024, 9, 1), risk_flags=["diabetic"]), RULES)
    assert (r.due_date, r.recall_source, r.rule, r.interval_months) == (date(2024, 9, 1), "pms", "pms", None)


@pytest.mark.parametrize(
    "dob,flags,months,rule",
    [
        (date(1980, 1, 1), [], 24, "default"),
        (None, [], 24, "default"),
        (date(2010, 1, 1), [], 12, "under_16"),
        (date(1954, 3, 1), [], 12, "aged_70_plus"),  # 70 on the day of the test
        (date(1954, 3, 2), [], 24, "default"),  # 69 on the day of the test
        (date(1980, 1, 1), ["diabetic"], 12, "diabetic"),
        (date(1980, 1, 1), ["glaucoma_suspect"], 12, "glaucoma_suspect"),
        (date(1980, 1, 1), ["ocular_hypertension"], 12, "ocular_hypertension"),
        (date(1980, 1, 1), ["glaucoma"], 12, "glaucoma"),
        (date(1980, 1, 1), ["glaucoma_family_history"], 12, "glaucoma_family_history"),
        (date(1990, 1, 1), ["glaucoma_family_history"], 24, "default"),  # 34: family history alone is 2-yearly
        (None, ["glaucoma_family_history"], 12, "glaucoma_family_history"),  # unknown age: annual
    ],
)
def test_uk_intervals(dob, flags, months, rule) -> None:
    r = compute_recall(patient(date_of_birth=dob, risk_flags=flags), RULES)
    assert (r.recall_source, r.rule, r.interval_months) == ("computed", rule, months)
    assert r.due_date == add_months(date(2024, 3, 1), months)


def test_practice_overrides() -> None:
    rules = RecallRules.from_settings({"recall_interval.diabetic": "6", "recall_interval.default": "18", "path": "x"})
    assert compute_recall(patient(risk_flags=["diabetic"]), rules).interval_months == 6
    assert compute_recall(patient(), rules).due_date == date(2025, 9, 1)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"recall_interval.myopia": "12"}, "unknown recall rule"),
        ({"recall_interval.default": "two years"}, "whole number"),
        ({"recall_interval.default": "0"}, "between 1 and 120"),
    ],
)
def test_bad_overrides_are_refused(settings, message) -> None:
    with pytest.raises(RecallConfigError, match=message):
        RecallRules.from_settings(settings)


def test_no_test_date_and_no_pms_date_means_no_recall() -> None:
    assert compute_recall(patient(last_eye_test_date=None), RULES) is None
