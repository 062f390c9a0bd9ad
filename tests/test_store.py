from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import text

from nvc_pipelines.model import Patient, Phone, PhoneType, PmsKind, ReadResult, Recall, RejectedRow
from nvc_pipelines.store import PracticeExists, PracticeNotFound, Store

MIGRATIONS = Path(__file__).resolve().parents[1] / "nvc_pipelines/store/migrations/versions"


def _patient(pid: str, **kw) -> Patient:
    base = dict(
        practice_id="p1",
        pms_patient_id=pid,
        first_name="Ann",
        last_name="Lee",
        phones=[Phone("+447700900123", PhoneType.MOBILE)],
        last_eye_test_date=date(2024, 1, 1),
    )
    return Patient(**{**base, **kw})


@pytest.fixture
def practice(store: Store) -> str:
    store.add_practice("p1", "Practice One", PmsKind.CSV, {"path": "/tmp/x"}, {"api_key": "s3cret-value"})
    return "p1"


def test_schema_is_migrated_by_code(store: Store) -> None:
    with store.begin_owner() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        tables = set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert version == sorted(p.stem.split("_")[0] for p in MIGRATIONS.glob("0*.py"))[-1]
    assert {"practices", "patients", "recalls", "rejected_rows", "appointments", "clinical_records"} <= tables
    store.migrate()  # idempotent


def test_credentials_are_encrypted_at_rest(store: Store, practice: str) -> None:
    with store.begin_owner() as conn:
        blob = conn.execute(text("SELECT credentials FROM practices")).scalar_one()
    assert b"s3cret-value" not in bytes(blob)
    assert store.practice_credentials(practice) == {"api_key": "s3cret-value"}
    assert "s3cret" not in repr(store.list_practices())


def test_connecting_twice_needs_update(store: Store, practice: str) -> None:
    with pytest.raises(PracticeExists):
        store.add_practice(practice, "Again", PmsKind.CSV, {}, {})
    store.add_practice(practice, "Renamed", PmsKind.CSV, {"path": "/y"}, {}, replace=True)
    assert store.get_practice(practice).display_name == "Renamed"
    with pytest.raises(PracticeNotFound):
        store.get_practice("nope")


def test_bad_practice_id_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        store.add_practice("Bad Id!", "x", PmsKind.CSV, {}, {})


def test_writes_are_idempotent_and_count_what_changed(store: Store, practice: str) -> None:
    read = ReadResult([_patient("1"), _patient("2")], [RejectedRow("line 4", "phone number is missing", {"a": "b"})])
    first = store.write_patients(practice, "csv", read, "run-1", full=True)
    assert (first.inserted, first.updated, first.unchanged, first.rejected) == (2, 0, 0, 1)
    again = store.write_patients(practice, "csv", read, "run-2", full=True)
    assert (again.inserted, again.updated, again.unchanged, again.rejected) == (0, 0, 2, 1)
    changed = ReadResult([_patient("1", last_name="Lee-Smith"), _patient("2")], [])
    third = store.write_patients(practice, "csv", changed, "run-3", full=True)
    assert (third.inserted, third.updated, third.unchanged, third.rejected) == (0, 1, 1, 0)
    with store.begin_owner() as conn:
        assert conn.execute(text("SELECT count(*) FROM patients")).scalar_one() == 2
        assert conn.execute(text("SELECT count(*) FROM rejected_rows")).scalar_one() == 0
    assert [p.last_name for p in store.load_patients(practice)] == ["Lee-Smith", "Lee"]


def test_recalls_replace_and_report_changes(store: Store, practice: str) -> None:
    store.write_patients(practice, "csv", ReadResult([_patient("1"), _patient("2")], []), None)
    recalls = [
        Recall("1", date(2026, 1, 1), "computed", "default", 24),
        Recall("2", date(2025, 1, 1), "pms", "pms", None),
    ]
    assert store.write_recalls(practice, recalls) == 2
    assert store.write_recalls(practice, recalls) == 0
    assert store.write_recalls(practice, recalls[:1]) == 1  # the dropped one
    summary = store.recall_summary(practice, date(2026, 6, 1))
    assert summary == {
        "total": 1,
        "due_now": 1,
        "due_30_days": 0,
        "from_pms": 0,
        "computed": 1,
        "with_inferred_flags": 0,
        "pms_later_than_guideline": 0,
        "active_patients": 2,
        "by_rule": {"default": 1},
    }


def test_export_shape(store: Store, practice: str) -> None:
    store.write_patients(
        practice,
        "csv",
        ReadResult([_patient("1", risk_flags=["diabetic"])], [RejectedRow("l3", "bad", {"x": 1})]),
        None,
    )
    store.write_recalls(practice, [Recall("1", date(2025, 1, 1), "computed", "diabetic", 12)])
    data = store.export_practice(practice)
    assert data["practice_id"] == "p1"
    p = data["patients"][0]
    assert p["phones"] == ["+447700900123"] and p["last_eye_test_date"] == "2024-01-01"
    assert (p["recall_due_date"], p["recall_source"], p["risk_flags"]) == ("2025-01-01", "computed", ["diabetic"])
    assert data["rejected_rows"][0]["reason"] == "bad" and data["rejected_rows"][0]["raw"] == {"x": 1}


def test_a_name_flagged_for_review_is_stored_without_rewriting_unchanged_rows(store: Store, practice: str) -> None:
    flagged = _patient("1", first_name="\u0410nna", name_review="first_name mixes Cyrillic and Latin letters")
    store.write_patients(practice, "csv", ReadResult([flagged, _patient("2")], []), "run-1", full=True)
    by_id = {p.pms_patient_id: p for p in store.load_patients(practice)}
    assert by_id["1"].name_review == flagged.name_review and by_id["2"].name_review is None
    # The flag follows from the name: a source that sends the same name again changes nothing.
    again = store.write_patients(practice, "csv", ReadResult([flagged, _patient("2")], []), "run-2", full=True)
    assert (again.updated, again.unchanged) == (0, 2)


def test_a_recall_batch_removes_only_its_own_patients_recalls(store: Store, practice: str) -> None:
    """A batch (scope and key range) removes the recall of a patient of its own who now has none and
    of one who is inactive (even if a recall was computed for them), and leaves every other
    patient's recall alone, inside its key range or not."""
    store.write_patients(practice, "csv", ReadResult([_patient(str(n)) for n in range(1, 6)], []), None)
    everyone = [Recall(str(n), date(2026, 1, n), "computed", "default", 24) for n in range(1, 6)]
    assert store.write_recalls(practice, everyone) == 5
    with store.begin(practice) as conn:
        conn.execute(text("UPDATE patients SET active = false WHERE practice_id = 'p1' AND pms_patient_id = '3'"))
    batch = [everyone[1], everyone[2]]  # patient 2 unchanged, 3 inactive (computed anyway); 4 now has none
    assert store.write_recalls(practice, batch, scope=["2", "3", "4"], key_range=("2", "4")) == 2
    with store.begin(practice) as conn:
        kept = conn.execute(
            text("SELECT pt.pms_patient_id FROM recalls r JOIN patients pt USING (patient_id) ORDER BY 1")
        ).scalars()
        assert list(kept) == ["1", "2", "5"]


def test_a_recall_batch_looks_up_what_to_remove_with_a_plan_for_its_own_values(store: Store, practice: str) -> None:
    """psycopg prepares a statement once a connection has run it five times, and PostgreSQL may then
    keep one plan for any values: the recall batch's lookup of what to remove must never be prepared
    (a generic plan of its earlier form ran row by row), while the batch's other statements are."""
    store.engine.pool.dispose()  # one session from here on: every batch runs on it
    for n in range(8):
        store.write_recalls(practice, [], scope=[f"P{n}"], key_range=(f"P{n}", f"P{n}"), analyze=False)
    with store.begin(practice) as conn:
        prepared = conn.execute(text("SELECT statement FROM pg_prepared_statements")).scalars().all()
    assert any(s.startswith("INSERT INTO recalls") for s in prepared)  # this session did run them often enough
    assert not any("FROM patients pt WHERE pt.practice_id" in s and "stage_recalls" in s for s in prepared)
