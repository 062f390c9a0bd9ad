"""GOC registration: clinicians read from the PMS sandboxes with their GOC numbers, checked against the
GOC register sandbox over real loopback HTTP; the sync flags who is not registered, `nvc clinicians`
lists them, and a booking naming one who may not take it fails before it reaches the PMS. Acuitas and
Optisoft list the odd cases (`seed.ODD_STAFF`) beside their clinicians; a booking may name a clinician
by GOC number and reaches the PMS under the PMS's own reference."""

from __future__ import annotations

import json
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
from sandboxes.acuitas import AcuitasSandbox
from sandboxes.goc import GocSandbox, Registrant, registrants_for, registrants_for_staff
from sandboxes.optisoft import OptisoftSandbox
from sandboxes.optisoft.sandbox import DEFAULT_DB_USERS
from sandboxes.seed import ODD_STAFF
from sandboxes.sycle import DEMO_PASSWORD, DEMO_USERNAME, SycleSandbox

CLINIC = "2803-9506"
ACUITAS_DB = "ACUITAS_GOC"
OPTISOFT_CODE = "OS-7001"
# What the register makes of each odd case, by the seed's code for them.
ODD_STATES = {
    "S91": "suspended",
    "S92": "erased",
    "S93": "not_on_register",
    "S94": "invalid_number",
    "S95": "missing_number",
}


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


def test_a_booking_waits_for_the_clinicians_and_for_the_register(store: Store, sycle: SycleSandbox) -> None:
    """Before the practice's clinicians are read, and while the register cannot answer, a booking
    naming a clinician waits (retried) rather than reaching the PMS unchecked."""
    from nvc_pipelines.retry import outbox_retries

    _connect(store, sycle, "goc-wait")
    booking = BookingRequest("wait-1", "x", datetime.now(UTC), datetime.now(UTC), "eye_test", "01-12345")
    with pytest.raises(ClinicianRefused) as unread:
        goc.vet_booking(store, "goc-wait", booking, GocRegister(None).lookup)
    assert unread.value.problem == "clinicians_not_read" and "next sync" in str(unread.value)
    listed = Clinician("goc-wait", "2803-S01", "Olu Optom", "01 12345", "Optometrist")
    goc.save(store, "goc-wait", [goc.check(listed, GocRegister(None).lookup)])
    with pytest.raises(ClinicianRefused) as refused:
        goc.vet_booking(store, "goc-wait", booking, GocRegister(None).lookup)  # named by GOC number
    assert refused.value.problem == "register_unavailable" and "Olu Optom" in str(refused.value)
    assert outbox_retries("register_unavailable") and outbox_retries("clinicians_not_read")
    assert not outbox_retries("clinician_not_registered") and not outbox_retries("clinician_unknown")


# --- Acuitas and Optisoft: their own clinician lists, with the odd cases -----------------------------


@pytest.fixture(scope="module")
def acuitas() -> Iterator[AcuitasSandbox]:
    with AcuitasSandbox(databases={ACUITAS_DB: 8}, rate_limit_per_second=0) as server:
        yield server


@pytest.fixture(scope="module")
def optisoft() -> Iterator[OptisoftSandbox]:
    with OptisoftSandbox(practices={OPTISOFT_CODE: 8}) as server:
        yield server


def _pms_practice(store: Store, request: pytest.FixtureRequest, kind: str) -> tuple[str, object, dict[str, str]]:
    """Connect a practice on the PMS's sandbox: (practice id, sandbox, the seed's code -> its reference
    for every clinician and odd case the PMS lists)."""
    practice_id = f"goc-{kind}"
    if kind == "acuitas":
        server: AcuitasSandbox = request.getfixturevalue("acuitas")
        settings = {"server_url": server.url, "database": ACUITAS_DB}
        secrets = {"api_username": "nvc_api", "api_password": server.users["nvc_api"][0]}
        refs = {c.code: code for code, c in server.optom_codes(ACUITAS_DB).items()}
        refs |= {s.code: code for code, s in server.staff_codes(ACUITAS_DB).items()}
        store.add_practice(practice_id, "GOC Acuitas", PmsKind.ACUITAS, settings, secrets, replace=True)
        return practice_id, server, refs
    optisoft: OptisoftSandbox = request.getfixturevalue("optisoft")
    username, (password, _) = next(iter(DEFAULT_DB_USERS.items()))
    settings = {"server_address": optisoft.url, "practice_code": OPTISOFT_CODE}
    secrets = {"db_username": username, "db_password": password}
    store.add_practice(practice_id, "GOC Optisoft", PmsKind.OPTISOFT, settings, secrets, replace=True)
    rows = optisoft.select(OPTISOFT_CODE, "SELECT ClinicianID, Name, GOCNumber, Active FROM Clinicians")
    odd = {s.name: s.code for s in ODD_STAFF}
    refs = {
        odd.get(r["Name"], f"C{r['ClinicianID']:02d}"): r["GOCNumber"] or f"clinician-{r['ClinicianID']}"
        for r in rows
        if r["Active"]
    }
    return practice_id, optisoft, refs


def _register_for(server: object, kind: str) -> GocSandbox:
    """Every seeded clinician registered; the odd cases as `ODD_STAFF` says."""
    if kind == "acuitas":
        entries = registrants_for(server.optom_codes(ACUITAS_DB).values())  # type: ignore[attr-defined]
    else:
        odd = {s.goc_number for s in ODD_STAFF}
        rows = server.select(OPTISOFT_CODE, "SELECT Name, GOCNumber, Active FROM Clinicians")  # type: ignore[attr-defined]
        entries = {
            r["GOCNumber"]: Registrant(r["GOCNumber"], r["Name"], "optometrist" if r["GOCNumber"][:3] == "01-" else
                                       "dispensing_optician")
            for r in rows
            if r["GOCNumber"] not in odd
        }  # fmt: skip
    return GocSandbox(registrants=entries | registrants_for_staff(ODD_STAFF))


def _sync_clinicians(instance, practice_id: str, database_url: str, register: GocSandbox) -> dict:
    instance.add_dynamic_partitions("practices", [practice_id])
    result = materialize(
        [clinicians_asset], partition_key=practice_id, instance=instance, resources=_resources(database_url, register)
    )
    assert result.success
    return {k: v.value for k, v in result.asset_materializations_for_node("clinicians")[0].metadata.items()}


@pytest.mark.parametrize("kind", ["acuitas", "optisoft"])
def test_acuitas_and_optisoft_list_their_clinicians_and_the_sync_flags_the_odd_ones(
    store: Store, database_url: str, request: pytest.FixtureRequest, kind: str
) -> None:
    practice_id, server, refs = _pms_practice(store, request, kind)
    resource = getattr(pms_gateway(), kind)
    with resource.open(store.get_practice(practice_id), store.practice_credentials(practice_id)) as client:
        assert isinstance(client, ClinicianSource)
        listed = {c.pms_clinician_ref: c for c in client.read_clinicians()}
    assert set(listed) == set(refs.values())  # Optisoft's leaver (not active) is not listed
    typed = {s.code: s.goc_number for s in ODD_STAFF}
    assert {code: listed[refs[code]].goc_number for code in ODD_STATES} == typed  # as the practice typed them
    with _register_for(server, kind) as register, instance_for_test() as instance:
        meta = _sync_clinicians(instance, practice_id, database_url, register)
    seeded = len(refs) - len(ODD_STATES)
    assert meta["clinicians"] == len(refs) and meta["flagged"] == len(ODD_STATES)
    assert meta["by_state"] == {"registered": seeded, **{state: 1 for state in ODD_STATES.values()}}
    assert meta["goc_register"] == "configured"
    flags = {f["ref"]: f["state"] for f in meta["flags"]}
    assert flags == {refs[code]: state for code, state in ODD_STATES.items()}
    states = {c.pms_clinician_ref: c for c in goc.load(store, practice_id, listed_only=True)}
    assert states[refs["S94"]].state == "invalid_number" and "O1-27735" in states[refs["S94"]].reason
    out = CliRunner().invoke(main, ["clinicians", practice_id], catch_exceptions=False).output
    assert f"{len(ODD_STATES)} clinician(s) flagged" in out
    assert all(state in out for state in ODD_STATES.values())


def _in_pms(kind: str, server: object, practice_id: str) -> dict[str, str | None]:
    """NVC's bookings in the PMS: idempotency key -> the clinician the PMS booked them with."""
    if kind == "acuitas":
        return {a["nvc_reference"]: a["optom"] for a in server.nvc_appointments(ACUITAS_DB)}  # type: ignore[attr-defined]
    rows = server.select(  # type: ignore[attr-defined]
        OPTISOFT_CODE,
        "SELECT d.Comment, c.GOCNumber FROM Diary d JOIN Clinicians c ON c.ClinicianID = d.ClinicianID"
        " WHERE instr(d.Comment, '[NVC:') > 0",
    )
    return {r["Comment"].split("[NVC:")[1].split("]")[0]: r["GOCNumber"] for r in rows}


@pytest.mark.parametrize("kind", ["acuitas", "optisoft"])
def test_a_booking_reaches_the_pms_under_its_own_reference_only_when_the_clinician_may_take_it(
    store: Store, database_url: str, request: pytest.FixtureRequest, kind: str
) -> None:
    practice_id, server, refs = _pms_practice(store, request, kind)
    if kind == "acuitas":
        pids = sorted(server.patients(ACUITAS_DB))  # type: ignore[attr-defined]
        numbers = {code: c.goc_number for code, c in server.optom_codes(ACUITAS_DB).items()}  # type: ignore[attr-defined]
        unlisted = "ZZZ"
    else:
        pids = [str(r["PatientID"]) for r in server.select(OPTISOFT_CODE, "SELECT PatientID FROM Patients")]  # type: ignore[attr-defined]
        numbers = {n: n for n in refs.values() if n[:3] in ("01-", "02-")}
        leaver = server.select(OPTISOFT_CODE, "SELECT GOCNumber FROM Clinicians WHERE Active = 0")  # type: ignore[attr-defined]
        unlisted = leaver[0]["GOCNumber"]  # on file, and registered, but has left: Optisoft lists them no more
    odd = {refs[code] for code in ODD_STATES}
    optometrists = [ref for ref, n in numbers.items() if ref not in odd and n.startswith("01-")]
    by_number, by_ref = numbers[optometrists[0]], optometrists[1]
    cases = {
        "by-number": (by_number, optometrists[0]),  # named by GOC number: booked as the PMS names them
        "by-ref": (by_ref, by_ref),
        "suspended": (refs["S91"], None),
        "erased": (refs["S92"], None),
        "not-on-register": (refs["S93"], None),
        "mistyped": (refs["S94"], None),
        "no-number": (refs["S95"], None),
        "unlisted": (unlisted, None),
    }
    with _register_for(server, kind) as register, instance_for_test() as instance:
        if kind == "optisoft":
            register.add(Registrant(unlisted, "Locum Optometrist (left)", "optometrist"))
        _sync_clinicians(instance, practice_id, database_url, register)
        for i, (key, (ref, _)) in enumerate(cases.items()):
            writeback.add_booking(store, practice_id, *_booking(f"{kind}-{key}", pids[i], ref, i=2 * i + 20))
        run = materialize(
            [booking_writebacks],
            partition_key=practice_id,
            instance=instance,
            resources=_resources(database_url, register),
        )
    rows = {r["idempotency_key"].split("-", 1)[1]: r for r in writeback.outbox_rows(store, practice_id)}
    made = {k.split("-", 1)[1]: who for k, who in _in_pms(kind, server, practice_id).items() if k.startswith(kind)}
    assert made == {"by-number": cases["by-number"][1], "by-ref": by_ref}  # nothing refused reached the PMS
    assert {k: r["status"] for k, r in rows.items()} == {
        k: "confirmed" if w else "failed" for k, (_, w) in cases.items()
    }
    problems = {k: r["problem"] for k, r in rows.items() if r["status"] == "failed"}
    assert problems == {
        "suspended": "clinician_not_registered",
        "erased": "clinician_not_registered",
        "not-on-register": "clinician_not_registered",
        "mistyped": "clinician_not_registered",
        "no-number": "clinician_not_registered",
        "unlisted": "clinician_unknown",
    }
    assert "suspended" in rows["suspended"]["last_error"] and "no GOC number" in rows["no-number"]["last_error"]
    assert not run.success or run.get_asset_check_evaluations()[0].passed is False


# --- no register configured: said at once ---------------------------------------------------------------


def test_without_a_register_the_sync_and_connect_say_so_at_once(
    store: Store, database_url: str, sycle: SycleSandbox, register: GocSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NVC_GOC_REGISTER_URL", raising=False)
    _connect(store, sycle, "goc-none")
    resources = {**_resources(database_url, register), "goc_register": GocRegisterResource()}
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["goc-none"])
        result = materialize([clinicians_asset], partition_key="goc-none", instance=instance, resources=resources)
        assert result.success
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
    meta = {k: v.value for k, v in result.asset_materializations_for_node("clinicians")[0].metadata.items()}
    assert "no GOC register is configured" in meta["goc_register"]
    assert meta["by_state"].get("unverified", 0) >= len(_optometrists(sycle))
    assert any("no GOC register is configured" in m and "dead-letters" in m for m in logged), logged

    args = ["practice", "connect", "goc-connect", "--pms", "sycle", "--setting", f"account_url={sycle.url}"]
    args += ["--setting", f"location_id={CLINIC}"]
    env = {"NVC_PMS_API_USERNAME": DEMO_USERNAME, "NVC_PMS_API_PASSWORD": DEMO_PASSWORD}
    unset = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert unset.exit_code == 0, unset.output
    warnings = [line for line in unset.output.splitlines() if "GOC register" in line]
    assert len(warnings) == 1 and warnings[0].startswith("Warning: no GOC register is configured"), unset.output

    # Configured: connect says nothing of it, and `nvc clinicians --refresh` (outside any Dagster run)
    # checks against the register it names.
    monkeypatch.setenv("NVC_GOC_REGISTER_URL", register.url)
    again = CliRunner().invoke(main, [*args, "--update"], env=env, catch_exceptions=False)
    assert again.exit_code == 0 and "GOC register" not in again.output, again.output
    lookups = register.lookups()
    refreshed = CliRunner().invoke(main, ["clinicians", "goc-connect", "--refresh", "--format", "json"])
    assert refreshed.exit_code == 0, refreshed.output
    assert register.lookups() > lookups
    states = {c["goc_number"]: c["state"] for c in json.loads(refreshed.output)}
    assert all(states[n] == "registered" for _, n in _optometrists(sycle))
