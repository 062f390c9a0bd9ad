""" "Sync Now" as ops press it: a partition launched on the real webserver, run by the real daemon.

`dagster dev -w workspace.yaml` runs against the persistent dagster-postgres instance on the
embedded store, exactly as `nvc dev` starts it: one for the module (starting one costs half a minute);
each test works on practices of its own.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from nvc_pipelines.application import app
from nvc_pipelines.application.instance import ensure_dagster_home, get_instance
from nvc_pipelines.crypto import generate_key
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store.embedded import stop_server
from resources.csv_source import template_text
from tests import services
from tests.conftest import isolated_env

# Tests that start services of their own (a store, sandboxes, `dagster dev`) run one after another on
# one pytest worker (`--dist loadgroup`), the rest of the suite on the other.
pytestmark = pytest.mark.xdist_group("services")


@pytest.fixture(scope="module")
def web_services() -> Iterator[tuple[Path, str, int]]:
    """One NVC_HOME with the embedded store and `dagster dev` on it, for the whole module."""
    home = Path(tempfile.mkdtemp(prefix="nvc-web-"))
    key = generate_key()
    with pytest.MonkeyPatch.context() as mp:
        isolated_env(mp, home, key)
        app.open_store()
        ensure_dagster_home()
        try:
            with services.dagster_dev(home) as port:
                yield home, key, port
        finally:
            stop_server()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def nvc_env(web_services, monkeypatch: pytest.MonkeyPatch) -> Path:
    home, key, _ = web_services
    isolated_env(monkeypatch, home, key)
    return home


@pytest.fixture
def dagster_dev(web_services, nvc_env: Path) -> int:
    return web_services[2]


def test_materialising_a_partition_on_the_webserver_syncs_the_practice(dagster_dev: int, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "export.csv").write_text(template_text(), encoding="utf-8")
    app.connect_practice("web-csv", PmsKind.CSV, "Web CSV", {"path": str(drop)}, {})

    client = DagsterGraphQLClient("127.0.0.1", port_number=dagster_dev)
    run_id = client.submit_job_execution(
        "practice_sync",
        repository_location_name="nvc_pipelines",
        repository_name="__repository__",
        tags={"dagster/partition": "web-csv", "practice": "web-csv", "trigger": "sync_now"},
    )
    deadline = time.monotonic() + 120
    status = client.get_run_status(run_id)
    while status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE) and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_run_status(run_id)
    assert status == DagsterRunStatus.SUCCESS

    exported = app.open_store().export_practice("web-csv")
    assert sorted(p["last_name"] for p in exported["patients"]) == ["Jones", "O'Neill", "O'Neill"]
    instance = get_instance()
    run = instance.get_run_by_id(run_id)
    assert run.tags["dagster/partition"] == "web-csv"
    materialised = {
        e.asset_materialization.asset_key.to_user_string()
        for e in instance.all_logs(run_id)
        if e.is_dagster_event and e.dagster_event.is_step_materialization
    }
    assert materialised == {"patients", "appointments", "clinical_records", "clinicians", "recalls", "call_list"}


def test_a_booking_reaches_the_pms_through_the_daemons_sensor(dagster_dev: int) -> None:
    """The writeback path as it runs in production: outbox row -> sensor tick -> run -> PMS."""
    from datetime import UTC, date, datetime, timedelta

    from nvc_pipelines import writeback
    from sandboxes.optix import OptixSandbox

    with OptixSandbox(practices={"OPX-77": 5}, api_keys={"web-key": "OPX-77"}) as sandbox:
        app.connect_practice(
            "web-optix",
            PmsKind.OPTIX,
            "Web Optix",
            {"practice_id": "OPX-77", "api_url": sandbox.url},
            {"api_key": "web-key"},
        )
        patient = sandbox.patients("OPX-77")[0]
        start = datetime.combine(date.today() + timedelta(days=30), datetime.min.time(), tzinfo=UTC) + timedelta(
            hours=10
        )
        started = time.monotonic()
        writeback.add_booking(app.open_store(), "web-optix", "web-booking-1", f"P{patient.index:07d}", start)
        while time.monotonic() - started < 90:
            if any(a["nvc_reference"] == "web-booking-1" for a in sandbox.nvc_appointments("OPX-77")):
                break
            time.sleep(0.2)
        latency = time.monotonic() - started
        print(f"\noutbox -> Optix sandbox through the daemon: {latency:.1f} s")
        assert [a["nvc_reference"] for a in sandbox.nvc_appointments("OPX-77")] == ["web-booking-1"]
    # Latency is measured by bench/writeback_latency.py, not asserted here.
    rows = writeback.outbox_rows(app.open_store(), "web-optix")
    assert [r["status"] for r in rows] == ["confirmed"]
    runs = get_instance().get_runs()
    assert any(r.tags.get("trigger") == "writeback" and r.tags.get("practice") == "web-optix" for r in runs)


def test_ops_flow_initial_sync_sync_now_alerts_and_sync_log(dagster_dev: int, tmp_path: Path) -> None:
    """Connect -> the initial-sync sensor syncs it; `nvc sync-now` launches through GraphQL; a PMS that
    is down fails three times in a row -> the failure sensor records a critical alert; `nvc sync-log`
    shows all of it from the instance."""
    from click.testing import CliRunner

    from nvc_pipelines.alerts import recent_alerts
    from nvc_pipelines.application.cli import main

    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "export.csv").write_text(template_text(), encoding="utf-8")
    app.connect_practice("ops-csv", PmsKind.CSV, "Ops CSV", {"path": str(drop)}, {})
    store = app.open_store()
    deadline = time.monotonic() + 120
    while store.stream_state("ops-csv", "patients").cursor_at is None and time.monotonic() < deadline:
        if any(p["practice_id"] == "ops-csv" and p["last_sync_at"] for p in store.list_practices()):
            break
        time.sleep(0.5)
    initial = [
        r
        for r in get_instance().get_runs()
        if r.tags.get("trigger") == "initial" and r.tags.get("practice") == "ops-csv"
    ]
    assert len(initial) == 1
    # The export is replaced only once the initial run has ended: its cursor is committed before its
    # later steps run, and a run still going would otherwise be counted among the failures below.
    while not get_instance().get_run_by_id(initial[0].run_id).is_finished:
        assert time.monotonic() < deadline + 600, "the initial sync did not end"
        time.sleep(0.5)
    assert get_instance().get_run_by_id(initial[0].run_id).status == DagsterRunStatus.SUCCESS, [
        e.message
        for e in get_instance().all_logs(initial[0].run_id)
        if e.is_dagster_event and e.dagster_event.is_failure
    ]

    runner = CliRunner()
    url = f"http://127.0.0.1:{dagster_dev}"
    (drop / "export.csv").write_text("first_name,last_name\nA,B\n", encoding="utf-8")  # a broken export
    client = DagsterGraphQLClient("127.0.0.1", port_number=dagster_dev)
    for _ in range(3):
        launched = runner.invoke(main, ["sync-now", "ops-csv", "--url", url])
        assert launched.exit_code == 0, launched.output
        run_id = launched.output.split()[2]
        assert f"{url}/runs/{run_id}" in launched.output
        while client.get_run_status(run_id) not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE):
            assert time.monotonic() < deadline + 600, f"run {run_id} still {client.get_run_status(run_id)}"
            time.sleep(0.5)
        assert client.get_run_status(run_id) == DagsterRunStatus.FAILURE
    # Liveness waits, not timings: generous, so a loaded CI machine is slow rather than red.
    while len(recent_alerts(store, "ops-csv")) < 3 and time.monotonic() < deadline + 600:
        time.sleep(0.5)
    alerts = recent_alerts(store, "ops-csv")
    shown = [(a["run_id"], a["consecutive"], a["message"]) for a in alerts]
    assert [a["severity"] for a in alerts[:1]] == ["critical"] and alerts[0]["consecutive"] == 3, shown
    assert "missing the required column(s)" in alerts[0]["message"]

    log = runner.invoke(main, ["sync-log", "ops-csv"])
    assert log.exit_code == 0, log.output
    assert "trigger=initial" in log.output and "trigger=sync_now" in log.output
    assert "FAILURE" in log.output and "CSV import (practice ops-csv)" in log.output
