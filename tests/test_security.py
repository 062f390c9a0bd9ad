"""Row-level security, the append-only audit log, erasure with suppression, and data portability."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import instance_for_test
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from nvc_pipelines import writeback
from nvc_pipelines.application.cli import main
from nvc_pipelines.definitions import defs
from nvc_pipelines.erasure import erase_patient
from nvc_pipelines.model import (
    Appointment,
    AppointmentStatus,
    ClinicalRecord,
    Patient,
    Phone,
    PhoneType,
    PmsKind,
    ReadResult,
    RejectedRow,
)
from nvc_pipelines.recall import RecallRules, compute_recall
from nvc_pipelines.store import PracticeNotFound, Store, StoreUnavailable
from nvc_pipelines.store.streams import APPOINTMENTS, CLINICAL_RECORDS
from resources.csv_source import SEED_COLUMNS
from sandboxes.optix import OptixSandbox

PRACTICE_TABLES = (
    "patients",
    "recalls",
    "rejected_rows",
    "appointments",
    "clinical_records",
    "sync_cursors",
    "call_list",
    "patient_merges",
    "audit_log",
    "outbox",
    "suppressions",
    "practices",
)


def _fill(store: Store, practice_id: str) -> None:
    store.add_practice(practice_id, practice_id, PmsKind.CSV, {}, {})
    people = [
        Patient(
            practice_id,
            f"{practice_id}-1",
            "Ann",
            "Lee",
            [Phone("+447700900001", PhoneType.MOBILE)],
            last_eye_test_date=date(2022, 1, 1),
        ),
        Patient(
            practice_id,
            f"{practice_id}-2",
            "Bob",
            "Kay",
            [Phone("+447700900002", PhoneType.MOBILE)],
            last_eye_test_date=date(2022, 1, 1),
        ),
    ]
    store.write_patients(practice_id, "csv", ReadResult(people, [RejectedRow("l9", "bad", {"x": 1})]), "r1", full=True)
    start = datetime(2026, 1, 5, 9, tzinfo=UTC)
    appointment = Appointment(
        practice_id,
        f"{practice_id}-ap",
        f"{practice_id}-1",
        start,
        start + timedelta(minutes=30),
        AppointmentStatus.COMPLETED,
    )
    exam = ClinicalRecord(practice_id, f"{practice_id}-ex", f"{practice_id}-1", date(2026, 1, 5), notes="T2DM")
    store.write_stream(practice_id, APPOINTMENTS, [appointment], [], source="csv", run_id="r1", full=True)
    store.write_stream(practice_id, CLINICAL_RECORDS, [exam], [], source="csv", run_id="r1", full=True)
    rules = RecallRules.from_settings({})
    store.write_recalls(practice_id, [compute_recall(p, rules) for p in people])
    store.rebuild_call_list(practice_id, date(2026, 11, 25))
    store.merge_patients(practice_id, f"{practice_id}-1", f"{practice_id}-2", "test")
    writeback.add_booking(
        store, practice_id, f"{practice_id}-bk", f"{practice_id}-1", datetime.now(UTC) + timedelta(days=9)
    )
    erase_target = Patient(practice_id, f"{practice_id}-3", "Cy", "Day", [Phone("+447700900003", PhoneType.MOBILE)])
    store.write_patients(practice_id, "csv", ReadResult([erase_target]), "r2")
    erase_patient(store, practice_id, f"{practice_id}-3", "test")


@pytest.fixture
def two_practices(store: Store) -> Store:
    _fill(store, "prac-a")
    _fill(store, "prac-b")
    return store


def test_practice_a_sees_and_writes_nothing_of_practice_b(two_practices: Store) -> None:
    store = two_practices
    with store.begin("prac-a") as conn:
        for table in PRACTICE_TABLES:
            mine = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            theirs = conn.execute(text(f"SELECT count(*) FROM {table} WHERE practice_id <> 'prac-a'")).scalar_one()
            assert theirs == 0, table
            assert mine > 0, table
            if table not in ("audit_log", "practices"):  # no UPDATE grant for nvc_app on these
                sql = f"UPDATE {table} SET practice_id = practice_id WHERE practice_id = 'prac-b'"
                assert conn.execute(text(sql)).rowcount == 0, table
    for table, row in (
        (
            "patients",
            "(practice_id, pms_patient_id, first_name, last_name) VALUES ('prac-b', 'x', 'a', 'b')",
        ),
        (
            "outbox",
            "(practice_id, kind, idempotency_key, pms_patient_id, payload) VALUES ('prac-b', 'call_attempt', "
            "'k1', 'x', '{}')",
        ),
        ("audit_log", "(actor, practice_id, action) VALUES ('x', 'prac-b', 'forged')"),
    ):
        with pytest.raises(ProgrammingError, match="row-level security"), store.begin("prac-a") as conn:
            conn.execute(text(f"INSERT INTO {table} {row}"))
    with store.begin("prac-a") as conn:
        assert conn.execute(text("DELETE FROM patients WHERE practice_id = 'prac-b'")).rowcount == 0


def test_the_application_role_cannot_bypass_rls_and_the_audit_log_is_append_only(two_practices: Store) -> None:
    store = two_practices
    with store.begin() as conn:
        role = conn.execute(text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'nvc_app'")).one()
        assert tuple(role) == (False, False)
        forced = dict(
            conn.execute(
                text("SELECT relname, relforcerowsecurity FROM pg_class WHERE relname = ANY(:t)"),
                {"t": list(PRACTICE_TABLES)},
            ).all()
        )
        assert all(forced[t] for t in PRACTICE_TABLES)
    for statement in ("UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log"):
        with pytest.raises(StoreUnavailable, match="permission denied"), store.begin("prac-a") as conn:
            conn.execute(text(statement))
    # Even the owner role (migrations, ops) cannot change or remove audit rows: a trigger refuses it.
    for statement in ("UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(DBAPIError, match="the audit log is append-only"), store.begin_owner() as conn:
            conn.execute(text(statement))
    with store.begin_owner() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_log")).scalar_one() > 0


def test_merges_exports_and_writeback_stay_inside_the_practice(two_practices: Store) -> None:
    store = two_practices
    with pytest.raises(PracticeNotFound):
        store.merge_patients("prac-a", "prac-a-1", "prac-b-1", "test")
    exported = json.dumps(store.export_practice("prac-a"))
    assert "prac-b" not in exported
    claimed = writeback._claim(store, "prac-a", 100)
    assert {r.practice_id for r in claimed} == {"prac-a"}


def _csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = [",".join(SEED_COLUMNS)] + [f"{f},{ln},{ph},15/01/2024,standard,," for f, ln, ph in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_erasure_survives_full_syncs_and_spares_the_family(database_url: str, store: Store, tmp_path: Path) -> None:
    landline = "0161 496 0123"
    _csv(tmp_path / "export.csv", [("Ann", "Lee", landline), ("Tom", "Lee", landline), ("Bo", "Kay", "07700 900555")])
    store.add_practice("gdpr", "GDPR", PmsKind.CSV, {"path": str(tmp_path)}, {})
    job = defs.resolve_job_def("practice_sync")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["gdpr"])
        assert job.execute_in_process(partition_key="gdpr", instance=instance).success
        ann = next(p for p in store.export_practice("gdpr")["patients"] if p["first_name"] == "Ann")
        writeback.add_booking(
            store, "gdpr", "ann-booking", ann["pms_patient_id"], datetime.now(UTC) + timedelta(days=3)
        )
        result = CliRunner().invoke(main, ["erase", "gdpr", ann["pms_patient_id"], "--yes"])
        assert result.exit_code == 0, result.output
        again = job.execute_in_process(partition_key="gdpr", instance=instance, tags={"nvc/full_sync": "true"})
    assert again.success
    names = sorted(p["first_name"] for p in store.export_practice("gdpr")["patients"])
    assert names == ["Bo", "Tom"]  # Ann stays erased; Tom shares her landline and stays
    assert writeback.outbox_rows(store, "gdpr") == []
    meta = again.asset_materializations_for_node("patients")[0].metadata
    assert meta["suppressed_erased"].value == 1
    with store.begin_owner() as conn:
        dump = json.dumps([list(map(str, r)) for r in conn.execute(text("SELECT * FROM suppressions")).all()])
        audit = json.dumps([str(r) for r in conn.execute(text("SELECT * FROM audit_log WHERE action = 'erase'")).all()])
    for personal in ("Ann", "+441614960123", landline):
        assert personal not in dump and personal not in audit


def test_an_erased_persons_invalid_row_keeps_no_personal_data(database_url: str, store: Store, tmp_path: Path) -> None:
    """Erased, then a newer file where her row is invalid (a bad date; a broken line): none of her
    name or number is stored again in the quarantine, nor shown by either export."""
    _csv(tmp_path / "a.csv", [("Ann", "Lee", "07700 900123"), ("Bo", "Kay", "07700 900555")])
    store.add_practice("gdpr-rej", "GDPR", PmsKind.CSV, {"path": str(tmp_path)}, {})
    job = defs.resolve_job_def("practice_sync")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["gdpr-rej"])
        assert job.execute_in_process(partition_key="gdpr-rej", instance=instance).success
        ann = next(p for p in store.export_practice("gdpr-rej")["patients"] if p["first_name"] == "Ann")
        erase_patient(store, "gdpr-rej", ann["pms_patient_id"], "test")
        (tmp_path / "a.csv").unlink()
        lines = [
            ",".join(SEED_COLUMNS),
            "Ann,Lee,07700 900123,31/02/2024,standard,,",  # her row, invalid: an impossible date
            "Ann,Lee,07700 900123,15/01/2024,standard,,,extra,cells",  # her row again, more cells than columns
            "Bo,Kay,07700 900555,15/01/2024,standard,,",
            "Cy,Day,07700 900777,31/02/2024,standard,,",  # someone else's invalid row: kept with its reason
        ]
        (tmp_path / "b.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        again = job.execute_in_process(partition_key="gdpr-rej", instance=instance)
    assert again.success
    meta = again.asset_materializations_for_node("patients")[0].metadata
    assert meta["suppressed_erased"].value == 2
    runner = CliRunner()
    exported = runner.invoke(main, ["export", "gdpr-rej"]).output
    assert "Cy" in exported  # the other invalid row is kept, with its reason
    out = tmp_path / "export.csv"
    assert runner.invoke(main, ["export", "gdpr-rej", "--format", "csv", "--output", str(out)]).exit_code == 0
    csv_text = out.read_text(encoding="utf-8-sig") + (tmp_path / "export-rejected.csv").read_text(encoding="utf-8-sig")
    with store.begin_owner() as conn:
        quarantine = json.dumps([list(map(str, r)) for r in conn.execute(text("SELECT * FROM rejected_rows")).all()])
    for personal in ("Ann", "900123"):
        assert personal not in exported and personal not in csv_text and personal not in quarantine


def test_erasure_survives_incremental_syncs(database_url: str, store: Store) -> None:
    with OptixSandbox(practices={"OPX-5": 6}, api_keys={"k5": "OPX-5"}) as sandbox:
        store.add_practice(
            "gdpr-optix", "G", PmsKind.OPTIX, {"practice_id": "OPX-5", "api_url": sandbox.url}, {"api_key": "k5"}
        )
        job = defs.resolve_job_def("practice_sync")
        with instance_for_test() as instance:
            instance.add_dynamic_partitions("practices", ["gdpr-optix"])
            assert job.execute_in_process(partition_key="gdpr-optix", instance=instance).success
            victim = store.export_practice("gdpr-optix")["patients"][0]["pms_patient_id"]
            erase_patient(store, "gdpr-optix", victim, "test")
            sandbox.update_patient("OPX-5", victim, last_name="Changed")  # the PMS sends them again
            incremental = job.execute_in_process(partition_key="gdpr-optix", instance=instance)
        assert incremental.asset_materializations_for_node("patients")[0].metadata["mode"].value == "incremental"
        assert victim not in {p["pms_patient_id"] for p in store.export_practice("gdpr-optix")["patients"]}
        assert not [r for r in sandbox.request_log if r[0] == "DELETE"]  # never anything deleted in the PMS


def test_portability_exports_one_patient_and_audit_lists_access(two_practices: Store) -> None:
    runner = CliRunner()
    one = json.loads(runner.invoke(main, ["export", "prac-a", "--patient", "prac-a-1"]).output)
    assert [p["pms_patient_id"] for p in one["patients"]] == ["prac-a-1"]
    assert {a["pms_patient_id"] for a in one["appointments"]} <= {"prac-a-1"}
    assert one["rejected_rows"] == []
    audit = runner.invoke(main, ["audit", "prac-a"]).output
    assert "export_patient" in audit and "records=prac-a-1" in audit and "erase" in audit and "merge" in audit
    header, *rows = [line for line in audit.splitlines() if line.strip()]
    at = header.index("ACTION")
    assert rows and all(row[at - 2 : at] == "  " and row[at] != " " for row in rows), audit  # columns line up
    missing = runner.invoke(main, ["export", "prac-a", "--patient", "nobody"])
    assert missing.exit_code == 1 and "no patient 'nobody'" in missing.output
