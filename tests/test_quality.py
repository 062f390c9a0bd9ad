"""Data-quality checks: Great Expectations on real store data, visible as Dagster asset checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, instance_for_test
from sqlalchemy import text

from assets.sync import FULL_SYNC_TAG
from nvc_pipelines import quality
from nvc_pipelines.definitions import defs
from nvc_pipelines.model import PmsKind
from nvc_pipelines.recall import RecallRules
from nvc_pipelines.store import Store
from resources.csv_source import SEED_COLUMNS

TODAY = date(2026, 11, 25)


def _csv(path: Path, n: int, start: int = 0) -> None:
    lines = [",".join(SEED_COLUMNS)]
    for i in range(start, start + n):
        lines.append(f"Pat{i},Lee,07700 900{i:03d},15/01/2024,standard,,")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run(practice_id: str, instance):
    job = defs.resolve_job_def("practice_sync")
    return job.execute_in_process(partition_key=practice_id, instance=instance, raise_on_error=False)


def _check_alone(practice_id: str, instance) -> dict[str, object]:
    """`patients_are_valid` alone over every row, as after a bug wrote bad rows: a sync would read
    the source again and put them right (a merge compares every column with the source's)."""
    job = defs.resolve_job_def("practice_sync").get_subset(
        asset_selection=set(), asset_check_selection={AssetCheckKey(AssetKey("patients"), "patients_are_valid")}
    )
    result = job.execute_in_process(
        partition_key=practice_id, instance=instance, raise_on_error=False, tags={FULL_SYNC_TAG: "true"}
    )
    return _checks(result)


def _checks(result) -> dict[str, object]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_checks_run_with_the_sync_and_pass_on_good_data(database_url: str, store: Store, tmp_path: Path) -> None:
    _csv(tmp_path / "export.csv", 12)
    store.add_practice("q-good", "Q", PmsKind.CSV, {"path": str(tmp_path)}, {})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["q-good"])
        result = _run("q-good", instance)
    assert result.success
    checks = _checks(result)
    assert set(checks) >= {
        "patients_are_valid",
        "patients_are_fresh",
        "appointments_are_valid",
        "recalls_are_valid",
        "volume_drop_within_limit",
    }
    assert all(c.passed for c in checks.values())
    assert checks["patients_are_valid"].metadata["rows"].value == 12


def test_a_broken_extract_is_blocked_before_recalls_and_the_call_list(
    database_url: str, store: Store, tmp_path: Path
) -> None:
    _csv(tmp_path / "export.csv", 10)
    store.add_practice("q-drop", "Q", PmsKind.CSV, {"path": str(tmp_path)}, {})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["q-drop"])
        assert _run("q-drop", instance).success
        before = store.export_practice("q-drop")
        calls_before = store.call_list("q-drop")
        _csv(tmp_path / "export.csv", 2)  # the PMS "lost" 8 of 10 patients
        result = _run("q-drop", instance)
    assert not result.success
    volume = _checks(result)["volume_drop_within_limit"]
    assert not volume.passed and "8 (80%) would be marked inactive" in volume.description
    done = (
        {m.asset_key.to_user_string() for m in result.get_asset_materialization_events_as_asset_materializations()}
        if hasattr(result, "get_asset_materialization_events_as_asset_materializations")
        else {
            e.step_materialization_data.materialization.asset_key.to_user_string()
            for e in result.get_asset_materialization_events()
        }
    )
    assert "recalls" not in done and "call_list" not in done
    after = store.export_practice("q-drop")
    assert after["patients"] == before["patients"] and store.call_list("q-drop") == calls_before


def test_bad_stored_rows_fail_with_masked_examples(database_url: str, store: Store, tmp_path: Path) -> None:
    _csv(tmp_path / "export.csv", 5)
    store.add_practice("q-bad", "Q", PmsKind.CSV, {"path": str(tmp_path)}, {})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["q-bad"])
        assert _run("q-bad", instance).success
        with store.begin_owner() as conn:  # what a buggy dialect could have written
            conn.execute(
                text(
                    "UPDATE patients SET phones = ARRAY['+15551234567'], date_of_birth = :future, "
                    "risk_flags = ARRAY['myopia'] WHERE practice_id = 'q-bad' AND first_name = 'Pat1'"
                ),
                {"future": date.today() + timedelta(days=30)},
            )
        checks = _check_alone("q-bad", instance)
    bad = checks["patients_are_valid"]
    assert not bad.passed
    failures = bad.metadata["failures"].value
    assert failures["phones_valid_uk_e164"] == 1 and failures["risk_flags_known"] == 1
    assert failures["birth_in_past_and_age_under_120"] == 1
    shown = json.dumps(bad.metadata["examples"].value, ensure_ascii=False)
    assert "Pat1" not in shown and "+15551234567" not in shown and "P•••" in shown


def test_a_whole_practice_is_validated_a_chunk_at_a_time_and_nothing_is_missed(
    database_url: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows a chunk over five patients: a bad row in one of the chunks is found, the rows of all
    three chunks are counted, and the share is the whole practice's."""
    import assets.checks

    monkeypatch.setattr(assets.checks, "CHUNK_ROWS", 2)
    _csv(tmp_path / "export.csv", 5)
    store.add_practice("q-chunks", "Q", PmsKind.CSV, {"path": str(tmp_path)}, {})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["q-chunks"])
        assert _run("q-chunks", instance).success
        with store.begin_owner() as conn:
            last = conn.execute(
                text("SELECT max(pms_patient_id) FROM patients WHERE practice_id = 'q-chunks'")
            ).scalar_one()
            conn.execute(
                text(
                    "UPDATE patients SET phones = ARRAY['+15551234567'] WHERE practice_id = 'q-chunks' AND pms_patient_id = :r"
                ),
                {"r": last},
            )
        checks = _check_alone("q-chunks", instance)
    bad = checks["patients_are_valid"]
    assert not bad.passed and bad.metadata["scope"].value == "every row"
    assert bad.metadata["failures"].value == {"phones_valid_uk_e164": 1}
    assert bad.metadata["rows"].value == 5 and bad.metadata["practice_rows"].value == 5
    assert [e["check"] for e in bad.metadata["examples"].value] == ["phones_valid_uk_e164"]


def test_reports_catch_each_rule() -> None:
    rows = [
        {
            "pms_patient_id": "1",
            "first_name": "Ann",
            "last_name": "Lee",
            "phones": ["+447700900001"],
            "date_of_birth": date(1990, 1, 1),
            "last_eye_test_date": date(1989, 1, 1),
            "risk_flags": [],
        },
        {
            "pms_patient_id": "1",
            "first_name": "Bob",
            "last_name": "Kay",
            "phones": [],
            "date_of_birth": date(1890, 1, 1),
            "last_eye_test_date": TODAY + timedelta(days=3),
            "risk_flags": [],
        },
    ]
    report = quality.patients_report(rows, TODAY)
    assert not report.passed
    assert set(report.failures) == {
        "birth_in_past_and_age_under_120",
        "last_test_not_in_future",
        "last_test_not_before_birth",
    }
    assert len(report.examples) <= quality.MAX_EXAMPLES

    appts = [
        {
            "pms_appointment_id": "a",
            "pms_patient_id": "1",
            "starts_at": datetime(2026, 1, 1, 10, tzinfo=UTC),
            "ends_at": datetime(2026, 1, 1, 9, tzinfo=UTC),
            "status": "booked",
        },
        {
            "pms_appointment_id": "b",
            "pms_patient_id": "ghost",
            "starts_at": datetime(2026, 1, 1, 10, tzinfo=UTC),
            "ends_at": datetime(2026, 1, 1, 11, tzinfo=UTC),
            "status": "maybe",
        },
    ]
    assert set(quality.appointments_report(appts).failures) == {"starts_before_it_ends", "status_known"}

    rules = RecallRules.from_settings({})
    recalls = [
        {
            "pms_patient_id": "1",
            "due_date": date(2026, 1, 1),
            "recall_source": "computed",
            "rule": "default",
            "interval_months": 12,
            "based_on": date(2025, 1, 1),
        },
        {
            "pms_patient_id": "2",
            "due_date": date(2024, 1, 1),
            "recall_source": "computed",
            "rule": "default",
            "interval_months": 24,
            "based_on": date(2025, 1, 1),
        },
    ]
    assert set(quality.recalls_report(recalls, rules).failures) == {"due_after_last_test", "interval_matches_rule"}


@pytest.mark.parametrize("hours,passed", [(1, True), (25.9, True), (26.5, False)])
def test_freshness(hours: float, passed: bool) -> None:
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    assert quality.freshness_report(now - timedelta(hours=hours), now).passed is passed
    assert quality.freshness_report(None, now).passed is False


def _good_patient(n: int) -> dict:
    return {
        "pms_patient_id": str(n),
        "first_name": "Ann",
        "last_name": "Lee",
        "phones": [f"+44770090000{n}"],
        "date_of_birth": date(1990, 1, 1),
        "last_eye_test_date": date(2025, 1, 1),
        "risk_flags": [],
    }


@pytest.mark.parametrize(
    "change,rule",
    [
        ({"date_of_birth": date(1890, 1, 1)}, "birth_in_past_and_age_under_120"),
        ({"last_eye_test_date": TODAY + timedelta(days=3)}, "last_test_not_in_future"),
        ({"last_eye_test_date": date(1989, 1, 1)}, "last_test_not_before_birth"),
        ({"phones": ["+15551234567"]}, "phones_valid_uk_e164"),
        ({"risk_flags": ["wobbly"]}, "risk_flags_known"),
    ],
)
def test_each_patient_rule_fails_alone_on_its_own_row(change: dict, rule: str) -> None:
    """One bad row among good ones: only its rule fails, pointing at that row (the rules run as one
    suite, so this proves each result is matched to its own rule)."""
    rows = [_good_patient(n) for n in range(4)]
    rows[2] = {**rows[2], **change}
    report = quality.patients_report(rows, TODAY)
    assert report.failures == {rule: 1}
    assert {e["check"] for e in report.examples} == {rule}
    assert [e["pms_patient_id"] for e in report.examples] == ["2"]


def test_whole_practice_invariants_are_counted_in_sql_with_examples(store: Store) -> None:
    """Each whole-practice invariant counts the rows that break it (one pass per check) and shows them."""
    store.add_practice("q-inv", "Q", PmsKind.CSV, {}, {})
    with store.begin_owner() as conn:
        conn.execute(
            text(
                "INSERT INTO patients (practice_id, pms_patient_id, first_name, last_name, phones, date_of_birth, active) "
                "VALUES ('q-inv', 'ok', 'Ann', 'Lee', '{+447700900001}', '1980-01-01', true), "
                "('q-inv', 'old', 'Bob', 'Kay', '{+447700900002}', '1890-01-01', true), "
                "('q-inv', 'mute', 'Cat', 'Ng', '{}', NULL, true), "
                "('q-inv', 'gone', 'Dan', 'Ode', '{+447700900004}', '1970-01-01', false)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO appointments (practice_id, pms_appointment_id, pms_patient_id, starts_at, ends_at, status, "
                "appointment_type) VALUES ('q-inv', 'a1', 'ok', now(), now() + interval '1 hour', 'booked', 'x'), "
                "('q-inv', 'a2', 'ghost', now(), now() + interval '1 hour', 'booked', 'x')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO recalls (patient_id, practice_id, due_date, recall_source, rule, interval_months, reason) "
                "SELECT patient_id, 'q-inv', '2027-01-01', 'computed', 'default', 24, 'r' FROM patients "
                "WHERE practice_id = 'q-inv' AND pms_patient_id IN ('ok', 'gone')"
            )
        )
        conn.execute(  # a recall naming no patient: the table checks no key (migration 0022)
            text(
                "INSERT INTO recalls (patient_id, practice_id, due_date, recall_source, rule, interval_months, reason) "
                "VALUES (-1, 'q-inv', '2027-01-01', 'computed', 'default', 24, 'r')"
            )
        )
    today = date(2026, 12, 7)
    counts, total, shown = store.quality_invariants("q-inv", "patients", today)
    assert (counts, total) == ({"birth_in_past_and_age_under_120": 1, "uncallable": 1}, 3)
    assert [r["pms_patient_id"] for r in shown["birth_in_past_and_age_under_120"]] == ["old"]
    assert [r["pms_patient_id"] for r in shown["uncallable"]] == ["mute"]
    counts, total, shown = store.quality_invariants("q-inv", "appointments", today)
    assert (counts, total) == ({"patient_exists": 1}, 2) and shown["patient_exists"][0]["pms_patient_id"] == "ghost"
    counts, total, shown = store.quality_invariants("q-inv", "recalls", today)
    assert (counts, total) == ({"patient_active": 1}, 3) and shown["patient_active"][0]["pms_patient_id"] == "gone"
    counts, total, shown = store.quality_invariants("q-inv", "recalls", today, every_row=True)
    assert (counts, total) == ({"patient_active": 1, "patient_exists": 1}, 3)
    assert [r["patient_id"] for r in shown["patient_exists"]] == [-1]


def test_a_check_reads_tuples_in_the_order_its_report_names_them(store: Store) -> None:
    """`Store.quality_rows` gives the driver's tuples: their columns are `quality.ROW_COLUMNS`, in
    order, and a report judges them as it judges the same rows as dictionaries (bad rows included:
    the store's own constraints allow no worse an appointment than one under a minute)."""
    from nvc_pipelines.store.checks import rows_sql
    from nvc_pipelines.store.db import driver

    store.add_practice("q-rows", "Q", PmsKind.CSV, {}, {})
    with store.begin_owner() as conn:
        conn.execute(
            text(
                "INSERT INTO patients (practice_id, pms_patient_id, first_name, last_name, phones, date_of_birth, "
                "last_eye_test_date, risk_flags, active) VALUES "
                "('q-rows', 'ok', 'Ann', 'Lee', '{+441632960001}', '1980-01-01', '2024-05-01', '{}', true), "
                "('q-rows', 'bad', 'Bob', 'Kay', '{+15551234567}', '2090-01-01', NULL, '{myopia}', true)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO appointments (practice_id, pms_appointment_id, pms_patient_id, starts_at, ends_at, status, "
                "appointment_type) VALUES ('q-rows', 'a1', 'ok', now(), now() + interval '1 hour', 'booked', 'x'), "
                "('q-rows', 'a2', 'bad', now(), now() + interval '30 seconds', 'booked', 'x')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO recalls (patient_id, practice_id, due_date, recall_source, rule, interval_months, reason, "
                "based_on) SELECT patient_id, 'q-rows', '2026-05-01', 'computed', 'adult_routine', 24, 'r', "
                "'2024-05-01' FROM patients WHERE practice_id = 'q-rows'"
            )
        )
    rules = RecallRules.from_settings({})
    reports = {
        "patients": lambda rows: quality.patients_report(rows, TODAY),
        "appointments": quality.appointments_report,
        "recalls": lambda rows: quality.recalls_report(rows, rules),
    }
    for kind, report in reports.items():
        with store.begin("q-rows") as conn, driver(conn).cursor() as cur:
            cur.execute(rows_sql(kind, changed=False).replace(":p", "%(p)s"), {"p": "q-rows"})
            assert tuple(c.name for c in cur.description or ()) == quality.ROW_COLUMNS[kind]
        [chunk] = list(store.quality_rows("q-rows", kind))
        assert len(chunk) == 2 and all(type(row) is tuple for row in chunk)
        as_dicts = [dict(zip(quality.ROW_COLUMNS[kind], row, strict=True)) for row in chunk]
        from_tuples, from_dicts = report(chunk), report(as_dicts)
        assert not from_tuples.passed and from_tuples.failures == from_dicts.failures
        assert from_tuples.examples == from_dicts.examples and from_tuples.counts == from_dicts.counts


def test_great_expectations_imports_without_scipy_stats_until_something_uses_it() -> None:
    """In a fresh process: validating does not import `scipy.stats` or `altair` (GX imports them for
    expectations NVC never runs), and code that does use them still gets the real module."""
    script = textwrap.dedent(
        """
        import json, sys
        import pandas as pd
        from nvc_pipelines import quality
        failing = quality.validate(pd.DataFrame({"a": [1, None]}),
                                   [("not_null", lambda e: e.ExpectColumnValuesToNotBeNull(column="a"))])
        from datetime import datetime
        visit = {"pms_appointment_id": "A1", "pms_patient_id": "P1", "starts_at": datetime(2026, 1, 5, 9),
                 "ends_at": datetime(2026, 1, 5, 9, 30), "status": "booked"}
        suite_passed = quality.appointments_report([visit]).passed  # one of NVC's own suites
        loaded_by_checks = [m for m in ("scipy.stats._stats_py", "altair.vegalite") if m in sys.modules]
        stand_ins_left = [m for m in ("scipy.stats", "altair") if m in sys.modules]
        from great_expectations.expectations.core import expect_column_kl_divergence_to_be_less_than as kl
        entropy = float(kl.stats.entropy([0.5, 0.5]))
        print(json.dumps({"failing": failing, "loaded_by_checks": loaded_by_checks, "entropy": entropy,
                          "stand_ins_left": stand_ins_left, "suite_passed": suite_passed,
                          "altair_chart": hasattr(__import__("altair"), "Chart"),
                          "real_after_use": type(sys.modules["scipy.stats"]).__name__}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["failing"] == {"not_null": [1]} and seen["suite_passed"] is True
    assert seen["loaded_by_checks"] == [] and seen["stand_ins_left"] == []  # later imports are ordinary
    assert abs(seen["entropy"] - 0.6931471805599453) < 1e-12 and seen["real_after_use"] == "module"
    assert seen["altair_chart"] is True


def test_a_stand_in_read_while_great_expectations_is_importing_gives_the_real_module() -> None:
    """A module read from (not just bound) during the import it stands in for is imported for real,
    and left as the real module afterwards."""
    sys.modules.pop("tabnanny", None)  # a standard module nothing here has imported
    with quality._imported_on_first_use(["tabnanny"]):
        import tabnanny

        assert isinstance(tabnanny, quality._OnFirstUse)
        assert callable(tabnanny.check)  # the real module's function, through the stand-in
    assert not isinstance(sys.modules["tabnanny"], quality._OnFirstUse) and callable(sys.modules["tabnanny"].check)
