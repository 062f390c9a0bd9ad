from datetime import date, timedelta

import pytest
from dateutil.relativedelta import relativedelta

from nvc_pipelines.model import Patient
from nvc_pipelines.recall import RecallConfigError, RecallRules, add_months, compute_recall

RULES = RecallRules.from_settings({})


def patient(**kw) -> Patient:
    base = dict(practice_id="p", pms_patient_id="1", first_name="A", last_name="B", last_eye_test_date=date(2024, 3, 1))
    return Patient(**{**base, **kw})


def test_month_arithmetic_clamps_to_month_end() -> None:
    assert add_months(date(2024, 2, 29), 12) == date(2025, 2, 28)
    assert add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)


def test_add_months_counts_calendar_months_as_relativedelta_does() -> None:
    """Every day of a leap cycle, for every interval the rules can hold (1-120 months)."""
    day = date(2023, 1, 1)
    while day < date(2027, 1, 1):
        for months in (1, 6, 11, 12, 13, 24, 59, 120):
            assert add_months(day, months) == day + relativedelta(months=months), (day, months)
        day += timedelta(days=1)


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


# --- the memorandum's child rules (age at the last test, 2024-03-01; the birthday counts on the day) ---


@pytest.mark.parametrize(
    "dob,flags,months,rule",
    [
        (date(2017, 3, 2), ["binocular_vision_anomaly"], 6, "under_7_binocular_vision_anomaly"),  # 6
        (date(2017, 3, 2), ["corrected_refractive_error"], 6, "under_7_corrected_refractive_error"),
        (date(2017, 3, 2), ["progressive_myopia"], 12, "under_16"),  # myopia counts from 7
        (date(2017, 3, 2), [], 12, "under_16"),
        (date(2017, 3, 1), ["binocular_vision_anomaly"], 6, "aged_7_to_15_binocular_vision_anomaly"),  # 7 today
        (date(2017, 3, 1), ["corrected_refractive_error"], 12, "under_16"),  # a prescription alone: yearly at 7
        (date(2017, 3, 1), ["progressive_myopia"], 6, "aged_7_to_15_progressive_myopia"),
        (date(2008, 3, 2), ["binocular_vision_anomaly"], 6, "aged_7_to_15_binocular_vision_anomaly"),  # 15
        (date(2008, 3, 2), ["progressive_myopia"], 6, "aged_7_to_15_progressive_myopia"),
        (date(2008, 3, 1), ["binocular_vision_anomaly", "progressive_myopia"], 24, "default"),  # 16 today
        (None, ["binocular_vision_anomaly", "corrected_refractive_error"], 24, "default"),  # age unknown
        (date(2012, 1, 1), ["diabetic", "binocular_vision_anomaly"], 6, "aged_7_to_15_binocular_vision_anomaly"),
    ],
)
def test_child_intervals(dob, flags, months, rule) -> None:
    r = compute_recall(patient(date_of_birth=dob, risk_flags=flags), RULES)
    assert (r.rule, r.interval_months) == (rule, months)
    assert r.due_date == add_months(date(2024, 3, 1), months)


def test_child_rules_clamp_month_ends_and_take_overrides() -> None:
    late_august = patient(date_of_birth=date(2019, 1, 1), risk_flags=["corrected_refractive_error"],
                          last_eye_test_date=date(2024, 8, 31))  # fmt: skip
    assert compute_recall(late_august, RULES).due_date == date(2025, 2, 28)
    rules = RecallRules.from_settings({"recall_interval.under_7_corrected_refractive_error": "4"})
    assert compute_recall(late_august, rules).due_date == date(2024, 12, 31)
    # Both under-7 rules apply: the shortest wins and the reason names one of them.
    both = compute_recall(patient(date_of_birth=date(2019, 1, 1), risk_flags=["binocular_vision_anomaly",
                                                                              "corrected_refractive_error"]), RULES)  # fmt: skip
    assert both.interval_months == 6 and both.rule.startswith("under_7_")


def test_a_pms_date_later_than_the_guideline_wins_with_a_warning() -> None:
    late = compute_recall(patient(risk_flags=["diabetic"], pms_recall_due_date=date(2026, 3, 1)), RULES)
    assert (late.due_date, late.recall_source) == (date(2026, 3, 1), "pms")
    assert late.warnings == ("pms_later_than_guideline",) and late.guideline_due_date == date(2025, 3, 1)
    assert "later than the guideline (diabetic: 2025-03-01)" in late.reason
    early = compute_recall(patient(risk_flags=["diabetic"], pms_recall_due_date=date(2024, 12, 1)), RULES)
    assert early.warnings == () and early.guideline_due_date == date(2025, 3, 1)
    same = compute_recall(patient(pms_recall_due_date=date(2026, 3, 1)), RULES)  # the 2-year guideline itself
    assert same.warnings == ()
    untested = compute_recall(patient(last_eye_test_date=None, pms_recall_due_date=date(2030, 1, 1)), RULES)
    assert untested.warnings == () and untested.guideline_due_date is None


@pytest.mark.parametrize(
    "cell,flags",
    [
        ("Squint; corrected refractive error", ["binocular_vision_anomaly", "corrected_refractive_error"]),
        ("Rapidly Progressing Myopia", ["progressive_myopia"]),
        ("binocular_vision_anomaly,amblyopia", ["binocular_vision_anomaly"]),
        ("STRABISMUS, diabetic", ["binocular_vision_anomaly", "diabetic"]),
        ("lazy eye", ["binocular_vision_anomaly"]),
        ("progressive_myopia", ["progressive_myopia"]),
    ],
)
def test_risk_categories_name_the_child_conditions(cell: str, flags: list[str]) -> None:
    from nvc_pipelines.normalise import map_risk_categories

    assert sorted(map_risk_categories(cell)[0]) == sorted(flags)
