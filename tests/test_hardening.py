"""Hardening against the real PostgreSQL: a killed client's query is ended by the server, and a stuck
statement is cancelled with an error naming its bound. (Full re-syncs in linear time are timed by
`bench/resync.py`, at a size no test can afford; `tests/test_streaming.py` counts the stage's scans.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from nvc_pipelines.store import Store, StoreUnavailable


def _running(store: Store, marker: str) -> list[int]:
    with store.begin() as conn:
        return list(
            conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE query LIKE :q AND pid <> pg_backend_pid()"),
                {"q": f"%{marker}%"},
            ).scalars()
        )


def test_a_killed_clients_query_does_not_keep_running(store: Store, database_url: str) -> None:
    marker = "nvc_killed_client_probe"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from sqlalchemy import text; from nvc_pipelines.store import Store; s = Store.open(); "
            f"c = s.engine.connect(); c.execute(text('SELECT pg_sleep(600) /* {marker} */'))",
        ],
        env={**os.environ, "NVC_DATABASE_URL": database_url},
    )
    try:
        for _ in range(300):  # up to 30 s for the child to start and send its query
            if _running(store, marker):
                break
            time.sleep(0.1)
        assert _running(store, marker), "the child's query never started"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The server notices the dead client within its check interval (5 s); without the check the
    # query would run its full 600 s. Wait up to 60 s (a loaded machine), no timing is asserted.
    for _ in range(600):
        if not _running(store, marker):
            break
        time.sleep(0.1)
    assert not _running(store, marker), "the killed client's query is still running"


def test_a_stuck_statement_is_cancelled_with_an_error_naming_its_bound(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NVC_STATEMENT_TIMEOUT_SECONDS", "1")
    url = make_url(database_url).update_query_dict({"application_name": "timeout_probe"})
    store = Store.open(url)  # a URL of its own: a new engine, which reads the setting
    with pytest.raises(StoreUnavailable) as info, store.begin() as conn:
        conn.execute(text("SELECT pg_sleep(5)"))
    assert "NVC_STATEMENT_TIMEOUT_SECONDS (1 s)" in str(info.value) and "nothing of it was written" in str(info.value)


def test_a_stuck_statement_on_a_raw_cursor_names_its_bound_too(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bulk writes (the stream's COPY and merge, recalls, the call list) run on the psycopg cursor
    under the transaction: their timeout names the bound as well, not only PostgreSQL's words."""
    from nvc_pipelines.store.db import driver

    monkeypatch.setenv("NVC_STATEMENT_TIMEOUT_SECONDS", "1")
    url = make_url(database_url).update_query_dict({"application_name": "timeout_probe_raw"})
    store = Store.open(url)
    with pytest.raises(StoreUnavailable) as info, store.begin() as conn, driver(conn).cursor() as cur:
        cur.execute("SELECT pg_sleep(5)")
    assert "NVC_STATEMENT_TIMEOUT_SECONDS (1 s)" in str(info.value) and "nothing of it was written" in str(info.value)


def test_a_killed_sync_ends_as_failed_not_started(store: Store, database_url: str) -> None:
    """`nvc sync` killed mid-run (kill -9): its run is reported failed with the reason, by the same
    reaper the daemon's `dead_run_sensor` and `nvc sync-log` run."""
    from click.testing import CliRunner
    from dagster import DagsterRunStatus, RunsFilter

    from nvc_pipelines.application import app
    from nvc_pipelines.application.cli import main
    from nvc_pipelines.application.instance import ensure_dagster_home, get_instance
    from nvc_pipelines.model import PmsKind
    from sandboxes.optix import OptixSandbox
    from schedules.runs import _pids, reap_dead_runs

    with OptixSandbox(practices={"OPX-9": 20}, api_keys={"k9": "OPX-9"}) as sandbox:
        app.connect_practice("killed", PmsKind.OPTIX, "Killed", {"practice_id": "OPX-9", "api_url": sandbox.url},
                             {"api_key": "k9"})  # fmt: skip
        ensure_dagster_home()
        sandbox.faults.latency_seconds = 30  # every PMS call hangs: the run is mid-sync when killed
        nvc = os.path.join(os.path.dirname(sys.executable), "nvc")
        child = subprocess.Popen([nvc, "sync", "killed"], env=os.environ.copy(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
        instance = get_instance()
        try:
            started = []
            for _ in range(600):  # up to 60 s for the run to start
                started = instance.get_runs(
                    RunsFilter(tags={"practice": "killed"}, statuses=[DagsterRunStatus.STARTED])
                )
                if started:
                    break
                time.sleep(0.1)
            assert started, "the sync's run never started"
            for _ in range(600):  # and far enough to have recorded its process (a run killed before that
                if _pids(instance, started[0].run_id):  # cannot be told apart from one about to start)
                    break
                time.sleep(0.1)
            assert reap_dead_runs(instance) == []  # alive: left alone
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            sandbox.faults.latency_seconds = 0
    assert reap_dead_runs(instance) == [started[0].run_id]
    run = instance.get_run_by_id(started[0].run_id)
    assert run.status == DagsterRunStatus.FAILURE
    log = CliRunner().invoke(main, ["sync-log", "killed"])
    assert "FAILURE" in log.output and "is no longer running" in log.output, log.output


def test_the_daemons_sensor_ends_a_run_whose_process_died_as_failed() -> None:
    """Under `dagster dev` the daemon runs `dead_run_sensor` (on by default, in the code location's
    definitions): a STARTED run whose recorded process is alive is left alone; once that process is
    killed with SIGKILL, the next tick reports the run failed, naming the process."""
    from dagster import DagsterRunStatus, DefaultSensorStatus, build_sensor_context, instance_for_test, job, op
    from dagster._core.events import EngineEventData

    from nvc_pipelines.definitions import defs

    @op
    def work() -> None:
        pass

    @job
    def worker() -> None:
        work()

    sensor = defs.resolve_sensor_def("dead_run_sensor")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with instance_for_test() as instance:
            run = instance.create_run_for_job(worker, status=DagsterRunStatus.STARTED)
            # What a launched run worker records first (`dagster api execute_run`).
            instance.report_engine_event(
                f"Started process for run (pid: {process.pid}).", run, EngineEventData.in_process(process.pid)
            )
            sensor(build_sensor_context(instance=instance))
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED  # alive: left alone
            process.send_signal(signal.SIGKILL)
            process.wait()
            result = sensor(build_sensor_context(instance=instance))
            assert run.run_id in str(result.skip_message)
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
            failure = instance.all_logs(run.run_id)[-1]
            assert f"pid {process.pid}" in failure.message and "is no longer running" in failure.message
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
