"""GOC registration: clinicians read from the PMS sandboxes with their GOC numbers, checked against the
GOC register sandbox over real loopback HTTP; the sync flags who is not registered, `nvc clinicians`
lists them, and a booking naming one who may not take it fails before it reaches the PMS."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta

import pytest
from click.testing import CliRunner
from dagster import instance_for_test, materialize

from assets.sync import clinicians as clinicians_asset
from assets.writeback import booking_writebacks
from nvc_pipelines import goc, writeback
from nvc_pipelines.application.cli import main
from nvc_pipelines.goc import ClinicianRefused, RegistrationState, normalise_goc_number
from nvc_pipelines.model import BookingRequest, Clinician, PmsKind
from nvc_pipelines.store import Store
from resources.deployment import pms_gateway
from resources.goc import GocRegister, GocRegisterResource
from resources.protocol import ClinicianSource
from resources.store import StoreResource
from resources.sycle import SycleResource
from sandboxes.goc import GocSandbox, Registrant, registrants_for
from sandboxes.sycle import DEMO_PASSWORD, DEMO_USERNAME, SycleSandbox

CLINIC = "2803-9506"


@pytest.fixture(scope="module")
def sycle() -> Iterator[SycleSandbox]:
    with SycleSandbox(clinics={CLINIC: 12}, rate_limit_per_second=1000.0) as server:
        yield server


@pytest.fixture
def register(sycle: SycleSandbox) -> Iterator[GocSandbox]:
    """The register: Sycle's optometrists and dispensing optician, one optometrist suspended."""
    entries = registrants_for(sycle.clinicians)
    with GocSandbox(registrants=entries) as server:
        yield server


def _optometrists(sycle: SycleSandbox) -> list[tuple[str, str]]:
    return [(sid, n) for sid, n in sycle.staff_goc_numbers().items() if n and n.startswith("01-")]


def test_numbers_are_read_as_the_practice_typed_them() -> None:
    assert normalise_goc_number("01-12345") == "01-12345"
    assert normalise_goc_number(" 01 12345 ") == "01-12345"  # typed with a space for the hyphen
    assert normalise_goc_number("0112345") == "01-12345"
    assert normalise_goc_number("02-23456") == "02-23456"
    assert normalise_goc_number("03-12345") is None and normalise_goc_number("GOC 1234") is None
    assert normalise_goc_number("") is None and normalise_goc_number(None) is None


def test_each_registration_state(register: GocSandbox) -> None:
    register.add(
        Registrant("01-44444", "Sam Suspended", "optometrist", "suspended"),
        Registrant("01-55555", "Erin Erased", "optometrist", "erased"),
        Registrant("01-66666", "Stu Student", "student_optometrist", "registered"),
    )
    with GocRegister(register.url) as client:

        def state(number: str | None) -> goc.ClinicianCheck:
            return goc.check(Clinician("p", "ref", "Name", number), client.lookup)

        some = next(iter(register.registrants.values()))
        assert state(some.number).state == RegistrationState.REGISTERED
        assert state("01-44444").state == RegistrationState.SUSPENDED
        assert state("01-55555").state == RegistrationState.ERASED
        assert state("01-99999").state == RegistrationState.NOT_ON_REGISTER
        assert state("GOC-1").state == RegistrationState.INVALID_NUMBER
        assert state(None).state == RegistrationState.MISSING_NUMBER
        student = state("01-66666")
        assert student.state == RegistrationState.REGISTERED and not student.may_sight_test
    # Not configured, or not answering: unverified, never "registered".
    assert goc.check(Clinician("p", "r", "N", "01-12345"), GocRegister(None).lookup).state == "unverified"
    register.faults.down = True
    try:
        with GocRegister(register.url, max_attempts=1) as client:
            down = goc.check(Clinician("p", "r", "N", some.number), client.lookup)
    finally:
        register.faults.down = False
    assert down.state == RegistrationState.UNVERIFIED and "HTTP 503" in down.reason


def _connect(store: Store, sycle: SycleSandbox, practice_id: str = "goc-sycle") -> None:
    settings = {"account_url": sycle.url, "location_id": CLINIC}
    secrets = {"api_username": DEMO_USERNAME, "api_password": DEMO_PASSWORD}
    store.add_practice(practice_id, "GOC test", PmsKind.SYCLE, settings, secrets, replace=True)


def _resources(database_url: str, register: GocSandbox) -> dict:
    return {
        "store": StoreResource(database_url=database_url),
        "pms": pms_gateway(),
        "goc_register": GocRegisterResource(register_url=register.url, max_attempts=1),
    }


def test_the_sync_checks_every_clinician_and_flags_the_rest(
    store: Store, database_url: str, sycle: SycleSandbox, register: GocSandbox
) -> None:
    _connect(store, sycle)
    with SycleResource().open(store.get_practice("goc-sycle"), store.practice_credentials("goc-sycle")) as client:
        assert isinstance(client, ClinicianSource)
        listed = {c.pms_clinician_ref: c for c in client.read_clinicians()}
    assert {c.goc_number for c in listed.values()} - {None} == set(register.registrants)
    suspended = _optometrists(sycle)[1][1]
    register.set_status(suspended, "suspended")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["goc-sycle"])
        result = materialize(
            [clinicians_asset],
            partition_key="goc-sycle",
            instance=instance,
            resources=_resources(database_url, register),
        )
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node("clinicians")[0].metadata.items()}
    assert meta["clinicians"] == len(listed) and meta["flagged"] == 2
    flags = {f["state"]: f for f in meta["flags"]}
    assert set(flags) == {"missing_number", "suspended"}  # the hearing care practitioner; the suspended one
    assert flags["suspended"]["goc_number"] == suspended
    assert meta["may_sight_test"] == len(_optometrists(sycle)) - 1
    # `nvc clinicians` lists them with their state.
    out = CliRunner().invoke(main, ["clinicians", "goc-sycle"], catch_exceptions=False).output
    assert "suspended" in out and "missing_number" in out and "2 clinician(s) flagged" in out
    assert suspended in out


def _booking(key: str, pid: str, ref: str | None, kind: str = "eye_test", i: int = 0) -> tuple:
    start = datetime.combine(date.today() + timedelta(days=700), time(9, 0), tzinfo=UTC) + timedelta(minutes=30 * i)
    return key, pid, start, 30, kind, ref


def test_a_booking_naming_a_clinician_who_may_not_take_it_fails_before_the_pms(
    store: Store, database_url: str, sycle: SycleSandbox, register: GocSandbox
) -> None:
    _connect(store, sycle, "goc-vet")
    (ok_ref, _), (bad_ref, bad_number) = _optometrists(sycle)[:2]
    dispenser = next(sid for sid, n in sycle.staff_goc_numbers().items() if n and n.startswith("02-"))
    nobody = next(sid for sid, n in sycle.staff_goc_numbers().items() if not n)
    register.set_status(bad_number, "erased")
    resources = _resources(database_url, register)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["goc-vet"])
        assert materialize([clinicians_asset], partition_key="goc-vet", instance=instance, resources=resources).success
        pids = sorted(sycle.patients(CLINIC))
        cases = {
            "vet-ok": _booking("vet-ok", pids[0], ok_ref, i=0),
            "vet-erased": _booking("vet-erased", pids[1], bad_ref, i=2),
            "vet-dispenser": _booking("vet-dispenser", pids[2], dispenser, i=4),
            "vet-dispenser-collection": _booking("vet-dispenser-collection", pids[3], dispenser, "collection", i=6),
            "vet-no-number": _booking("vet-no-number", pids[4], nobody, i=8),
            "vet-unknown": _booking("vet-unknown", pids[5], "2803-S77", i=10),
            "vet-none": _booking("vet-none", pids[6], None, i=12),
        }
        for key, pid, start, minutes, kind, ref in cases.values():
            writeback.add_booking(store, "goc-vet", key, pid, start, minutes, kind, ref)
        before = len(sycle.nvc_appointments(CLINIC))
        lookups = register.lookups()
        run = materialize([booking_writebacks], partition_key="goc-vet", instance=instance, resources=resources)
    rows = {r["idempotency_key"]: r for r in writeback.outbox_rows(store, "goc-vet")}
    assert {k: r["status"] for k, r in rows.items()} == {
        "vet-ok": "confirmed",
        "vet-erased": "failed",
        "vet-dispenser": "failed",
        "vet-dispenser-collection": "confirmed",  # a dispensing optician may take a collection
        "vet-no-number": "failed",
        "vet-unknown": "failed",
        "vet-none": "confirmed",
    }
    assert rows["vet-erased"]["problem"] == "clinician_not_registered" and "erased" in rows["vet-erased"]["last_error"]
    assert rows["vet-dispenser"]["problem"] == "clinician_cannot_sight_test"
    assert rows["vet-no-number"]["problem"] == "clinician_not_registered"
    assert "no GOC number" in rows["vet-no-number"]["last_error"]
    assert rows["vet-unknown"]["problem"] == "clinician_unknown"
    made = {a["nvc_reference"] for a in sycle.nvc_appointments(CLINIC)}
    assert {"vet-ok", "vet-dispenser-collection", "vet-none"} <= made
    assert not made & {"vet-erased", "vet-dispenser", "vet-no-number", "vet-unknown"}  # never reached Sycle
    assert len(sycle.nvc_appointments(CLINIC)) == before + 3
    assert register.lookups() == lookups  # the sync's answers were fresh: no second look-up
    assert not run.success or run.get_asset_check_evaluations()[0].passed is False


def test_a_register_that_does_not_answer_makes_the_booking_wait(store: Store, sycle: SycleSandbox) -> None:
    _connect(store, sycle, "goc-wait")
    booking = BookingRequest("wait-1", "x", datetime.now(UTC), datetime.now(UTC), "eye_test", "01-12345")
    with pytest.raises(ClinicianRefused) as refused:
        goc.vet_booking(store, "goc-wait", booking, GocRegister(None).lookup)
    assert refused.value.problem == "register_unavailable"
    from nvc_pipelines.retry import outbox_retries

    assert outbox_retries("register_unavailable") and not outbox_retries("clinician_not_registered")
