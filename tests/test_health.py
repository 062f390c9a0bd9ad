"""Sync health per practice: the read side goes stale when the last successful sync is older than the
nightly allows, the write side when a writeback has waited too long; `nvc practice list` shows both,
and the sensor records a change once, not every tick."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from click.testing import CliRunner
from sqlalchemy import event, text

from nvc_pipelines import health, writeback
from nvc_pipelines.application.cli import main
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store import Store
from schedules.health import health_events


def _practice(store: Store, practice_id: str, synced_hours_ago: float | None) -> None:
    store.add_practice(practice_id, practice_id, PmsKind.CSV, {"path": "/nonexistent"}, {})
    if synced_hours_ago is not None:
        with store.begin_owner() as conn:
            conn.execute(
                text("UPDATE practices SET last_sync_at = now() - make_interval(secs => :s) WHERE practice_id = :p"),
                {"s": synced_hours_ago * 3600, "p": practice_id},
            )


def test_read_and_write_health_in_practice_list_and_sensor_events(store: Store) -> None:
    _practice(store, "fresh", 2)
    _practice(store, "stale", 30)
    _practice(store, "never", None)
    start = datetime.now(UTC) + timedelta(days=3)
    writeback.add_booking(store, "fresh", "h-1", "P1", start)
    with store.begin_owner() as conn:  # the booking has waited 20 minutes: deliveries fail or stopped
        conn.execute(text("UPDATE outbox SET created_at = now() - interval '20 minutes'"))

    states = {s.practice_id: s for s in health.fleet_health(store)}
    assert (states["fresh"].read_ok, states["fresh"].write_ok) == (True, False)
    assert "oldest writeback waiting 20 min, over the 15 min allowed" in states["fresh"].write_detail
    assert (states["stale"].read_ok, states["stale"].write_ok) == (False, True)
    assert states["stale"].read_detail == "last successful sync 30 h ago, over the 26 h the nightly schedule allows"
    assert (states["never"].read_ok, states["never"].read_detail) == (False, "never synced successfully")

    with store.begin_owner() as conn:  # and one of the stale practice's bookings was refused outright
        conn.execute(
            text(
                "INSERT INTO outbox (practice_id, kind, idempotency_key, pms_patient_id, payload, status, finished_at) "
                "VALUES ('stale', 'booking', 's-1', 'P1', '{}', 'dead_letter', now())"
            )
        )
    listing = CliRunner().invoke(main, ["practice", "list"])
    assert listing.exit_code == 0, listing.output
    lines = {line.split()[0]: line for line in listing.output.splitlines() if line and not line.startswith(" ")}
    assert lines["fresh"].split()[-2:] == ["ok", "WAITING"]
    assert lines["stale"].split()[-2:] == ["STALE", "ACTION"]
    assert "stale: last successful sync 30 h ago" in listing.output
    assert "stale: 1 writeback(s) did not land and need action (`nvc outbox stale --needs-action`)" in listing.output

    # The sensor records each practice's state the first time and then only when it changes.
    events, cursor = health_events(list(states.values()), None)
    assert len(events) == 6 and {e.partition for e in events} == {"fresh", "stale", "never"}
    failed = {(e.partition, e.check_name) for e in events if not e.passed}
    assert failed == {
        ("fresh", "writebacks_not_waiting"),
        ("stale", "patients_are_fresh"),
        ("never", "patients_are_fresh"),
    }
    again, same = health_events(list(states.values()), cursor)
    assert again == [] and same == cursor
    with store.begin_owner() as conn:
        conn.execute(text("UPDATE outbox SET status = 'confirmed'"))
    recovered, _ = health_events(health.fleet_health(store), cursor)
    assert [(e.partition, e.check_name, e.passed) for e in recovered] == [
        ("fresh", "patients_are_fresh", True),
        ("fresh", "writebacks_not_waiting", True),
    ]


def test_the_sensor_launches_a_run_that_records_a_change_in_the_partitions_checks(store: Store) -> None:
    from dagster import AssetCheckKey, AssetKey, DagsterInstance, RunRequest, build_sensor_context

    from resources.store import StoreResource
    from schedules.health import sync_health_job, sync_health_sensor

    _practice(store, "stale", 30)
    with DagsterInstance.ephemeral() as instance:
        context = build_sensor_context(instance=instance, resources={"store": StoreResource()})
        request = sync_health_sensor(context)
        assert isinstance(request, RunRequest)
        result = sync_health_job.execute_in_process(run_config=request.run_config, instance=instance)
        assert result.success
        (record,) = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey("patients"), "patients_are_fresh"), limit=5
        )
        evaluation = record.event.dagster_event.event_specific_data
        assert (record.partition, evaluation.passed) == ("stale", False)
        assert "over the 26 h" in evaluation.description
        # Nothing changed since: the next tick launches nothing.
        again = sync_health_sensor(build_sensor_context(instance=instance, cursor=context.cursor,
                                                        resources={"store": StoreResource()}))  # fmt: skip
        assert not isinstance(again, RunRequest)


def test_fleet_health_reads_the_fleet_in_a_fixed_number_of_statements(store: Store) -> None:
    """The sensor judges every practice every 5 minutes: two reads whatever the fleet's size (it was
    two statements a practice), and each practice's waiting and needing-action writebacks still counted."""
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    def reads() -> int:
        statements.clear()
        states = health.fleet_health(store)
        assert len(states) == len({s.practice_id for s in states})
        return len(statements)

    for n in range(2):
        _practice(store, f"small-{n}", 1)
    few = reads()
    for n in range(2, 7):
        _practice(store, f"small-{n}", 1)
    writeback.add_booking(store, "small-3", "fh-1", "P1", datetime.now(UTC) + timedelta(days=3))
    with store.begin_owner() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (practice_id, kind, idempotency_key, pms_patient_id, payload, status, finished_at) "
                "VALUES ('small-5', 'booking', 'fh-2', 'P1', '{}', 'failed', now()), "
                "('small-5', 'booking', 'fh-3', 'P1', '{}', 'timed_out', now()), "
                "('small-5', 'booking', 'fh-4', 'P1', '{}', 'confirmed', now())"
            )
        )
    assert reads() == few
    states = {s.practice_id: s for s in health.fleet_health(store)}
    assert states["small-3"].write_detail.startswith("oldest writeback waiting 0 min") and states["small-3"].write_ok
    assert (states["small-5"].needs_action, states["small-5"].write_detail) == (2, "nothing waiting")
    assert all(states[f"small-{n}"].needs_action == 0 for n in (0, 1, 2, 3, 4, 6))
