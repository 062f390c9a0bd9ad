"""The Dagster wiring, with Dagster's own test utilities, against the real store."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from dagster import AssetKey, DagsterInstance, build_schedule_context, instance_for_test, materialize
from sqlalchemy import text

from assets.sync import appointments, call_list, clinical_records, patients, recalls
from nvc_pipelines.definitions import defs
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store import Store
from resources.csv_source import template_text
from resources.deployment import pms_gateway
from resources.store import StoreResource
from schedules.nightly import nightly_pms_sync

ALL = [patients, appointments, clinical_records, recalls, call_list]


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


def _resources(database_url: str) -> dict:
    return {
        "store": StoreResource(database_url=database_url),
        "pms": pms_gateway(),
    }


def _meta(result, asset: str) -> dict:
    mats = [m for m in result.asset_materializations_for_node(asset)]
    return {k: v.value for k, v in mats[0].metadata.items()}


def test_definitions_hold_the_assets_job_and_schedule() -> None:
    job = defs.resolve_job_def("practice_sync")
    assert job.partitions_def is not None and job.partitions_def.name == "practices"
    schedule = defs.resolve_schedule_def("nightly_pms_sync")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 2 * * *", "Europe/London")
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"patients", "appointments", "clinical_records", "recalls", "call_list"} <= keys


def test_nightly_schedule_requests_batches_of_one_pms(
    instance: DagsterInstance, store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_practice("alpha", "Alpha", PmsKind.CSV, {"path": "/drop/alpha"}, {})
    store.add_practice("beta", "Beta", PmsKind.OPTIX, {"practice_id": "OPX-1"}, {"api_key": "k"})
    store.add_practice("gamma", "Gamma", PmsKind.OPTIX, {"practice_id": "OPX-2"}, {"api_key": "k"})
    store.add_practice("delta", "Delta", PmsKind.OPTIX, {"practice_id": "OPX-3"}, {"api_key": "k"})
    instance.add_dynamic_partitions("practices", ["alpha", "beta", "gamma", "delta"])
    monkeypatch.setenv("NVC_SYNC_BATCH_SIZE", "2")
    when = datetime(2026, 7, 1, 2, 0, tzinfo=ZoneInfo("Europe/London"))  # BST: 01:00 UTC
    context = build_schedule_context(
        instance=instance, scheduled_execution_time=when, resources={"store": StoreResource(database_url=database_url)}
    )
    requests = list(nightly_pms_sync(context))
    assert [(r.run_key, r.run_config["ops"]["sync_practices"]["config"]["practices"]) for r in requests] == [
        ("nightly:csv:2026-07-01:0", ["alpha"]),
        ("nightly:optix:2026-07-01:1", ["beta", "delta"]),
        ("nightly:optix:2026-07-01:2", ["gamma"]),
    ]
    assert [(r.tags["trigger"], r.tags["pms"]) for r in requests] == [
        ("schedule", "csv"),
        ("schedule", "optix"),
        ("schedule", "optix"),
    ]


def test_a_batch_with_one_pms_down_syncs_the_others_and_fails_only_that_partition(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import DagsterRunStatus, RunsFilter

    import schedules.jobs
    from resources.deployment import shared_resources
    from resources.optix import OptixResource

    monkeypatch.setenv("NVC_RETRY_BASE_SECONDS", "0")

    # The deployment's resources, with the Optix client's own retries quick (two tries, 10 ms apart):
    # the down PMS still fails each stream's step and its step retries, in seconds instead of 100.
    def quick_resources() -> dict:
        resources = shared_resources()
        resources["pms"] = resources["pms"].model_copy(
            update={"optix": OptixResource(max_attempts=2, backoff_seconds=0.01)}
        )
        return resources

    monkeypatch.setattr(schedules.jobs, "shared_resources", quick_resources)
    for name in ("ok-1", "ok-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "export.csv").write_text(template_text(), encoding="utf-8")
        store.add_practice(name, name, PmsKind.CSV, {"path": str(tmp_path / name)}, {})
    store.add_practice("down", "Down", PmsKind.OPTIX, {"practice_id": "OPX-9", "api_url": "http://127.0.0.1:9"},
                       {"api_key": "k"})  # fmt: skip
    instance.add_dynamic_partitions("practices", ["ok-1", "down", "ok-2"])
    batch = defs.resolve_job_def("practice_sync_batch").execute_in_process(
        run_config={"ops": {"sync_practices": {"config": {"practices": ["ok-1", "down", "ok-2"]}}}},
        instance=instance,
        tags={"pms": "mixed", "trigger": "schedule"},
    )
    assert batch.success  # the batch itself goes on; the failure is the practice's own
    runs = {
        r.tags["dagster/partition"]: r
        for r in instance.get_runs(filters=RunsFilter(job_name="practice_sync", tags={"nvc/batch": batch.run_id}))
    }
    assert {p: r.status for p, r in runs.items()} == {
        "ok-1": DagsterRunStatus.SUCCESS,
        "down": DagsterRunStatus.FAILURE,
        "ok-2": DagsterRunStatus.SUCCESS,
    }
    assert all(
        r.tags["trigger"] == "schedule" and "pms" not in r.tags for r in runs.values()
    )  # one PMS slot: the batch's
    listed = {r.partition_key for r in instance.fetch_materializations(AssetKey("call_list"), limit=10).records}
    assert listed == {"ok-1", "ok-2"}  # each practice's materialisations are its partition's
    assert "down" not in {
        r.partition_key for r in instance.fetch_materializations(AssetKey("patients"), limit=10).records
    }
    assert {p["practice_id"] for p in store.list_practices() if p["last_sync_at"]} == {"ok-1", "ok-2"}


@pytest.mark.parametrize("interactive", [False, True])
def test_a_down_pms_is_retried_patiently_by_schedule_and_fails_fast_from_a_shell(
    database_url: str, store: Store, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch, interactive: bool
) -> None:
    """The nightly's step retries stay (a PMS briefly down gets two more tries); a sync someone waits
    for at a shell (`nvc sync`, tagged nvc/interactive) tries twice per request and no step again."""
    from assets.sync import INTERACTIVE_TAG
    from nvc_pipelines.retry import STEP_RETRIES
    from resources.acuitas import AcuitasResource
    from resources.csv_source import CsvResource
    from resources.gateway import PmsGateway
    from resources.optisoft import OptisoftResource
    from resources.optix import OptixResource
    from resources.sycle import SycleResource

    monkeypatch.setenv("NVC_RETRY_BASE_SECONDS", "0")
    store.add_practice("down", "Down", PmsKind.OPTIX, {"practice_id": "OPX-9", "api_url": "http://127.0.0.1:9"},
                       {"api_key": "k"})  # fmt: skip
    instance.add_dynamic_partitions("practices", ["down"])
    gateway = PmsGateway(csv=CsvResource(), optix=OptixResource(backoff_seconds=0.01), acuitas=AcuitasResource(),
                         optisoft=OptisoftResource(), sycle=SycleResource())  # fmt: skip
    tags = {"trigger": "sync_now", INTERACTIVE_TAG: "true"} if interactive else {"trigger": "schedule"}
    result = materialize([patients], partition_key="down", instance=instance, tags=tags, raise_on_error=False,
                         resources={"store": StoreResource(database_url=database_url), "pms": gateway})  # fmt: skip
    assert not result.success
    retries = [e for e in result.all_events if e.is_step_up_for_retry and e.step_key == "patients"]
    assert len(retries) == (0 if interactive else STEP_RETRIES)
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    meta = {k: v.value for k, v in failure.step_failure_data.user_failure_data.metadata.items()}
    assert (meta["problem"], meta["attempts"]) == ("unreachable", 1 if interactive else 1 + STEP_RETRIES)


def test_csv_practice_materialises_patients_then_recalls(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path
) -> None:
    (tmp_path / "export.csv").write_text(template_text() + "Bad,Row,,01/01/2024,,,\n", encoding="utf-8")
    store.add_practice("csv-a", "CSV A", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["csv-a"])

    first = materialize(ALL, partition_key="csv-a", instance=instance, resources=_resources(database_url))
    assert first.success
    meta = _meta(first, "patients")
    assert (meta["rows_read"], meta["inserted"], meta["updated"], meta["rejected"]) == (4, 3, 0, 1)
    assert meta["rows_read"] == meta["inserted"] + meta["updated"] + meta["unchanged"] + meta["rejected"]
    rec = _meta(first, "recalls")
    assert rec["recalls"] == 3 and rec["by_rule"] == {"default": 1, "diabetic": 1, "under_16": 1}
    calls = _meta(first, "call_list")
    assert calls["people_listed"] == calls["due_or_overdue"] == 3  # every test was long enough ago
    assert calls["entries"] == calls["households"] + 1 == 2  # the O'Neills share a landline: one call
    assert [c["last_name"] for c in store.call_list("csv-a")] == ["Jones", "O'Neill", "O'Neill"]  # most overdue first
    assert {c["ask_for"] for c in store.call_list("csv-a") if c["first_name"] == "Alfie"} == {"Tom O'Neill"}

    again = materialize(ALL, partition_key="csv-a", instance=instance, resources=_resources(database_url))
    meta = _meta(again, "patients")
    assert (meta["inserted"], meta["updated"], meta["unchanged"]) == (0, 0, 3)
    assert _meta(again, "recalls")["changed"] == 0


def test_refused_file_fails_the_run_with_a_clear_message_and_keeps_the_store(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path
) -> None:
    (tmp_path / "export.csv").write_text(template_text(), encoding="utf-8")
    store.add_practice("csv-b", "CSV B", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["csv-b"])
    assert materialize([patients], partition_key="csv-b", instance=instance, resources=_resources(database_url)).success
    before = store.export_practice("csv-b")

    (tmp_path / "export.csv").write_text("first_name,last_name\nA,B\n", encoding="utf-8")
    result = materialize(
        [patients], partition_key="csv-b", instance=instance, resources=_resources(database_url), raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    description = failure.step_failure_data.user_failure_data.description
    assert "missing the required column(s) phone_number, last_eye_test_date" in description
    assert store.export_practice("csv-b") == before


def test_consecutive_failures_count_back_from_the_failed_run(instance: DagsterInstance) -> None:
    """The failure sensor may see a run's failure before its stored status says FAILURE, and a newer
    run may already be going: the count starts at the failed run and goes back, never from the newest."""
    from types import SimpleNamespace

    from dagster import DagsterRun, DagsterRunStatus

    from schedules.ops import _consecutive_failures

    def run(run_id: str, status: DagsterRunStatus) -> DagsterRun:
        return instance.add_run(
            DagsterRun(job_name="practice_sync", run_id=run_id, status=status, tags={"dagster/partition": "p"})
        )

    run("r0", DagsterRunStatus.SUCCESS)
    run("r1", DagsterRunStatus.FAILURE)
    run("r2", DagsterRunStatus.FAILURE)
    third = run("r3", DagsterRunStatus.STARTED)  # its failure event is in, its status not yet
    run("r4", DagsterRunStatus.STARTED)  # a newer run already under way
    context = SimpleNamespace(instance=instance, dagster_run=third)
    assert _consecutive_failures(context, "p") == 3
    assert _consecutive_failures(SimpleNamespace(instance=instance, dagster_run=instance.get_run_by_id("r1")), "p") == 1


def test_assets_carry_references_to_their_source() -> None:
    from nvc_pipelines.definitions import defs

    for key in ("patients", "call_list", "recalls"):
        spec = defs.get_assets_def(key).specs_by_key[AssetKey(key)]
        refs = spec.metadata["dagster/code_references"].code_references
        assert refs and refs[0].file_path.endswith("assets/sync.py") and refs[0].line_number > 0


def test_a_file_refused_after_pages_were_written_leaves_the_store_as_it_was(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CSV is staged a page at a time, but a quote never closed near its end refuses it whole: the
    pages already staged are rolled back with it, never half-imported."""
    from resources import csv_source

    monkeypatch.setattr(csv_source, "PAGE_ROWS", 2)
    (tmp_path / "export.csv").write_text(template_text(), encoding="utf-8")
    store.add_practice("csv-c", "CSV C", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["csv-c"])
    assert materialize([patients], partition_key="csv-c", instance=instance, resources=_resources(database_url)).success
    before = store.export_practice("csv-c")

    header = template_text().splitlines()[0]
    rows = [f"P{n},Lee,07700 9001{n:02d},15/01/2024,,,,,,,,,," for n in range(7)] + ['Z,"never closed,,,,']
    (tmp_path / "export.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    result = materialize(
        [patients], partition_key="csv-c", instance=instance, resources=_resources(database_url), raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "line 9 opens a quoted value" in failure.step_failure_data.user_failure_data.description
    assert store.export_practice("csv-c") == before


def test_a_patient_repeated_on_a_later_page_of_a_file_stays_as_its_first_row(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is one snapshot: a patient's second row, valid or not, on a later page is rejected with
    its reason, and the first row stands (a PMS read would take a later page's copy as an edit)."""
    from resources import csv_source

    monkeypatch.setattr(csv_source, "PAGE_ROWS", 2)
    header = template_text().splitlines()[0]
    rows = [f"P{n},Lee,07700 9001{n:02d},15/01/2024,,,,,,,P{n},,," for n in range(5)]
    rows += ["P0,Lee,07700 900100,15/01/2024,,,,,,,P0,,,", "P1,Lee,07700 900101,not a date,,,,,,,P1,,,"]
    (tmp_path / "export.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    store.add_practice("csv-d", "CSV D", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["csv-d"])
    result = materialize([patients], partition_key="csv-d", instance=instance, resources=_resources(database_url))
    assert result.success
    meta = _meta(result, "patients")
    assert (meta["rows_read"], meta["inserted"], meta["rejected"]) == (7, 5, 2)
    assert [p.pms_patient_id for p in store.load_patients("csv-d")] == ["P0", "P1", "P2", "P3", "P4"]
    with store.begin("csv-d") as conn:
        reasons = conn.execute(
            text("SELECT row_ref, reason FROM rejected_rows WHERE practice_id = 'csv-d' ORDER BY row_ref")
        ).all()
    assert [r.row_ref for r in reasons] == ["export.csv:line 7", "export.csv:line 8"]
    assert reasons[0].reason == "duplicate of export.csv:line 2 (same patient)"


def test_two_rows_without_ids_matched_onto_one_patient_keep_the_second_with_its_line(
    database_url: str, store: Store, instance: DagsterInstance, tmp_path: Path
) -> None:
    """Rows without a PMS id are matched to stored patients after normalising: two rows of one file
    that both match the stored Ann (written differently) are a duplicate, and the second is kept in
    quarantine with its own line, its values and the line it repeats."""
    header = "first_name,last_name,phone_number,last_eye_test_date"
    store.add_practice("csv-m", "CSV M", PmsKind.CSV, {"path": str(tmp_path)}, {})
    instance.add_dynamic_partitions("practices", ["csv-m"])
    export = tmp_path / "export.csv"
    export.write_text(f"{header}\nAnn,Lee,01632 960001,15/01/2024\n", encoding="utf-8")
    assert materialize([patients], partition_key="csv-m", instance=instance, resources=_resources(database_url)).success
    export.write_text(
        f"{header}\nAnn,Lee,07700 900555; 01632 960001,15/01/2024\nANN,LEE,01632 960001,15/01/2024\n",
        encoding="utf-8",
    )
    result = materialize([patients], partition_key="csv-m", instance=instance, resources=_resources(database_url))
    assert result.success
    meta = _meta(result, "patients")
    assert (meta["rows_read"], meta["rejected"], meta["inserted"]) == (2, 1, 0)
    with store.begin("csv-m") as conn:
        (row,) = conn.execute(text("SELECT row_ref, reason, raw FROM rejected_rows WHERE practice_id = 'csv-m'")).all()
    assert (row.row_ref, row.reason) == ("export.csv:line 3", "duplicate of export.csv:line 2 (same patient)")
    assert (row.raw["first_name"], row.raw["phone_number"]) == ("ANN", "01632 960001")
