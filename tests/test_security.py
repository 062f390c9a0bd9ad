"""Row-level security, the append-only audit log, erasure with suppression, and data portability."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dagster import instance_for_test, materialize
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from assets.sync import patients
from nvc_pipelines import writeback
from nvc_pipelines.application.cli import main
from nvc_pipelines.definitions import defs
from nvc_pipelines.erasure import drop_erased, erase_patient, load_suppressions
from nvc_pipelines.model import (
    Appointment,
    AppointmentStatus,
    ClinicalRecord,
    Patient,
    Phone,
    PhoneType,
    PmsKind,
    Practice,
    ReadResult,
    RejectedRow,
)
from nvc_pipelines.recall import RecallRules, compute_recall
from nvc_pipelines.store import PracticeNotFound, Store, StoreUnavailable
from nvc_pipelines.store.erasure import ErasedDuringRead
from nvc_pipelines.store.recalls import lock_recalls
from nvc_pipelines.store.streams import APPOINTMENTS, CLINICAL_RECORDS, PATIENTS
from resources.csv_source import SEED_COLUMNS
from resources.deployment import pms_gateway
from resources.gateway import PmsGateway
from resources.store import StoreResource
from sandboxes.optix import OptixSandbox

PRACTICE_TABLES = (
    "patients",
    "recalls",
    "rejected_rows",
    "appointments",
    "clinical_records",
    "sync_cursors",
    "call_list",
    "recall_due",
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


def test_erasure_takes_the_patient_off_the_recall_queue(two_practices: Store) -> None:
    """A patient changed since their recall was computed is queued in `recall_due` (by PMS id);
    erasing them removes that row too, and leaves the other patients queued."""
    store = two_practices
    with store.begin_owner() as conn:
        conn.execute(text("UPDATE patients SET change_seq = change_seq + 1 WHERE practice_id = 'prac-a'"))
    assert set(store.recall_targets("prac-a", everyone=False)) == {"prac-a-1", "prac-a-2"}
    removed = erase_patient(store, "prac-a", "prac-a-1", "test")
    assert removed["recall_due"] == 1
    assert set(store.recall_targets("prac-a", everyone=False)) == {"prac-a-2"}
    with store.begin_owner() as conn:
        queued = conn.execute(text("SELECT pms_patient_id FROM recall_due WHERE practice_id = 'prac-a'")).scalars()
        assert list(queued) == ["prac-a-2"]


class _ErasureInBackground:
    """`erase_patient` in a thread, started at once: `waits()` says it is still blocked a second
    later, `finished()` waits for it and raises what it raised."""

    def __init__(self, store: Store, practice_id: str, ref: str) -> None:
        self.error: BaseException | None = None
        self.told_to_wait = threading.Event()  # what `nvc erase` prints then

        def erase() -> None:
            try:
                erase_patient(store, practice_id, ref, "test", on_wait=self.told_to_wait.set)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                self.error = exc

        self.worker = threading.Thread(target=erase, daemon=True)
        self.worker.start()

    def waits(self) -> bool:
        self.worker.join(timeout=1.0)
        return self.worker.is_alive()

    def finished(self) -> None:
        self.worker.join(timeout=60)
        assert not self.worker.is_alive(), "erasure never finished"
        if self.error is not None:
            raise self.error


def test_erasing_a_patient_while_recalls_are_written_leaves_no_recall_of_theirs(two_practices: Store) -> None:
    """The recalls table checks no key (migration 0022): erasure takes the recalls' lock first, so a
    recall write that read the patient before they were erased commits first, and its recall of
    them is deleted with the rest (without the lock, it landed after the erasure, naming no one)."""
    store = two_practices
    with store.begin_owner() as conn:
        patient_id = conn.execute(
            text("SELECT patient_id FROM patients WHERE practice_id = 'prac-a' AND pms_patient_id = 'prac-a-1'")
        ).scalar_one()
        # Her first recall, then: a row only the write's transaction sees, which no lock of a row guards.
        conn.execute(text("DELETE FROM recalls WHERE patient_id = :id"), {"id": patient_id})
    with store.begin("prac-a") as conn:  # a recall write, as `write_recalls` goes, held open
        lock_recalls(conn, "prac-a")
        conn.execute(
            text(
                "INSERT INTO recalls (patient_id, practice_id, due_date, recall_source, rule, interval_months, reason) "
                "SELECT patient_id, 'prac-a', '2027-01-01', 'computed', 'adult', 24, 'r' FROM patients "
                "WHERE practice_id = 'prac-a' AND pms_patient_id = 'prac-a-1'"
            )
        )
        erasing = _ErasureInBackground(store, "prac-a", "prac-a-1")
        assert erasing.waits(), "erasure did not wait for the recall write"
    erasing.finished()
    with store.begin_owner() as conn:
        left = conn.execute(text("SELECT count(*) FROM recalls WHERE patient_id = :id"), {"id": patient_id})
        assert left.scalar_one() == 0


def test_erasing_a_patient_while_their_clinical_record_is_merged_leaves_them_off_the_recall_queue(
    two_practices: Store,
) -> None:
    """A clinical merge queues its patient without touching the patient row, so erasure does not wait
    for it there: it waits when it deletes the patient's clinical records, and deletes their queued
    row after that (deleted first, the merge's row landed after the erasure, naming them)."""
    store = two_practices
    with store.begin_owner() as conn:  # her recall computed: not queued, so the merge's row is new
        conn.execute(text("DELETE FROM recall_due WHERE practice_id = 'prac-a'"))
    with store.begin("prac-a") as conn:  # a clinical merge changing her exam, held open
        conn.execute(text("UPDATE clinical_records SET notes = 'Glaucoma' WHERE pms_record_id = 'prac-a-ex'"))
        conn.execute(
            text(
                "INSERT INTO recall_due (practice_id, pms_patient_id, seq) "
                "VALUES ('prac-a', 'prac-a-1', nextval('recall_due_seq')) "
                "ON CONFLICT (practice_id, pms_patient_id) DO UPDATE SET seq = EXCLUDED.seq"
            )
        )
        erasing = _ErasureInBackground(store, "prac-a", "prac-a-1")
        assert erasing.waits(), "erasure did not wait for the clinical merge"
    erasing.finished()
    with store.begin_owner() as conn:
        left = conn.execute(text("SELECT count(*) FROM recall_due WHERE pms_patient_id = 'prac-a-1'"))
        assert left.scalar_one() == 0


def _ann(practice_id: str, last_name: str = "Lee") -> Patient:
    """prac-x-1 as the PMS sends her (`_fill`'s first patient)."""
    phone = Phone("+447700900001", PhoneType.MOBILE)
    return Patient(practice_id, f"{practice_id}-1", "Ann", last_name, [phone], last_eye_test_date=date(2022, 1, 1))


def test_a_write_that_looked_for_the_erased_before_an_erasure_writes_nothing(two_practices: Store) -> None:
    """A read left out who was erased when it began; she was erased before its write: the write
    refuses (nothing of the read is written, she stays erased) and says so. Without the check, the
    write put her back."""
    store = two_practices
    looked = load_suppressions(store, "prac-a")  # the read's look at the erased, before hers
    erase_patient(store, "prac-a", "prac-a-1", "test")
    with pytest.raises(ErasedDuringRead, match="erased while its patients were being read"):
        store.write_stream(
            "prac-a",
            PATIENTS,
            [_ann("prac-a", "Changed")],
            [],
            source="optix",
            run_id="r3",
            full=False,
            left_out=lambda: looked.hashes,
        )
    assert "prac-a-1" not in {p["pms_patient_id"] for p in store.export_practice("prac-a")["patients"]}
    # With the erasure in, the same read writes, without her.
    kept, dropped = drop_erased(store, "prac-a", [_ann("prac-a", "Changed")], patients=True)
    assert (kept, dropped) == ([], 1)


def test_an_erasure_waits_for_a_write_that_is_reading_and_then_deletes_what_it_wrote(two_practices: Store) -> None:
    """A paged write is under way (it read her before her erasure, and has not committed): the
    erasure waits for it, then deletes her as that write left her. Without the lock, the erasure
    ran at once and the write, committing after it, put her back."""
    store = two_practices
    looked = load_suppressions(store, "prac-a")
    reading, go_on = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def pages() -> Iterator[tuple[list[Patient], list[RejectedRow]]]:
        yield [_ann("prac-a", "Changed")], []
        reading.set()
        assert go_on.wait(60)

    def write() -> None:
        try:
            store.write_stream_pages(
                "prac-a", PATIENTS, pages(), source="optix", run_id="r3", full=False, left_out=lambda: looked.hashes
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failed.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert reading.wait(60)
        erasing = _ErasureInBackground(store, "prac-a", "prac-a-1")
        assert erasing.waits(), "erasure did not wait for the write under way"
        assert erasing.told_to_wait.is_set()  # `nvc erase` says why it waits
    finally:
        go_on.set()
    writer.join(60)
    assert not failed, failed
    erasing.finished()
    assert "prac-a-1" not in {p["pms_patient_id"] for p in store.export_practice("prac-a")["patients"]}


def test_nothing_is_recorded_for_the_pms_about_an_erased_patient(two_practices: Store) -> None:
    """A booking or a call's note sent after the patient was erased (the calling system still had
    her on its list: `_fill` erased prac-a-3) is refused with the reason, and nothing of hers goes
    into the outbox, the call events or the PMS. Before, both were recorded and the note written back."""
    store = two_practices
    start = datetime.now(UTC) + timedelta(days=5)
    with pytest.raises(writeback.OutboxError, match="prac-a-3 of practice prac-a was erased"):
        writeback.add_booking(store, "prac-a", "late-booking", "prac-a-3", start)
    with pytest.raises(writeback.OutboxError, match="was erased"):
        writeback.add_call_event(store, "prac-a", "call_outcome", "late-note", "prac-a-3", "Booked.", outcome="booked")
    with store.begin_owner() as conn:
        left = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM outbox WHERE pms_patient_id = 'prac-a-3') + "
                "(SELECT count(*) FROM call_events WHERE pms_patient_id = 'prac-a-3')"
            )
        )
        assert left.scalar_one() == 0
    assert writeback.add_booking(store, "prac-a", "other-booking", "prac-a-2", start)[1] is True  # the others go on


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


def test_erasure_removes_the_persons_quarantined_rows_however_their_number_was_typed(
    database_url: str, store: Store, tmp_path: Path
) -> None:
    """Her rows quarantined before she is erased (a repeat of her row; a row matched onto her as a
    duplicate of another) hold her number as the file had it, spaced or bracketed: erasing her
    removes them all, and keeps the other patients' quarantined rows."""
    rows = [("Ann", "Lee", "07700 900123"), ("Bo", "Kay", "07700 900555")]
    _csv(tmp_path / "export.csv", rows)
    store.add_practice("gdpr-q", "GDPR", PmsKind.CSV, {"path": str(tmp_path)}, {})
    job = defs.resolve_job_def("practice_sync")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["gdpr-q"])
        assert job.execute_in_process(partition_key="gdpr-q", instance=instance).success
        _csv(tmp_path / "export.csv", [
            *rows,
            ("Ann", "Lee", "(07700) 900-123"),  # her row again: a duplicate of line 2
            ("Ann", "Lee", "07700 900999; +44 7700 900123"),  # a new first number, matched onto her: a duplicate
            ("Ann", "Lee", "07700\u00a0900123"),  # a spreadsheet's non-breaking space: her again
            ("Bo", "Kay", "07700 900555"),  # his row again
        ])  # fmt: skip
        assert job.execute_in_process(partition_key="gdpr-q", instance=instance).success

    def quarantine() -> str:
        with store.begin_owner() as conn:
            return json.dumps([list(map(str, r)) for r in conn.execute(text("SELECT * FROM rejected_rows")).all()])

    assert quarantine().count("Ann") == 3 and "Bo" in quarantine()
    ann = next(p for p in store.export_practice("gdpr-q")["patients"] if p["first_name"] == "Ann")
    erase_patient(store, "gdpr-q", ann["pms_patient_id"], "test")
    assert "Ann" not in quarantine() and "900123" not in quarantine().replace("-", "").replace(" ", "")
    assert "Bo" in quarantine()


def _pms_sandbox(pms: str):
    """A started sandbox of six patients, the practice's settings and secrets, its practice reference,
    and how to change a patient's first name in it."""
    from sandboxes.acuitas import ROLE_DIARY, ROLE_READ, AcuitasSandbox
    from sandboxes.optisoft import OptisoftSandbox
    from sandboxes.sycle import SycleSandbox

    if pms == "optix":
        server = OptixSandbox(practices={"OPX-E": 6}, api_keys={"ke": "OPX-E"}).start()
        return server, {"practice_id": "OPX-E", "api_url": server.url}, {"api_key": "ke"}, "OPX-E", "first_name"
    if pms == "acuitas":
        server = AcuitasSandbox(databases={"ACU_E": 6}, users={"ue": ("pe", {ROLE_READ, ROLE_DIARY})}).start()
        settings = {"server_url": server.url, "database": "ACU_E"}
        return server, settings, {"api_username": "ue", "api_password": "pe"}, "ACU_E", "first_name"
    if pms == "optisoft":
        server = OptisoftSandbox(practices={"OS-E": 6}, db_users={"UE": ("pe", True)}).start()
        settings = {"server_address": server.url, "practice_code": "OS-E"}
        return server, settings, {"db_username": "UE", "db_password": "pe"}, "OS-E", "Forename"
    server = SycleSandbox(clinics={"2803-9577": 6}, logins={"ue": "pe"}).start()
    settings = {"account_url": server.url, "location_id": "2803-9577"}
    return server, settings, {"api_username": "ue", "api_password": "pe"}, "2803-9577", "first_name"


@pytest.mark.parametrize("pms", ["optix", "acuitas", "optisoft", "sycle"])
def test_an_erased_persons_invalid_pms_row_keeps_no_personal_data(database_url: str, store: Store, pms: str) -> None:
    """Every PMS, as the CSV above: a patient is erased, then the PMS sends her record again, now
    invalid (a control character in her first name). It is recognised by her PMS id and left out
    before anything of it is kept; another patient's row made invalid the same way is kept in the
    quarantine with its reason, so the row really was rejected."""
    server, settings, secrets, ref, first_name_field = _pms_sandbox(pms)
    practice_id = f"gdpr-{pms}"
    try:
        store.add_practice(practice_id, practice_id, PmsKind(pms), settings, secrets)
        job = defs.resolve_job_def("practice_sync")
        with instance_for_test() as instance:
            instance.add_dynamic_partitions("practices", [practice_id])
            assert job.execute_in_process(partition_key=practice_id, instance=instance).success
            stored = {p["pms_patient_id"]: p for p in store.export_practice(practice_id)["patients"]}
            seeds = {pid: seed for pid, seed in server.seed_records(ref).items() if str(pid) in stored}
            victim, other = [pid for pid, seed in seeds.items() if seed.mobile][:2]
            her = stored[str(victim)]
            erase_patient(store, practice_id, str(victim), "test")
            for pid in (victim, other):
                server.update_patient(ref, pid, **{first_name_field: seeds[pid].first_name + "\x07"})
            again = job.execute_in_process(partition_key=practice_id, instance=instance, tags={"nvc/full_sync": "true"})
        assert again.success
    finally:
        server.stop()
    with store.begin_owner() as conn:
        quarantine = [
            (r.row_ref, r.reason, json.dumps(r.raw))
            for r in conn.execute(
                text("SELECT row_ref, reason, raw FROM rejected_rows WHERE practice_id = :p"), {"p": practice_id}
            )  # fmt: skip
        ]
    assert any(str(other) in ref_ and "control characters" in reason for ref_, reason, _ in quarantine), quarantine
    personal = [str(victim), her["last_name"], *(ph[-6:] for ph in her["phones"])]
    dump = json.dumps(quarantine) + json.dumps(store.export_practice(practice_id)["rejected_rows"])
    assert not [value for value in personal if value in dump]
    assert again.asset_materializations_for_node("patients")[0].metadata["suppressed_erased"].value >= 1


def test_an_erased_persons_repeated_pms_record_is_left_out_with_the_first() -> None:
    """A PMS that sends one of her appointments twice in a read (the same id, spelt with a trailing
    space): the first copy is left out by her PMS id, and the repeat, rejected as a duplicate, is
    left out too instead of keeping her id and notes in the quarantine."""
    from nvc_pipelines.erasure import Suppressions, drop_erased, suppression_key, value_hash
    from nvc_pipelines.normalise import AppointmentDraft, build_appointment, collect_records

    rows = [
        (f"pms:diary:{ref}", {"id": ref, "patient": "P9", "notes": "Cataract referral"}, AppointmentDraft(
            ref, "P9", "2026-01-05T09:00:00Z", notes="Cataract referral"))
        for ref in ("A1", "A1 ")
    ]  # fmt: skip
    batch = collect_records(rows, lambda d: build_appointment("p", d), lambda a: a.pms_appointment_id)
    assert len(batch.records) == 1 and batch.rejected[0].reason == "duplicate of pms:diary:A1"
    erased = Suppressions("p", [("pms_patient_id", value_hash("p", "pms_patient_id", "P9", suppression_key()))])
    kept, left_out = drop_erased(None, "p", batch.records, patients=False, rejected=batch.rejected, suppressions=erased)
    assert (kept, left_out, batch.rejected) == ([], 2, [])


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


class _ErasingGateway(PmsGateway):
    """The PMS gateway, erasing one patient when a step opens its PMS: after the sync planned and
    before its write began (a sync that looked at the erased when it started would write her back,
    or now be refused)."""

    database_url: str
    victim: str

    def open(self, practice: Practice, credentials: dict[str, str], *, max_attempts: int | None = None) -> Any:
        store = StoreResource(database_url=self.database_url).open()
        if self.victim in {p["pms_patient_id"] for p in store.export_practice(practice.practice_id)["patients"]}:
            erase_patient(store, practice.practice_id, self.victim, "test")
        return super().open(practice, credentials, max_attempts=max_attempts)


def test_a_sync_under_way_when_a_patient_is_erased_leaves_her_out(database_url: str, store: Store) -> None:
    """The sync assets look up who is erased inside their write's transaction, under its lock on
    erasures: a patient erased after the run started (here, as it opens its PMS) is left out, and
    the run succeeds."""
    with OptixSandbox(practices={"OPX-6": 6}, api_keys={"k6": "OPX-6"}) as sandbox:
        store.add_practice(
            "gdpr-race", "G", PmsKind.OPTIX, {"practice_id": "OPX-6", "api_url": sandbox.url}, {"api_key": "k6"}
        )
        resources = {"store": StoreResource(database_url=database_url), "pms": pms_gateway()}
        with instance_for_test() as instance:
            instance.add_dynamic_partitions("practices", ["gdpr-race"])
            assert materialize([patients], partition_key="gdpr-race", instance=instance, resources=resources).success
            victim = store.export_practice("gdpr-race")["patients"][0]["pms_patient_id"]
            sandbox.update_patient("OPX-6", victim, last_name="Changed")  # the PMS sends her again
            kinds = {kind: getattr(resources["pms"], kind) for kind in ("csv", "optix", "acuitas", "optisoft", "sycle")}
            gateway = _ErasingGateway(**kinds, database_url=database_url, victim=victim)
            again = materialize(
                [patients], partition_key="gdpr-race", instance=instance, resources={**resources, "pms": gateway}
            )
    assert again.success
    assert victim not in {p["pms_patient_id"] for p in store.export_practice("gdpr-race")["patients"]}
    assert again.asset_materializations_for_node("patients")[0].metadata["suppressed_erased"].value == 1


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
