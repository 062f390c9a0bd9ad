"""Booking writeback: exactly once into every PMS sandbox despite lost responses and errors, the
sensor's run keys, failures ops can see, and the next sync linking the booking back."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta

import pytest
from dagster import SkipReason, build_sensor_context, instance_for_test, materialize
from sqlalchemy import text

from assets.writeback import booking_writebacks
from nvc_pipelines import writeback
from nvc_pipelines.application.demo import demo_connections, start_sandboxes
from nvc_pipelines.store import Store
from resources.deployment import pms_gateway
from resources.goc import GocRegisterResource
from resources.protocol import PmsError
from resources.store import StoreResource
from sandboxes.acuitas import optom_codes
from sandboxes.seed import seed_clinicians
from schedules.writeback import booking_writeback_sensor

N_BOOKINGS = 1000


@pytest.fixture(scope="module")
def sandboxes():
    servers = start_sandboxes(0, patients=60)
    for server in servers.values():
        server.rate_limit_per_second = 0  # faults below inject the 429s
    yield servers
    for server in servers.values():
        server.stop()


def _clinician(kind: str) -> str | None:
    if kind == "optisoft":
        return next(c.goc_number for c in seed_clinicians(7) if c.goc_number.startswith("01-"))
    if kind == "acuitas":
        return next(code for code, c in optom_codes("ACUITAS_DEMO").items() if c.goc_number.startswith("01-"))
    return None


def _slot(i: int) -> datetime:
    day = date.today() + timedelta(days=500 + i // 14)
    return datetime.combine(day, time(9, 0), tzinfo=UTC) + timedelta(minutes=30 * (i % 14))


def _connect(store: Store, sandboxes, kind: str, **overrides: str) -> tuple[str, object]:
    practice_id, pms, name, settings, secrets = next(c for c in demo_connections(sandboxes) if c[1] == kind)
    settings = {**settings, **overrides}
    store.add_practice(practice_id, name, pms, settings, secrets, replace=True)
    resource = getattr(pms_gateway(), kind).model_copy(update={"backoff_seconds": 0.01})
    return practice_id, resource.open(store.get_practice(practice_id), secrets)


@pytest.fixture(autouse=True)
def short_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Honour Retry-After, but cap it: a thousand bookings with 5% 429s must not sleep for minutes."""
    monkeypatch.setattr("resources.http.MAX_RETRY_AFTER_SECONDS", 0.02)


def _drain(store: Store, practice_id: str, client) -> list[writeback.DeliveryReport]:
    """What repeated sensor-launched runs do, without waiting out the backoff between them."""
    reports = []
    for _ in range(30):
        reports.append(writeback.deliver(store, practice_id, client, error_types=(PmsError,)))
        with store.begin_owner() as conn:
            left = conn.execute(
                text(
                    "UPDATE outbox SET next_attempt_at = now() WHERE practice_id = :p AND status IN ('pending', 'sent')"
                ),
                {"p": practice_id},
            ).rowcount
        if not left:
            break
    return reports


@pytest.mark.parametrize("kind", ["optix", "acuitas", "optisoft", "sycle"])
def test_a_thousand_bookings_land_exactly_once(store: Store, sandboxes, kind: str) -> None:
    practice_id, client = _connect(store, sandboxes, kind)
    patients = [p.pms_patient_id for p in client.read_patients(None, date.today()).patients]
    sandbox = sandboxes[kind]
    clinician = _clinician(kind)
    for i, pid in zip(range(N_BOOKINGS), itertools.cycle(patients), strict=False):
        writeback.add_booking(store, practice_id, f"{kind}-bk-{i}", pid, _slot(i), 30, "eye_test", clinician)
    sandbox.faults.lost_response_after_write_rate = 0.2
    sandbox.faults.rate_500 = 0.05
    sandbox.faults.rate_429 = 0.05
    try:
        reports = _drain(store, practice_id, client)
    finally:
        sandbox.faults.lost_response_after_write_rate = sandbox.faults.rate_500 = sandbox.faults.rate_429 = 0
    ref = {"optix": "OPX-1001", "acuitas": "ACUITAS_DEMO", "optisoft": "OS-1001", "sycle": "2803-9506"}[kind]
    in_pms = Counter(a["nvc_reference"] for a in sandbox.nvc_appointments(ref) if a["nvc_reference"].startswith(kind))
    duplicates = {k: n for k, n in in_pms.items() if n > 1}
    rows = writeback.outbox_rows(store, practice_id)
    statuses = Counter(r["status"] for r in rows)
    print(
        f"\n{kind}: {len(in_pms)} in PMS, duplicates {len(duplicates)}, outbox {dict(statuses)}, runs {len(reports)}, "
        f"found-after-lost-response {sum(r.already_there for r in reports)}"
    )
    assert duplicates == {}
    assert set(statuses) <= {"confirmed", "failed"}
    assert all(r["problem"] and r["last_error"] for r in rows if r["status"] == "failed")
    confirmed = {r["idempotency_key"] for r in rows if r["status"] == "confirmed"}
    assert confirmed == set(in_pms)  # every confirmed booking is in the PMS, and nothing else is
    assert statuses["confirmed"] >= N_BOOKINGS * 0.99
    client.close()


def test_sensor_requests_one_run_per_due_set(store: Store, database_url: str, sandboxes) -> None:
    practice_id, client = _connect(store, sandboxes, "optix")
    pid = client.read_patients(None, date.today()).patients[0].pms_patient_id
    with instance_for_test() as instance:
        context = build_sensor_context(instance=instance, resources={"store": StoreResource(database_url=database_url)})
        assert isinstance(booking_writeback_sensor(context), SkipReason)
        instance.add_dynamic_partitions("practices", [practice_id])
        writeback.add_booking(store, practice_id, "sensor-1", pid, _slot(3000))
        first = booking_writeback_sensor(context)
        again = booking_writeback_sensor(context)
        assert [r.partition_key for r in first] == [practice_id]
        assert first[0].run_key == again[0].run_key  # the same due rows never launch twice
        assert first[0].tags["trigger"] == "writeback"
        assert int(first[0].tags["dagster/priority"]) > 0  # dequeued ahead of the nightly's queued syncs
        writeback.add_booking(store, practice_id, "sensor-2", pid, _slot(3001))
        assert booking_writeback_sensor(context)[0].run_key != first[0].run_key

        result = materialize(
            [booking_writebacks],
            partition_key=practice_id,
            instance=instance,
            resources={
                "store": StoreResource(database_url=database_url),
                "pms": pms_gateway(),
                "goc_register": GocRegisterResource(),
            },
        )
        meta = result.asset_materializations_for_node("booking_writebacks")[0].metadata
        assert meta["confirmed"].value == 2
        assert isinstance(booking_writeback_sensor(context), SkipReason)
    client.close()


def test_failures_are_clear_and_visible(store: Store, database_url: str, sandboxes) -> None:
    practice_id, client = _connect(store, sandboxes, "optix")
    pid = client.read_patients(None, date.today()).patients[0].pms_patient_id
    writeback.add_booking(store, practice_id, "taken-a", pid, _slot(4000))
    writeback.add_booking(store, practice_id, "taken-b", pid, _slot(4000))  # the same slot, booked twice
    writeback.add_booking(store, practice_id, "ghost", "NO-SUCH-PATIENT", _slot(4001))
    with pytest.raises(writeback.OutboxError, match="already used"):
        writeback.add_call_event(store, practice_id, "call_attempt", "taken-a", pid, "no answer", "no_answer")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", [practice_id])
        result = materialize(
            [booking_writebacks],
            partition_key=practice_id,
            instance=instance,
            resources={
                "store": StoreResource(database_url=database_url),
                "pms": pms_gateway(),
                "goc_register": GocRegisterResource(),
            },
            raise_on_error=False,
        )
        check = result.get_asset_check_evaluations()[0]
    assert not check.passed and "2 failed" in check.description
    by_key = {r["idempotency_key"]: r for r in writeback.outbox_rows(store, practice_id)}
    assert by_key["taken-a"]["status"] == "confirmed"
    assert (by_key["taken-b"]["status"], by_key["taken-b"]["problem"]) == ("failed", "slot_taken")
    assert (by_key["ghost"]["status"], by_key["ghost"]["problem"]) == ("failed", "patient_not_found")

    writeback.add_booking(store, practice_id, "late", pid, _slot(4002))
    store.set_status(practice_id, "disconnected")
    assert writeback.fail_all(store, practice_id, "practice_disconnected", "disconnected") == 1
    store.set_status(practice_id, "connected")
    client.close()


def test_call_events_and_the_next_sync_links_the_booking(store: Store, database_url: str, sandboxes) -> None:
    from assets.sync import appointments, call_list, clinical_records, patients, recalls

    # The second clinic: the thousand-booking test filled the first one's diary, so everyone there is booked.
    practice_id, client = _connect(store, sandboxes, "sycle", location_id="2803-9507")
    resources = {
        "store": StoreResource(database_url=database_url),
        "pms": pms_gateway(),
        "goc_register": GocRegisterResource(register_url=sandboxes["goc"].url),
    }
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", [practice_id])
        sync = [patients, appointments, clinical_records, recalls, call_list]
        assert materialize(sync, partition_key=practice_id, instance=instance, resources=resources).success
        called = store.call_list(practice_id)[0]["pms_patient_id"]
        writeback.add_booking(store, practice_id, "link-1", called, _slot(5000))
        writeback.add_call_event(
            store, practice_id, "call_outcome", "link-2", called, "Booked for an eye test", "booked"
        )
        writeback.add_call_event(store, practice_id, "call_attempt", "link-3", called, "Rang once", "no_answer")
        store.rebuild_call_list(practice_id, date.today())
        assert called not in {c["pms_patient_id"] for c in store.call_list(practice_id)}  # booked: not called again
        assert materialize(
            [booking_writebacks], partition_key=practice_id, instance=instance, resources=resources
        ).success
        assert materialize(sync, partition_key=practice_id, instance=instance, resources=resources).success
    linked = [a for a in store.export_practice(practice_id)["appointments"] if a["nvc_reference"] == "link-1"]
    assert len(linked) == 1 and linked[0]["pms_patient_id"] == called
    kinds = Counter(
        n["kind"] for n in sandboxes["sycle"].nvc_notes("2803-9507") if n["nvc_reference"].startswith("link")
    )
    assert sum(kinds.values()) == 2
    assert called not in {c["pms_patient_id"] for c in store.call_list(practice_id)}
    client.close()
