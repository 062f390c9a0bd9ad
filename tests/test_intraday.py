"""Fresh before every call, against every PMS sandbox: what the practice changes during the day (a
booking at the desk, a death, a "do not phone") reaches the call list within one intraday read,
which never reads everything; a PMS outage makes the pre-dial check answer skip."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest

from nvc_pipelines import intraday
from nvc_pipelines.application import demo
from nvc_pipelines.erasure import erase_patient
from nvc_pipelines.model import BookingRequest, Practice
from nvc_pipelines.recall import RecallRules, recall_with_clinical
from nvc_pipelines.store import Store
from nvc_pipelines.store.streams import APPOINTMENTS, CLINICAL_RECORDS, PATIENTS
from nvc_pipelines.sync import next_cursor
from resources.protocol import PmsError

PMS = ("optix", "acuitas", "optisoft", "sycle")
# A weekday morning inside calling hours; the sandboxes' data is anchored on today, so only the
# time of day is pinned (the list's "now" when placing people).


@pytest.fixture(scope="module")
def sandboxes() -> Iterator[dict[str, Any]]:
    started = demo.start_sandboxes(0, patients=50)
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


class Recording:
    """The real PMS client, with every `since` it was asked for written down."""

    def __init__(self, client: Any):
        self.client = client
        self.since: list[tuple[str, datetime | None]] = []

    def read_patients(self, since: datetime | None, today: date) -> Any:
        self.since.append(("patients", since))
        return self.client.read_patients(since, today)

    def read_appointments(self, since: datetime | None) -> Any:
        self.since.append(("appointments", since))
        return self.client.read_appointments(since)

    def close(self) -> None:
        self.client.close()


def _connect(store: Store, sandboxes: dict[str, Any], pms: str) -> tuple[Practice, Any]:
    from resources.deployment import pms_gateway

    practice_id, kind, name, settings, secrets = next(c for c in demo.demo_connections(sandboxes) if c[1] == pms)
    practice = store.add_practice(practice_id, name, kind, settings, secrets)
    return practice, pms_gateway().open(practice, secrets)


def _full_sync(store: Store, practice: Practice, client: Any) -> None:
    """What the first sync writes (patients, diary, clinical records, recalls, call list)."""
    pid = practice.practice_id
    read = client.read_patients(None, date.today())
    store.write_stream(pid, PATIENTS, read.patients, read.rejected, source=str(practice.pms_kind), run_id=None,
                       full=True, cursor_at=next_cursor(p.source_updated_at for p in read.patients))  # fmt: skip
    for spec, batch in (
        (APPOINTMENTS, client.read_appointments(None)),
        (CLINICAL_RECORDS, client.read_clinical_records(None)),
    ):
        store.write_stream(pid, spec, batch.records, batch.rejected, source=str(practice.pms_kind), run_id=None,
                           full=True, cursor_at=next_cursor(r.source_updated_at for r in batch.records))  # fmt: skip
    rules = RecallRules.from_settings(practice.settings)
    clinical = store.load_clinical_records(pid)
    found = [recall_with_clinical(p, clinical.get(p.pms_patient_id, []), rules) for p in store.load_patients(pid)]
    store.write_recalls(pid, [r for r in found if r is not None])
    store.rebuild_call_list(pid)


def _clinician(sandbox: Any, pms: str, ref: str) -> str | None:
    """Optisoft's diary is per clinician (by GOC number); the others book without one."""
    if pms != "optisoft":
        return None
    from sandboxes.seed import seed_clinicians

    return next(c.goc_number for c in seed_clinicians(sandbox._installs[ref]["seed"]) if c.goc_number.startswith("01-"))


def _singles(store: Store, practice_id: str) -> list[dict[str, Any]]:
    """Adults alone on their number: each can be taken off without a household in the way."""
    view = store.call_list_view(practice_id)
    return [e for e in view["entries"] if len(e["people"]) == 1]


@pytest.mark.parametrize("pms", PMS)
def test_todays_changes_reach_the_list_in_one_intraday_read(store: Store, sandboxes: dict[str, Any], pms: str) -> None:
    practice, client = _connect(store, sandboxes, pms)
    try:
        _full_sync(store, practice, client)
        singles = _singles(store, practice.practice_id)
        assert len(singles) >= 4, singles
        booked, died, objects = (e["people"][0]["pms_patient_id"] for e in singles[:3])
        sandbox, ref = sandboxes[pms], next(c for c in demo.demo_connections(sandboxes) if c[1] == pms)[3]
        ref = ref.get("practice_id") or ref.get("database") or ref.get("practice_code") or ref.get("location_id")
        # At the desk and on the phone today: a booking, a death recorded, a "please don't ring".
        start = datetime.combine(date.today() + timedelta(days=30), time(10, 0), UTC)
        desk = BookingRequest(
            f"desk-{pms}", booked, start, start + timedelta(minutes=30), clinician_ref=_clinician(sandbox, pms, ref)
        )
        client.create_appointment(desk)
        sandbox.update_patient(ref, died, status="deceased")
        sandbox.update_patient(ref, objects, phone_recall=False)

        recording = Recording(client)
        done = intraday.refresh(store, practice, recording)
        assert done.read["patients"] >= 2 and done.read["appointments"] >= 1
        assert all(since is not None for _, since in recording.since), recording.since  # never a full read
        why = {pid: store.call_list_why(practice.practice_id, pid) for pid in (booked, died, objects)}
        assert (why[booked]["listed"], why[booked]["reason_code"]) == (False, "booked"), why[booked]
        assert why[died]["reason_code"] == "deceased", why[died]
        assert why[objects]["reason_code"] == "do_not_call", why[objects]
        assert store.call_list_state(practice.practice_id)["ok"] is True

        # Just before dialling: fresh data gives a real answer; with the PMS down and the last read
        # too old to trust, the answer is skip, and the miss is counted.
        phone = singles[3]["phone"]

        def open_client() -> Any:
            return _connect_again(practice, sandboxes, pms)

        fresh = intraday.check_before_dial(store, practice, phone, open_client, (PmsError,))
        assert not fresh.stale and (fresh.answer == "call" or fresh.reason.startswith("not before")), fresh
        sandbox.faults.down = True
        try:
            later = datetime.now(UTC) + timedelta(minutes=10)
            answer = intraday.check_before_dial(store, practice, phone, open_client, (PmsError,), now=later)
        finally:
            sandbox.faults.down = False
        assert (answer.answer, answer.stale) == ("skip", True) and "not calling on stale data" in answer.reason
        state = store.call_list_state(practice.practice_id)
        assert state["ok"] is False and state["check_misses"] == 1 and state["checks"] == 2
    finally:
        client.close()


def test_before_first_sync_there_is_no_intraday_read(store: Store, sandboxes: dict[str, Any]) -> None:
    practice, client = _connect(store, sandboxes, "optix")
    recording = Recording(client)
    try:
        with pytest.raises(intraday.NotYetSynced, match="has not had its first full sync"):
            intraday.refresh(store, practice, recording)
    finally:
        client.close()
    assert recording.since == []  # nothing was read at all


class _ErasingFirst:
    """The store, with one patient erased just before its first stream write begins: after the
    intraday read read her, before it writes."""

    def __init__(self, store: Store, practice_id: str, ref: str):
        self.store, self.practice_id, self.ref, self.writes = store, practice_id, ref, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def write_stream_pages(self, *args: Any, **kwargs: Any) -> Any:
        self.writes += 1
        if self.writes == 1:
            erase_patient(self.store, self.practice_id, self.ref, "test")
        return self.store.write_stream_pages(*args, **kwargs)


def test_someone_erased_as_an_intraday_read_is_written_is_left_out(store: Store, sandboxes: dict[str, Any]) -> None:
    """The intraday write looks up who is erased inside its own transaction, under its lock on
    erasures: someone erased after the PMS read and before the write is left out, and the rest is
    written (before, she was written back; looked up before the lock, the write would refuse)."""
    practice, client = _connect(store, sandboxes, "optix")
    try:
        _full_sync(store, practice, client)
        victim, other = (e["people"][0]["pms_patient_id"] for e in _singles(store, practice.practice_id)[:2])
        ref = next(c for c in demo.demo_connections(sandboxes) if c[1] == "optix")[3]["practice_id"]
        sandboxes["optix"].update_patient(ref, victim, last_name="Changed")  # both read again today
        sandboxes["optix"].update_patient(ref, other, last_name="Altered")
        erasing = _ErasingFirst(store, practice.practice_id, victim)
        done = intraday.refresh(erasing, practice, client)  # type: ignore[arg-type]
    finally:
        client.close()
    assert erasing.writes == 2  # patients, appointments
    assert done.read["patients"] >= 1
    stored = {p["pms_patient_id"]: p for p in store.export_practice(practice.practice_id)["patients"]}
    assert victim not in stored
    assert stored[other]["last_name"] == "Altered"
    assert store.call_list_why(practice.practice_id, other)["listed"] is not None


def _connect_again(practice: Practice, sandboxes: dict[str, Any], pms: str) -> Any:
    from resources.deployment import pms_gateway

    secrets = next(c for c in demo.demo_connections(sandboxes) if c[1] == pms)[4]
    return pms_gateway().open(practice, secrets)


def test_the_sensor_batches_due_practices_and_the_run_refreshes_or_marks_stale(
    store: Store, database_url: str, sandboxes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import AssetKey, DagsterInstance, RunRequest, build_sensor_context

    from resources.deployment import pms_gateway
    from resources.store import StoreResource
    from schedules import intraday as wiring

    optix, client = _connect(store, sandboxes, "optix")
    try:
        _full_sync(store, optix, client)
    finally:
        client.close()
    acuitas, client = _connect(store, sandboxes, "acuitas")
    try:
        _full_sync(store, acuitas, client)
    finally:
        client.close()
    resources = {"store": StoreResource(database_url=database_url), "pms": pms_gateway()}
    sensor_resources = {"store": resources["store"]}
    monday_10am = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    sunday = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("practices", [optix.practice_id, acuitas.practice_id])
        monkeypatch.setattr(wiring, "_now", lambda: sunday)
        skipped = wiring.intraday_sync_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert "no practice is inside its calling hours" in skipped.skip_message
        monkeypatch.setattr(wiring, "_now", lambda: monday_10am)
        requests = wiring.intraday_sync_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert [r.tags["pms"] for r in requests] == ["acuitas", "optix"] and all(
            isinstance(r, RunRequest) for r in requests
        )
        again = wiring.intraday_sync_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert "due a refresh" in again.skip_message  # claimed: the next tick waits for the runs

        ok = wiring.intraday_refresh_job.execute_in_process(
            run_config=requests[1].run_config, instance=instance, resources=resources
        )
        assert ok.success
        mats = [e.step_materialization_data.materialization for e in ok.get_asset_materialization_events()]
        assert [(m.asset_key, m.partition) for m in mats] == [(AssetKey("call_list"), optix.practice_id)]
        assert mats[0].metadata["trigger"].value == "intraday"

        sandboxes["acuitas"].faults.down = True
        try:
            down = wiring.intraday_refresh_job.execute_in_process(
                run_config=requests[0].run_config, instance=instance, resources=resources, raise_on_error=False
            )
        finally:
            sandboxes["acuitas"].faults.down = False
        assert not down.success
        failure = next(e for e in down.all_events if e.is_step_failure)
        assert "marked stale" in failure.step_failure_data.user_failure_data.description
        # The partition's call_list_is_fresh check: red for the practice that could not be read.
        from dagster import AssetCheckKey

        history = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey("call_list"), "call_list_is_fresh"), limit=10
        )
        by_partition = {r.event.dagster_event.event_specific_data.partition: r.status.value for r in history if r.event}
        assert by_partition == {optix.practice_id: "SUCCEEDED", acuitas.practice_id: "FAILED"}, by_partition
    assert store.call_list_state(acuitas.practice_id)["ok"] is False
    assert store.call_list_state(optix.practice_id)["ok"] is True
