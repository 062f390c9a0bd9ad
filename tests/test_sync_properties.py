"""Sync invariants, property-based: a sync is idempotent, and incremental syncs followed by a full
one leave exactly what a fresh full sync would."""

from __future__ import annotations

import itertools
from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from nvc_pipelines.model import Patient, Phone, PhoneType, PmsKind, ReadResult
from nvc_pipelines.store import Store
from nvc_pipelines.store.streams import PATIENTS, VolumeDropRefused
from nvc_pipelines.sync import plan_sync

_ids = itertools.count()

patient_st = st.builds(
    lambda pid, last, test_day, flags, phone: Patient(
        practice_id="",
        pms_patient_id=f"P{pid}",
        first_name="Ann",
        last_name=last,
        phones=[Phone(f"+44770090{phone:04d}", PhoneType.MOBILE)],
        last_eye_test_date=date(2020, 1, 1).fromordinal(date(2020, 1, 1).toordinal() + test_day),
        risk_flags=flags,
    ),
    pid=st.integers(0, 30),
    last=st.sampled_from(["Lee", "Kay", "O'Neill", "Smith-Jones"]),
    test_day=st.integers(0, 1500),
    flags=st.lists(st.sampled_from(["diabetic", "glaucoma_suspect"]), max_size=2, unique=True),
    phone=st.integers(0, 999),
)
population_st = st.lists(patient_st, max_size=25, unique_by=lambda p: p.pms_patient_id)


def _new_practice(store: Store) -> str:
    practice_id = f"prop-{next(_ids)}"
    store.add_practice(practice_id, practice_id, PmsKind.CSV, {}, {})
    return practice_id


def _for(practice_id: str, patients: list[Patient]) -> ReadResult:
    return ReadResult(
        [Patient(**{**{f: getattr(p, f) for f in p.__slots__}, "practice_id": practice_id}) for p in patients]
    )


def snapshot(store: Store, practice_id: str) -> set[tuple]:
    with store.begin_owner() as conn:
        rows = conn.execute(
            text(
                "SELECT pms_patient_id, last_name, phones, last_eye_test_date, risk_flags, active "
                "FROM patients WHERE practice_id = :p"
            ),
            {"p": practice_id},
        )
        return {tuple(tuple(v) if isinstance(v, list) else v for v in r) for r in rows}


FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(population=population_st)
def test_syncing_twice_equals_syncing_once(store: Store, population: list[Patient]) -> None:
    practice_id = _new_practice(store)
    store.write_patients(practice_id, "csv", _for(practice_id, population), None, full=True)
    once = snapshot(store, practice_id)
    counts = store.write_patients(practice_id, "csv", _for(practice_id, population), None, full=True)
    assert snapshot(store, practice_id) == once
    assert (counts.inserted, counts.updated, counts.deactivated) == (0, 0, 0)
    assert len(once) == len(population)  # nobody lost, nobody duplicated


@FAST
@given(initial=population_st, changes=st.lists(population_st, max_size=4), final=population_st)
def test_full_sync_after_incremental_syncs_equals_a_fresh_full_sync(
    store: Store, initial: list[Patient], changes: list[list[Patient]], final: list[Patient]
) -> None:
    practice_id = _new_practice(store)
    store.write_patients(practice_id, "csv", _for(practice_id, initial), None, full=True)
    for batch in changes:
        store.write_patients(practice_id, "csv", _for(practice_id, batch), None, full=False)
    store.write_patients(practice_id, "csv", _for(practice_id, final), None, full=True)

    fresh = _new_practice(store)
    store.write_patients(fresh, "csv", _for(fresh, final), None, full=True)
    active = {r for r in snapshot(store, practice_id) if r[5]}
    assert active == snapshot(store, fresh)


def _patients(practice_id: str, n: int) -> ReadResult:
    return ReadResult(
        [Patient(practice_id, f"P{i}", "Ann", "Lee", [Phone(f"+44770090{i:04d}", PhoneType.MOBILE)]) for i in range(n)]
    )


def test_reconcile_soft_deletes_and_reactivates(store: Store) -> None:
    practice_id = _new_practice(store)
    store.write_patients(practice_id, "csv", _patients(practice_id, 10), None, full=True)
    counts = store.write_patients(practice_id, "csv", _patients(practice_id, 9), None, full=True, max_drop_share=0.2)
    assert counts.deactivated == 1
    assert len(store.load_patients(practice_id)) == 9
    with store.begin_owner() as conn:  # history kept: soft delete only
        assert (
            conn.execute(text("SELECT count(*) FROM patients WHERE practice_id = :p"), {"p": practice_id}).scalar()
            == 10
        )
    back = store.write_patients(practice_id, "csv", _patients(practice_id, 10), None, full=True)
    assert (back.updated, back.deactivated) == (1, 0)


def test_an_empty_extract_never_empties_a_practice(store: Store) -> None:
    practice_id = _new_practice(store)
    store.write_patients(practice_id, "csv", _patients(practice_id, 10), None, full=True)
    before = snapshot(store, practice_id)
    with pytest.raises(VolumeDropRefused, match="10 \\(100%\\) would be marked inactive"):
        store.write_patients(practice_id, "csv", ReadResult([]), None, full=True, max_drop_share=0.2)
    assert snapshot(store, practice_id) == before


def test_cursor_is_committed_only_with_its_data(store: Store) -> None:
    from datetime import UTC, datetime

    practice_id = _new_practice(store)
    first = datetime(2026, 1, 1, tzinfo=UTC)
    store.write_patients(practice_id, "csv", _patients(practice_id, 3), None, full=True, cursor_at=first)
    broken = _patients(practice_id, 3)
    broken.patients[1].first_name = None  # violates NOT NULL mid-COPY: the whole write must roll back
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        store.write_patients(practice_id, "csv", broken, None, cursor_at=datetime(2026, 2, 1, tzinfo=UTC))
    assert store.stream_state(practice_id, PATIENTS.name).cursor_at == first
    plan = plan_sync(first, first, datetime(2026, 1, 2, tzinfo=UTC))
    assert not plan.full and plan.since < first
