"""A writeback that needs action is red and sits in a worklist: the `no_writeback_needs_action`
check, one alert per item through the alert channels, `nvc outbox PRACTICE --needs-action`, `retry`
(still exactly once), `dismiss --why` (audited), bookings timed out when their appointment starts,
the sensor's re-check after a dismissal, and the daily digest. Against the real store, a real Optix
sandbox and a real webhook receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from dagster import (
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
    materialize,
)
from sqlalchemy import text

from assets.writeback import NEEDS_ACTION_CHECK, booking_writebacks, no_writeback_needs_action
from nvc_pipelines import writeback
from nvc_pipelines.alerts import recent_alerts
from nvc_pipelines.application.cli import main
from nvc_pipelines.definitions import defs
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store import Store
from resources.deployment import pms_gateway
from resources.goc import GocRegisterResource
from resources.protocol import PmsError
from resources.store import StoreResource
from sandboxes.optix import OptixSandbox
from schedules.writeback import booking_writeback_sensor, writeback_digest_job, writeback_digest_schedule

OPX = "OPX-31"
GHOST = "NO-SUCH-PATIENT"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[OptixSandbox]:
    with OptixSandbox(practices={OPX: 6}, api_keys={"wl-key": OPX}) as server:
        server.rate_limit_per_second = 0
        yield server


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A webhook receiver on loopback (NVC_ALERT_WEBHOOK_URL): the texts posted to it."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NVC_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    yield received
    server.shutdown()


def _connect(store: Store, sandbox: OptixSandbox, practice_id: str):
    store.add_practice(
        practice_id, practice_id, PmsKind.OPTIX, {"practice_id": OPX, "api_url": sandbox.url}, {"api_key": "wl-key"}
    )
    resource = pms_gateway().optix.model_copy(update={"backoff_seconds": 0.01})
    return resource.open(store.get_practice(practice_id), {"api_key": "wl-key"})


def _slot(i: int) -> datetime:
    return datetime.combine(date.today() + timedelta(days=600 + i // 14), time(9, 0), tzinfo=UTC) + timedelta(
        minutes=30 * (i % 14)
    )


def _patient(sandbox: OptixSandbox) -> str:
    return f"P{sandbox.patients(OPX)[0].index:07d}"


def _check(instance, database_url: str, practice_id: str):
    """Materialise the writeback with its checks, as the sensor's run does; the worklist check's result."""
    result = materialize(
        [booking_writebacks, no_writeback_needs_action],
        partition_key=practice_id,
        instance=instance,
        resources={
            "store": StoreResource(database_url=database_url),
            "pms": pms_gateway(),
            "goc_register": GocRegisterResource(),
        },
        raise_on_error=False,
    )
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == NEEDS_ACTION_CHECK]
    return evaluation


def _id(store: Store, practice_id: str, key: str) -> int:
    return next(r["outbox_id"] for r in writeback.outbox_rows(store, practice_id) if r["idempotency_key"] == key)


def test_a_refused_booking_is_red_alerted_once_and_leaves_the_worklist_when_dismissed(
    store: Store, database_url: str, sandbox: OptixSandbox, webhook: list[str]
) -> None:
    practice_id = "wl-red"
    _connect(store, sandbox, practice_id).close()
    writeback.add_booking(store, practice_id, "wl-good", _patient(sandbox), _slot(1))
    writeback.add_booking(store, practice_id, "wl-ghost", GHOST, _slot(2))
    ghost = _id(store, practice_id, "wl-ghost")
    runner = CliRunner()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", [practice_id])
        red = _check(instance, database_url, practice_id)
        assert not red.passed and red.severity.value == "ERROR"
        meta = {k: v.value for k, v in red.metadata.items()}
        assert (meta["needs_action"], meta["failed"], meta["outbox_ids"]) == (1, 1, [ghost])
        assert meta["items"] == [
            {"outbox_id": ghost, "kind": "booking", "status": "failed", "problem": "patient_not_found"}
        ]
        assert GHOST not in json.dumps(meta) + red.description  # no patient data in the UI

        # One alert, recorded and sent; another run (or tick) does not raise it again.
        (alert,) = recent_alerts(store, practice_id)
        assert (alert["severity"], alert["job_name"], alert["delivered_to"]) == (
            "critical",
            "booking_writeback",
            ["webhook"],
        )
        assert f"booking {ghost} (wl-ghost) failed: patient_not_found" in alert["message"]
        assert len(webhook) == 1 and "[CRITICAL] 1 writeback(s) need action for practice wl-red" in webhook[0]
        assert GHOST not in webhook[0]
        assert not _check(instance, database_url, practice_id).passed
        assert len(recent_alerts(store, practice_id)) == 1 and len(webhook) == 1
        shown = runner.invoke(main, ["alerts", practice_id])
        assert shown.exit_code == 0 and "1 alert(s)" in shown.output and "patient_not_found" in shown.output

        # The worklist.
        listed = runner.invoke(main, ["outbox", practice_id, "--needs-action"])
        assert listed.exit_code == 0, listed.output
        assert "1 writeback(s) need action for wl-red" in listed.output
        assert "wl-ghost" in listed.output and GHOST in listed.output and "patient_not_found" in listed.output
        assert "wl-good" not in listed.output
        everything = runner.invoke(main, ["outbox", practice_id])
        assert "2 outbox row(s)" in everything.output and "confirmed" in everything.output

        # Clear one-line errors: unknown id, wrong state, no reason.
        good = _id(store, practice_id, "wl-good")
        for args, said in [
            (["outbox", "retry", "999999"], "no outbox row 999999"),
            (["outbox", "dismiss", "999999", "--why", "x"], "no outbox row 999999"),
            (["outbox", "retry", str(good)], f"outbox {good} is confirmed; only failed or dead-lettered"),
            (["outbox", "dismiss", str(good), "--why", "x"], f"outbox {good} is confirmed; only failed"),
            (["outbox", "dismiss", str(ghost), "--why", "  "], "say why the writeback is dismissed"),
            (["outbox", practice_id, "--needs-action", "--status", "failed"], "not both"),
        ]:
            refused = runner.invoke(main, args)
            assert refused.exit_code == 1, (args, refused.output)
            assert said in refused.output and "Traceback" not in refused.output, refused.output
            assert len(refused.output.strip().splitlines()) == 1
        missing = runner.invoke(main, ["outbox", "dismiss", str(ghost)])
        assert missing.exit_code == 2 and "Missing option '--why'" in missing.output

        # Retried as it is (the patient is still missing): it fails again, a new failure, a new alert.
        retried = runner.invoke(main, ["outbox", "retry", str(ghost)])
        assert retried.exit_code == 0, retried.output
        assert f"Outbox {ghost} (booking wl-ghost, practice wl-red) is pending again" in retried.output
        assert writeback.due_practices(store).keys() == {practice_id}
        assert not _check(instance, database_url, practice_id).passed
        assert len(recent_alerts(store, practice_id)) == 2 and len(webhook) == 2

        dismissed = runner.invoke(main, ["outbox", "dismiss", str(ghost), "--why", "booked by phone by reception"])
        assert dismissed.exit_code == 0, dismissed.output
        assert "Dismissed outbox" in dismissed.output
        assert (
            "Nothing needs action for wl-red." in runner.invoke(main, ["outbox", practice_id, "--needs-action"]).output
        )
        row = writeback.outbox_rows(store, practice_id, "dismissed")[0]
        assert (row["dismissed_why"], row["dismissed_by"].startswith("cli:")) == ("booked by phone by reception", True)
        green = _check(instance, database_url, practice_id)
        assert green.passed and green.description == "nothing waits for action"
        again = runner.invoke(main, ["outbox", "dismiss", str(ghost), "--why", "twice"])
        assert again.exit_code == 1 and "is dismissed" in again.output
    audit = {e["action"]: e for e in store.audit_entries(practice_id)}
    assert audit["outbox_retry"]["detail"] == {"outbox_id": ghost, "was": "failed", "problem": "patient_not_found"}
    assert audit["outbox_dismiss"]["detail"]["why"] == "booked by phone by reception"
    assert audit["outbox_dismiss"]["record_refs"] == [GHOST] and audit["outbox_dismiss"]["actor"].startswith("cli:")


def test_retry_after_a_fix_lands_once(store: Store, database_url: str, sandbox: OptixSandbox) -> None:
    """A dead letter retried after the PMS came back, and one whose write had in fact landed: each
    booking is in the PMS once, and the worklist check passes."""
    practice_id = "wl-retry"
    client = _connect(store, sandbox, practice_id)
    writeback.add_booking(store, practice_id, "wl-down", _patient(sandbox), _slot(20))
    sandbox.faults.down = True
    try:
        report = writeback.deliver(store, practice_id, client, error_types=(PmsError,), max_attempts=1)
    finally:
        sandbox.faults.down = False
    assert report.dead_lettered == 1
    down = _id(store, practice_id, "wl-down")
    # Landed in the PMS, but the outbox never heard (responses and look-ups lost): dead-lettered.
    writeback.add_booking(store, practice_id, "wl-landed", _patient(sandbox), _slot(21))
    assert writeback.deliver(store, practice_id, client, error_types=(PmsError,)).confirmed == 1
    landed = _id(store, practice_id, "wl-landed")
    with store.begin_owner() as conn:
        conn.execute(
            text("UPDATE outbox SET status = 'dead_letter', problem = 'lost_response' WHERE outbox_id = :i"),
            {"i": landed},
        )

    runner = CliRunner()
    for outbox_id in (down, landed):
        assert runner.invoke(main, ["outbox", "retry", str(outbox_id)]).exit_code == 0
    report = writeback.deliver(store, practice_id, client, error_types=(PmsError,))
    assert (report.confirmed, report.already_there) == (2, 1)
    refs = [a["nvc_reference"] for a in sandbox.nvc_appointments(OPX) if a["nvc_reference"].startswith("wl-")]
    assert sorted(refs) == sorted({*refs}) and {"wl-down", "wl-landed"} <= set(refs)  # each exactly once
    assert {r["status"] for r in writeback.outbox_rows(store, practice_id)} == {"confirmed"}
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", [practice_id])
        assert _check(instance, database_url, practice_id).passed

    # A practice that is disconnected is reconnected before its rows are retried.
    writeback.add_booking(store, practice_id, "wl-off", _patient(sandbox), _slot(22))
    store.set_status(practice_id, "disconnected")
    assert writeback.fail_all(store, practice_id, "practice_disconnected", "disconnected") == 1
    off = runner.invoke(main, ["outbox", "retry", str(_id(store, practice_id, "wl-off"))])
    assert off.exit_code == 1 and "practice wl-retry is disconnected; reconnect it" in off.output
    store.set_status(practice_id, "connected")
    client.close()


def test_a_booking_not_landed_before_its_appointment_times_out(
    store: Store, database_url: str, sandbox: OptixSandbox, webhook: list[str]
) -> None:
    practice_id = "wl-late"
    client = _connect(store, sandbox, practice_id)
    soon = datetime.now(UTC) + timedelta(hours=2)
    writeback.add_booking(store, practice_id, "wl-soon", _patient(sandbox), soon)
    sandbox.faults.down = True
    try:
        assert writeback.deliver(store, practice_id, client, error_types=(PmsError,)).retry_later == 1
    finally:
        sandbox.faults.down = False
    assert writeback.due_practices(store) == {}  # backing off
    late = _id(store, practice_id, "wl-soon")
    with store.begin_owner() as conn:  # two hours pass: the appointment has started, the row still backs off
        conn.execute(
            text(
                "UPDATE outbox SET payload = jsonb_set(payload, '{starts_at}', to_jsonb(CAST(:s AS text))) WHERE outbox_id = :i"
            ),
            {"s": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(), "i": late},
        )
    assert writeback.due_practices(store).keys() == {practice_id}  # the sensor launches a run to time it out
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", [practice_id])
        red = _check(instance, database_url, practice_id)
        assert not red.passed and red.metadata["timed_out"].value == 1
        (row,) = writeback.outbox_rows(store, practice_id)
        assert (row["status"], row["problem"], row["attempts"]) == ("timed_out", "appointment_started", 1)
        assert "the appointment started before the booking reached the PMS (last attempt:" in row["last_error"]
        assert [a["nvc_reference"] for a in sandbox.nvc_appointments(OPX) if a["nvc_reference"] == "wl-soon"] == []
        _check(instance, database_url, practice_id)  # not sent again, not alerted again
        assert writeback.outbox_rows(store, practice_id)[0]["attempts"] == 1
        (alert,) = recent_alerts(store, practice_id)
        assert f"booking {late} (wl-soon) timed out" in alert["message"] and len(webhook) == 1

        runner = CliRunner()
        listed = runner.invoke(main, ["outbox", practice_id, "--needs-action"])
        assert "timed_out" in listed.output and "appointment_started" in listed.output
        refused = runner.invoke(main, ["outbox", "retry", str(late)])
        assert refused.exit_code == 1 and "its appointment start" in refused.output and "has passed" in refused.output

        # The sensor re-checks the practice once after a dismissal, so the check turns green at once.
        context = build_sensor_context(instance=instance, resources={"store": StoreResource(database_url=database_url)})
        assert isinstance(booking_writeback_sensor(context), SkipReason)
        assert runner.invoke(main, ["outbox", "dismiss", str(late), "--why", "rebooked for next week"]).exit_code == 0
        (request,) = booking_writeback_sensor(context)
        assert request.partition_key == practice_id and ":dismissed:" in request.run_key
        assert isinstance(booking_writeback_sensor(context), SkipReason)
        assert _check(instance, database_url, practice_id).passed
    client.close()


def test_the_daily_digest_lists_what_still_waits_once_a_day(
    store: Store, database_url: str, sandbox: OptixSandbox, webhook: list[str]
) -> None:
    schedule = defs.resolve_schedule_def("writeback_digest_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 8 * * *", "Europe/London")
    resources = {"store": StoreResource(database_url=database_url)}
    when = datetime(2026, 12, 7, 8, 0, tzinfo=ZoneInfo("Europe/London"))
    with instance_for_test() as instance:
        context = build_schedule_context(instance=instance, scheduled_execution_time=when, resources=resources)
        assert isinstance(writeback_digest_schedule(context), SkipReason)  # nothing waits: no digest

        for practice_id in ("wl-dig-a", "wl-dig-b"):
            _connect(store, sandbox, practice_id).close()
            writeback.add_booking(store, practice_id, f"{practice_id}-1", GHOST, _slot(40))
            writeback.add_booking(store, practice_id, f"{practice_id}-2", _patient(sandbox), _slot(41))
            store.set_status(practice_id, "disconnected")
            writeback.fail_all(store, practice_id, "practice_disconnected", "disconnected")
        writeback.dismiss(store, _id(store, "wl-dig-b", "wl-dig-b-2"), "called back", "test")
        webhook.clear()

        request = writeback_digest_schedule(context)
        assert (request.run_key, request.tags["digest_day"]) == ("digest:2026-12-07", "2026-12-07")
        for _ in range(2):  # the same day twice: sent once
            assert writeback_digest_job.execute_in_process(
                instance=instance, resources=resources, tags=request.tags
            ).success
        assert len(webhook) == 1
        digest = webhook[0]
        assert "[WARNING] Writeback digest 2026-12-07: 3 booking(s)/note(s) still need action" in digest
        assert "wl-dig-a: 2 waiting (2 failed)" in digest and "wl-dig-b: 1 waiting (1 failed)" in digest
        assert "nvc outbox PRACTICE --needs-action" in digest and GHOST not in digest
        (alert,) = [a for a in recent_alerts(store, "wl-dig-a") if a["job_name"] == "writeback_digest"]
        assert alert["delivered_to"] == ["webhook"] and alert["severity"] == "warning"
        shown = CliRunner().invoke(main, ["alerts"])
        assert shown.exit_code == 0 and "writeback_digest" in shown.output
