"""The nightly's checks validate what changed, and still hold the whole practice to its invariants."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dagster import instance_for_test
from sqlalchemy import text

from nvc_pipelines.application import demo
from nvc_pipelines.definitions import defs
from nvc_pipelines.store import Store


@pytest.fixture(scope="module")
def sandboxes() -> Iterator[dict[str, Any]]:
    started = demo.start_sandboxes(0, patients=60)
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def _checks(result) -> dict[str, Any]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_a_changed_only_nightly_check_still_catches_a_whole_practice_violation(
    database_url: str, store: Store, sandboxes: dict[str, Any]
) -> None:
    practice_id, kind, name, settings, secrets = next(
        c for c in demo.demo_connections(sandboxes) if c[0] == "demo-optix"
    )
    store.add_practice(practice_id, name, kind, settings, secrets)
    job = defs.resolve_job_def("practice_sync")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", [practice_id])
        first = _checks(job.execute_in_process(partition_key=practice_id, instance=instance))
        assert first["patients_are_valid"].metadata["scope"].value == "every row"
        assert all(c.passed for c in first.values())

        # 2 patients change in the PMS (chosen at random: the ones edited below must not be among
        # them, or the nightly's read would put them right again).
        touched = sandboxes["optix"].touch(demo.DEMO_OPTIX_PRACTICE, 2)
        # Out of band (no row's updated_at moves): a patient leaves without their recall going, and
        # the practice now asks that almost everyone be callable, with two patients' numbers gone.
        with store.begin_owner() as conn:
            ids = conn.execute(
                text(
                    "SELECT pt.pms_patient_id FROM patients pt JOIN recalls r USING (patient_id) "
                    "WHERE pt.practice_id = :p AND pt.active AND NOT pt.pms_patient_id = ANY(:touched) "
                    "ORDER BY 1 LIMIT 3"
                ),
                {"p": practice_id, "touched": touched},
            ).scalars()
            gone, *blank = list(ids)
            conn.execute(
                text("UPDATE patients SET active = false WHERE practice_id = :p AND pms_patient_id = :ref"),
                {"p": practice_id, "ref": gone},
            )
            conn.execute(
                text("UPDATE patients SET phones = '{}' WHERE practice_id = :p AND pms_patient_id = ANY(:refs)"),
                {"p": practice_id, "refs": blank},
            )
            conn.execute(
                text("UPDATE practices SET settings = settings || '{\"min_callable_share\": \"0.999\"}' "
                     "WHERE practice_id = :p"),
                {"p": practice_id},
            )  # fmt: skip
        nightly = _checks(job.execute_in_process(partition_key=practice_id, instance=instance, raise_on_error=False))

    patients = nightly["patients_are_valid"]
    assert patients.metadata["scope"].value.startswith("changed rows")
    assert patients.metadata["rows"].value < patients.metadata["practice_rows"].value  # only what changed
    assert not patients.passed and patients.metadata["failures"].value["callable_share"] >= 2
    recalls = nightly["recalls_are_valid"]
    assert recalls.metadata["scope"].value.startswith("changed rows")
    assert not recalls.passed and recalls.metadata["failures"].value == {"patient_active": 1}
