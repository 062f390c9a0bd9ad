"""Recalls after an incremental sync: only patients whose data changed are recomputed, and the
result is exactly what a full recomputation gives."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test, materialize
from sqlalchemy import text

from assets.sync import FULL_SYNC_TAG, appointments, call_list, clinical_records, patients, recalls
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store import Store
from resources.deployment import pms_gateway
from resources.store import StoreResource

ALL = [patients, appointments, clinical_records, recalls, call_list]
HEADER = (
    "first_name,last_name,phone_number,last_eye_test_date,risk_category,last_clinical_test_date,"
    "clinical_condition_notes\n"
)
ROWS = {
    "Ann": "Ann,Lee,07700 900001,01/03/2024,,,\n",
    "Bob": "Bob,Kay,07700 900002,01/03/2024,diabetic,,\n",
    "Cat": "Cat,Roe,07700 900003,15/06/2023,,,\n",
    "Dan": "Dan,Fry,07700 900004,15/06/2023,,,\n",
    "Eve": "Eve,Orr,07700 900005,10/10/2024,,,\n",
    "Fay": "Fay,Ash,07700 900006,10/10/2024,,,\n",
    "Gus": "Gus,Ng,07700 900007,10/10/2024,,,\n",
}


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


def _write(folder: Path, rows: dict[str, str]) -> None:
    (folder / "export.csv").write_text(HEADER + "".join(rows.values()), encoding="utf-8")


def _sync(instance: DagsterInstance, database_url: str, tags: dict[str, str] | None = None) -> dict:
    result = materialize(
        ALL,
        partition_key="inc",
        instance=instance,
        resources={"store": StoreResource(database_url=database_url), "pms": pms_gateway()},
        tags=tags,
    )
    assert result.success
    mat = result.asset_materializations_for_node("recalls")[0]
    return {k: v.value for k, v in mat.metadata.items()}


def _recalls(store: Store) -> dict[str, tuple]:
    with store.begin_owner() as conn:
        rows = conn.execute(
            text(
                "SELECT pt.first_name, r.due_date, r.rule, r.reason FROM recalls r "
                "JOIN patients pt USING (patient_id) WHERE r.practice_id = 'inc'"
            )
        )
        return {row.first_name: (row.due_date, row.rule, row.reason) for row in rows}


def test_only_changed_patients_are_recomputed_and_the_result_equals_a_full_recompute(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path
) -> None:
    _write(tmp_path, ROWS)
    store.add_practice("inc", "Incremental", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["inc"])

    first = _sync(instance, database_url)
    assert (first["mode"], first["recomputed"], first["recalls"]) == ("full", 7, 7)

    unchanged = _sync(instance, database_url)
    assert (unchanged["mode"], unchanged["recomputed"], unchanged["changed"]) == ("incremental", 0, 0)
    assert unchanged["recalls"] == unchanged["patients"] == 7  # totals are the practice's, not the run's

    # Ann had a test recently, Bob is no longer diabetic, Gus left the practice.
    rows = dict(ROWS)
    rows["Ann"] = "Ann,Lee,07700 900001,01/11/2026,,,\n"
    rows["Bob"] = "Bob,Kay,07700 900002,01/03/2024,,,\n"
    del rows["Gus"]
    _write(tmp_path, rows)
    before = _recalls(store)
    after_change = _sync(instance, database_url)
    assert after_change["mode"] == "incremental"
    assert after_change["recomputed"] == 2  # Ann and Bob; Gus is inactive now, so only removed
    assert after_change["changed"] == 3
    now = _recalls(store)
    assert set(now) == set(before) - {"Gus"}
    assert now["Ann"][0] == date(2028, 11, 1) and now["Bob"][1] == "default"
    assert {k: v for k, v in now.items() if k not in ("Ann", "Bob")} == {
        k: v for k, v in before.items() if k not in ("Ann", "Bob", "Gus")
    }

    # A full recomputation finds nothing the incremental one missed.
    full = _sync(instance, database_url, tags={FULL_SYNC_TAG: "true"})
    assert (full["mode"], full["recomputed"], full["changed"]) == ("full", 6, 0)
    assert _recalls(store) == now


def test_changed_recall_rules_recompute_every_patient(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path
) -> None:
    _write(tmp_path, ROWS)
    store.add_practice("inc", "Incremental", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["inc"])
    _sync(instance, database_url)

    store.add_practice(
        "inc", "Incremental", PmsKind.CSV, {"path": str(tmp_path), "recall_interval.default": "18"}, {}, replace=True
    )
    meta = _sync(instance, database_url)
    assert (meta["mode"], meta["recomputed"]) == ("full", 7)
    assert meta["changed"] == 6  # everyone on the default rule moved; Bob (diabetic, 12 months) did not
    assert _recalls(store)["Ann"][0] == date(2025, 9, 1)


def test_a_change_committed_while_recalls_are_computed_is_not_lost(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path
) -> None:
    """A recall pass takes a patient off the queue only with the stamp it read; a sync that commits in
    between stamps them anew and leaves them due, so the next run recomputes it (no clock, no
    overlap window)."""
    _write(tmp_path, ROWS)
    store.add_practice("inc", "Incremental", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["inc"])
    _sync(instance, database_url)
    assert store.recall_targets("inc", everyone=False) == {}

    with store.begin_owner() as conn:  # a sync changes Cat's clinical records
        conn.execute(text("UPDATE patients SET change_seq = change_seq + 1 WHERE first_name = 'Cat'"))
    targets = store.recall_targets("inc", everyone=False)
    assert list(targets) == [pid for (pid,) in _ids(store, "Cat")]
    with store.begin_owner() as conn:  # ... and another sync changes her again before the recall is written
        conn.execute(text("UPDATE patients SET change_seq = change_seq + 1 WHERE first_name = 'Cat'"))
    store.write_recalls("inc", [], scope=targets.keys(), seen=targets)
    assert store.recall_targets("inc", everyone=False).keys() == targets.keys()  # still due
    assert _sync(instance, database_url)["recomputed"] == 1
    assert store.recall_targets("inc", everyone=False) == {}


def _ids(store: Store, first_name: str) -> list[tuple[str]]:
    with store.begin_owner() as conn:
        return conn.execute(
            text("SELECT pms_patient_id FROM patients WHERE practice_id = 'inc' AND first_name = :n"), {"n": first_name}
        ).all()
