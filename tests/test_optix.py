"""Optix: the resource against the Optix sandbox over real loopback HTTP, the shared PMS contract,
and the shared seed data."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import phonenumbers
import pytest

from nvc_pipelines.model import (
    AppointmentStatus,
    BookingRequest,
    Channel,
    NoteKind,
    NoteResult,
    PatientNote,
    PatientStatus,
    PhoneType,
    PmsKind,
    Practice,
)
from nvc_pipelines.normalise import (
    InvalidValue,
    build_appointment,
    build_clinical,
    build_patient,
    is_ofcom_drama_number,
    normalise_phone,
)
from resources.optix import (
    OptixClient,
    OptixResource,
    optix_appointment_draft,
    optix_clinical_draft,
    optix_draft,
)
from resources.protocol import PmsClient, PmsConnectionFailed, PmsError
from sandboxes import seed as seed_module
from sandboxes.optix import OptixSandbox
from sandboxes.seed import seed_patients
from tests.pms_contract import PmsContract

KEY = "optix-key-7Qx9-test-secret"  # distinctive, so a leak into a message or log is easy to spot
OTHER_KEY = "optix-key-other-practice-3Fz"
DISABLED_KEY = "optix-key-disabled-practice-8Lm"
WRONG_KEY = "optix-key-typo-0000-never-valid"
SECRETS = (KEY, OTHER_KEY, DISABLED_KEY, WRONG_KEY)


@pytest.fixture(scope="module")
def running_sandbox() -> Iterator[OptixSandbox]:
    """One server for the module: stopping one waits out the server loop's half-second poll."""
    server = OptixSandbox(
        practices={"OPX-1001": 50, "OPX-2002": 300, "OPX-3003": 5},
        api_keys={KEY: "OPX-1001", OTHER_KEY: "OPX-2002", DISABLED_KEY: "OPX-3003"},
    )
    server.api_access_disabled.add("OPX-3003")
    with server:
        yield server


@pytest.fixture
def sandbox(running_sandbox: OptixSandbox) -> OptixSandbox:
    """The shared server with no faults, an empty request log and a full rate-limit bucket (tests compare against its current data)."""
    running_sandbox.reset()
    return running_sandbox


def practice(url: str, optix_practice_id: str = "OPX-1001") -> Practice:
    return Practice(
        practice_id="demo-optix",
        display_name="Demo",
        pms_kind=PmsKind.OPTIX,
        settings={"practice_id": optix_practice_id, "api_url": url},
        status="connected",
    )


def open_client(url: str, optix_practice_id: str = "OPX-1001", key: str = KEY, **config: float | int) -> OptixClient:
    resource = OptixResource(**{"page_size": 7, "max_attempts": 3, "backoff_seconds": 0.01, **config})
    return resource.open(practice(url, optix_practice_id), {"api_key": key})


def e164(national: str) -> str:
    return "+44" + national.replace(" ", "")[1:]


def patient_pages(server: OptixSandbox) -> int:
    return sum(1 for method, path in server.request_log if method == "GET" and path.endswith("/patients"))


# --- reading -------------------------------------------------------------------------------------------


def test_connection_names_the_practice(sandbox: OptixSandbox) -> None:
    with open_client(sandbox.url) as client:
        assert isinstance(client, PmsClient)
        info = client.test_connection()
    assert info.pms == "Optix"
    assert info.practice_name
    assert "OPX-1001" in info.detail


def test_full_read_returns_every_patient_normalised(sandbox: OptixSandbox) -> None:
    seeded = {f"P{p.index:07d}": p for p in sandbox.patients("OPX-2002")}
    with open_client(sandbox.url, "OPX-2002", OTHER_KEY, page_size=500) as client:
        result = client.read_patients(None, date.today())

    assert result.rejected == []
    assert {p.pms_patient_id for p in result.patients} == set(seeded)
    for patient in result.patients:
        seed = seeded[patient.pms_patient_id]
        assert patient.practice_id == "demo-optix"
        assert (patient.first_name, patient.last_name) == (seed.first_name, seed.last_name)
        expected_phones = [e164(n) for n in (seed.mobile, seed.landline) if n]
        assert [p.e164 for p in patient.phones] == expected_phones
        assert all(p.e164.startswith("+44") and p.e164[1:].isdigit() for p in patient.phones)
        assert patient.phones[:1] == [] or patient.phones[0].type == (
            PhoneType.MOBILE if seed.mobile else PhoneType.LANDLINE
        )
        assert patient.risk_flags == sorted(seed.flags)
        assert patient.unknown_risk_values == []
        assert patient.pms_recall_due_date == seed.recall_due
        assert patient.last_eye_test_date == seed.last_eye_test
        assert patient.date_of_birth == seed.date_of_birth
        assert patient.source_updated_at is not None and patient.source_updated_at.tzinfo is not None
        assert patient.address and seed.postcode in patient.address
    # The practice is big enough that the interesting cases are really exercised.
    assert sum(1 for p in result.patients if p.risk_flags) > 10
    assert sum(1 for p in result.patients if p.pms_recall_due_date) > 30
    assert sum(1 for p in result.patients if not p.phones) >= 1
    assert result.source_ref == "optix:OPX-2002 full"


def test_unknown_flag_codes_are_kept_raw(sandbox: OptixSandbox) -> None:
    sandbox.update_patient("OPX-1001", "P0000003", flags=["diabetic", "CLW"])
    with open_client(sandbox.url) as client:
        patient = next(p for p in client.read_patients(None, date.today()).patients if p.pms_patient_id == "P0000003")
    assert patient.risk_flags == ["diabetic"]
    assert patient.unknown_risk_values == ["CLW"]


def test_paging_reads_every_patient_exactly_once(sandbox: OptixSandbox) -> None:
    with open_client(sandbox.url, page_size=7) as client:
        result = client.read_patients(None, date.today())
    ids = [p.pms_patient_id for p in result.patients]
    assert len(ids) == len(set(ids)) == 50
    assert result.rejected == []
    assert patient_pages(sandbox) == math.ceil(50 / 7)


def test_cursor_is_stable_when_a_patient_changes_mid_sync(sandbox: OptixSandbox) -> None:
    with open_client(sandbox.url, page_size=7) as client:
        rows = client.iter_patient_rows(None)
        first_page = [next(rows) for _ in range(7)]
        edited = first_page[0]["patientId"]
        sandbox.update_patient("OPX-1001", edited, mobile="07700 900999")
        rest = list(rows)
    ids = [r["patientId"] for r in first_page + rest]
    assert Counter(ids) == Counter({pid: 2 if pid == edited else 1 for pid in set(ids)})
    assert len(set(ids)) == 50
    assert rest[-1]["patientId"] == edited and rest[-1]["contact"]["mobile"] == "07700 900999"


def test_incremental_read_returns_only_changed_patients(sandbox: OptixSandbox) -> None:
    with open_client(sandbox.url) as client:
        assert len(client.read_patients(None, date.today()).patients) == 50
        before = datetime.now(UTC)
        touched = sandbox.touch("OPX-1001", 0.1)
        assert len(touched) == 5
        changed = client.read_patients(before, date.today())
        assert sorted(p.pms_patient_id for p in changed.patients) == touched
        assert changed.source_ref.startswith("optix:OPX-1001 since ")
        current = {f"P{p.index:07d}": p for p in sandbox.patients("OPX-1001")}
        for patient in changed.patients:
            seed = current[patient.pms_patient_id]
            assert [p.e164 for p in patient.phones] == [e164(n) for n in (seed.mobile, seed.landline) if n]
            assert patient.last_eye_test_date == seed.last_eye_test
        assert client.read_patients(datetime.now(UTC) + timedelta(seconds=1), date.today()).patients == []
        assert len(client.read_patients(None, date.today()).patients) == 50


# --- status, contact preferences and guardians --------------------------------------------------------


def optix_patient(**row: object):
    """One Optix patient row (with `row` over the defaults) through the client's translation and the
    shared normalisation."""
    base = {"patientId": "P1", "forename": "Ann", "surname": "Lee", "contact": {"mobile": "07700 900123"}}
    return build_patient("demo-optix", optix_draft({**base, **row}), date.today(), strict=False)


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("Active", PatientStatus.ACTIVE),
        ("Deceased", PatientStatus.DECEASED),
        ("GoneAway", PatientStatus.GONE_AWAY),
        ("Gone Away", PatientStatus.GONE_AWAY),
        ("GONE_AWAY", PatientStatus.GONE_AWAY),
        ("Archived", PatientStatus.INACTIVE),
        ("archived", PatientStatus.INACTIVE),
        (None, PatientStatus.ACTIVE),  # an Optix without the field: nothing says otherwise
        ("", PatientStatus.ACTIVE),
    ],
)
def test_each_optix_status_word(word: str | None, status: PatientStatus) -> None:
    assert optix_patient(status=word).status == status


def test_an_unknown_optix_status_is_refused_by_name() -> None:
    with pytest.raises(InvalidValue, match="patient status 'Merged' is not known"):
        optix_patient(status="Merged")


def test_a_date_of_death_means_deceased() -> None:
    died = date.today() - timedelta(days=3)
    patient = optix_patient(status="Deceased", deceasedDate=died.isoformat())
    assert (patient.status, patient.status_date) == (PatientStatus.DECEASED, died)
    # A receptionist who typed the date but left the status alone: the date wins.
    assert optix_patient(status="Active", deceasedDate=died.isoformat()).status == PatientStatus.DECEASED
    assert optix_patient(status="Deceased", deceasedDate=None).status_date is None
    # A date Optix holds that cannot be a date of death: still deceased, without the date.
    for bad in ((date.today() + timedelta(days=1)).isoformat(), "unknown"):
        patient = optix_patient(status="Active", deceasedDate=bad)
        assert (patient.status, patient.status_date) == (PatientStatus.DECEASED, None)


def test_no_contact_preferences_means_nothing_recorded() -> None:
    for prefs in ({}, {"contactPreferences": None}):
        contact = optix_patient(**prefs).contact
        assert (contact.phone_recall, contact.no_recall, contact.channels) == (True, False, None)
        assert contact.may_phone


def test_contact_preferences_in_optix_words() -> None:
    def contact(**prefs: object):
        return optix_patient(contactPreferences=prefs).contact

    everything = contact(phoneRecall=True, smsConsent=True, emailConsent=True, excludeFromRecalls=False)
    assert everything.channels == {Channel.PHONE, Channel.SMS, Channel.EMAIL} and everything.may_phone
    no_phone = contact(phoneRecall=False, smsConsent=True, emailConsent=None, excludeFromRecalls=False)
    assert no_phone.phone_recall is False and not no_phone.may_phone
    assert no_phone.channels == {Channel.SMS}
    asked_nothing = contact(phoneRecall=True, smsConsent=None, emailConsent=False)
    assert asked_nothing.channels == {Channel.PHONE} and asked_nothing.may_phone
    excluded = contact(phoneRecall=True, excludeFromRecalls=True)
    assert excluded.no_recall and excluded.phone_recall and not excluded.may_phone
    # Not a yes/no: read the safe way (no phoning, no consent, excluded), never as permission.
    garbled = contact(phoneRecall="maybe", smsConsent="?", excludeFromRecalls="unsure")
    assert (garbled.phone_recall, garbled.no_recall, garbled.channels) == (False, True, frozenset())
    assert contact(phoneRecall="no", smsConsent="yes").channels == {Channel.SMS}


def test_responsible_adult_is_the_guardian() -> None:
    adult = {"name": "Mrs  Jane Smith", "relationship": "Parent/Guardian"}
    assert optix_patient(responsibleAdult=adult).guardian_name == "Mrs Jane Smith"
    split = {"title": "Mr", "forename": "Rhys", "surname": "Ap Rhys", "relationship": "Father"}
    assert optix_patient(responsibleAdult=split).guardian_name == "Mr Rhys Ap Rhys"
    assert optix_patient(responsibleAdult=None).guardian_name is None
    assert optix_patient().guardian_name is None
    assert optix_patient(responsibleAdult={"name": "  "}).guardian_name is None


def test_sandbox_renders_contact_in_optix_words(sandbox: OptixSandbox) -> None:
    rows = {}
    with httpx.Client(headers={"Authorization": f"Bearer {OTHER_KEY}"}) as http:
        for row in http.get(f"{sandbox.url}/api/v2/practices/OPX-2002/patients", params={"limit": 1000}).json()["data"]:
            rows[row["patientId"]] = row
    truth = sandbox.seed_records("OPX-2002")
    assert set(rows) == set(truth)
    assert {row["status"] for row in rows.values()} == {"Active", "Deceased", "GoneAway", "Archived"}
    for pid, row in rows.items():
        seed = truth[pid]
        assert (row["deceasedDate"] is not None) == (seed.status == "deceased" and seed.status_date is not None)
        prefs = row["contactPreferences"]
        if prefs is None:
            assert seed.phone_recall and not seed.no_recall and seed.sms_consent is seed.email_consent is None
        else:
            assert set(prefs) == {"phoneRecall", "smsConsent", "emailConsent", "excludeFromRecalls"}
            assert prefs["phoneRecall"] == seed.phone_recall and prefs["excludeFromRecalls"] == seed.no_recall
        adult = row["responsibleAdult"]
        assert (adult["name"] if adult else None) == seed.guardian_name
    assert any(row["contactPreferences"] is None for row in rows.values())
    assert any(row["responsibleAdult"] for row in rows.values())


def test_deceased_and_opted_out_mid_day_arrive_on_the_next_incremental_read(sandbox: OptixSandbox) -> None:
    died = date.today() - timedelta(days=1)
    with open_client(sandbox.url) as client:
        before = client.read_patients(None, date.today()).patients
        callable_adults = sorted(
            p.pms_patient_id
            for p in before
            if p.status == PatientStatus.ACTIVE and p.contact.may_phone and p.guardian_name is None
        )
        dies, objects, child = callable_adults[-3:]
        since = datetime.now(UTC)
        sandbox.update_patient("OPX-1001", dies, status="deceased", status_date=died)
        sandbox.update_patient("OPX-1001", objects, phone_recall=False, no_recall=True, sms_consent=False)
        sandbox.update_patient("OPX-1001", child, guardian_name="Ms Kerry O'Neill")
        changed = {p.pms_patient_id: p for p in client.read_patients(since, date.today()).patients}
    assert set(changed) == {dies, objects, child}
    assert (changed[dies].status, changed[dies].status_date) == (PatientStatus.DECEASED, died)
    opted_out = changed[objects].contact
    assert (opted_out.phone_recall, opted_out.no_recall, opted_out.may_phone) == (False, True, False)
    assert opted_out.channels is not None and Channel.SMS not in opted_out.channels
    assert changed[child].guardian_name == "Ms Kerry O'Neill"
    stamps = [changed[pid].source_updated_at for pid in changed]
    assert all(stamp is not None and stamp >= since - timedelta(milliseconds=1) for stamp in stamps)  # Optix: ms


def test_an_optix_status_word_nvc_does_not_know_is_a_rejected_row(sandbox: OptixSandbox) -> None:
    was = sandbox.seed_records("OPX-1001")["P0000043"].status
    with open_client(sandbox.url) as client:
        since = datetime.now(UTC)
        sandbox.update_patient("OPX-1001", "P0000043", status="Merged")
        try:
            result = client.read_patients(since, date.today())
        finally:
            sandbox.update_patient("OPX-1001", "P0000043", status=was)
    assert result.patients == []
    assert [(r.row_ref, r.raw["status"]) for r in result.rejected] == [("optix:P0000043", "Merged")]
    assert "patient status 'Merged' is not known" in result.rejected[0].reason


def test_429_with_retry_after_is_retried_and_the_read_completes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resources.optix")
    # A bucket of 5 requests a second and 10 pages: the 6th request gets a 429 with Retry-After: 1.
    with OptixSandbox(api_keys={KEY: "OPX-1001"}, rate_limit_per_second=5) as server:
        with open_client(server.url, page_size=5, max_attempts=5) as client:
            result = client.read_patients(None, date.today())
        throttled = server.throttled
    assert len({p.pms_patient_id for p in result.patients}) == 50
    assert result.rejected == []
    assert throttled >= 1
    assert "HTTP 429" in caplog.text
    assert not any(secret in caplog.text for secret in SECRETS)


def test_a_reset_refills_the_rate_limit_bucket_a_previous_test_drained() -> None:
    # Shared sandboxes are reset between tests; a bucket left empty made the next test's first
    # request a 429 (an Acuitas connection test once failed as "rate_limited" in CI for that).
    with OptixSandbox(api_keys={KEY: "OPX-1001"}, rate_limit_per_second=2) as server:
        waits = [server._rate_limited() for _ in range(3)]
        assert waits[:2] == [None, None] and waits[2] is not None
        server.faults.rate_500 = 1.0
        server.reset()
        assert server._rate_limited() is None and server._rate_limited() is None
        assert server.faults.rate_500 == 0 and server.throttled == 0 and server.request_log == []


def test_rate_limit_that_never_lifts_fails_as_rate_limited(sandbox: OptixSandbox) -> None:
    sandbox.faults.rate_429 = 1.0
    with open_client(sandbox.url, max_attempts=2) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.read_patients(None, date.today())
    assert failure.value.problem == "rate_limited"
    assert sandbox.throttled == 2


def test_server_errors_after_retries_fail_as_pms_error(sandbox: OptixSandbox) -> None:
    sandbox.faults.rate_500 = 1.0
    with open_client(sandbox.url, max_attempts=2) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.test_connection()
    assert failure.value.problem == "pms_error"
    assert "HTTP 500" in str(failure.value) and "internal_error" in str(failure.value)


def test_a_slow_server_fails_as_unreachable(sandbox: OptixSandbox) -> None:
    sandbox.faults.latency_seconds = 0.3
    with (
        open_client(sandbox.url, timeout_seconds=0.1, max_attempts=1) as client,
        pytest.raises(PmsConnectionFailed) as failure,
    ):
        client.test_connection()
    assert failure.value.problem == "unreachable"
    assert "timed out" in str(failure.value)


# --- connection failures -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "optix_practice_id", "key", "problem"),
    [
        ("wrong key", "OPX-1001", WRONG_KEY, "invalid_credentials"),
        ("other practice's id", "OPX-2002", KEY, "practice_not_found"),
        ("unknown practice", "OPX-9999", KEY, "practice_not_found"),
        ("api access disabled", "OPX-3003", DISABLED_KEY, "api_access_disabled"),
        ("nothing listening", "OPX-1001", KEY, "unreachable"),
    ],
)
def test_connection_failures_say_what_to_check(
    sandbox: OptixSandbox, case: str, optix_practice_id: str, key: str, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{free_port()}" if case == "nothing listening" else sandbox.url
    with open_client(url, optix_practice_id, key, max_attempts=1) as client:
        with pytest.raises(PmsConnectionFailed) as failure:
            client.test_connection()
        with pytest.raises(PmsConnectionFailed) as read_failure:
            client.read_patients(None, date.today())
    error = failure.value
    assert error.problem == read_failure.value.problem == problem
    assert error.pms == "Optix" and error.practice_id == "demo-optix"
    assert error.check
    text = f"{error} {read_failure.value} {caplog.text}"
    assert not any(secret in text for secret in SECRETS)


def test_invalid_credentials_message_points_at_the_key(sandbox: OptixSandbox) -> None:
    with open_client(sandbox.url, key=WRONG_KEY) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.test_connection()
    assert "The API key was rejected" in str(failure.value)
    assert "Optix > Settings > Integrations" in failure.value.check


@pytest.mark.parametrize("url", ["http://optix.example.com", "ftp://127.0.0.1/", "not a url"])
def test_unsafe_urls_are_refused_before_any_request(url: str) -> None:
    with pytest.raises(PmsConnectionFailed) as failure:
        open_client(url)
    assert failure.value.problem == "unsafe_url"
    assert KEY not in str(failure.value)


def test_missing_settings_and_secrets_are_named() -> None:
    resource = OptixResource()
    assert resource.required_settings() == ("practice_id",)
    assert resource.optional_settings() == ("api_url", "ca_bundle")
    assert resource.required_secrets() == ("api_key",)
    with pytest.raises(PmsConnectionFailed) as failure:
        resource.open(practice("https://api.optix.cloud", ""), {"api_key": KEY})
    assert failure.value.problem == "missing_setting"
    with pytest.raises(PmsConnectionFailed) as failure:
        resource.open(practice("https://api.optix.cloud"), {})
    assert failure.value.problem == "missing_secret"


def test_the_client_never_deletes(sandbox: OptixSandbox) -> None:
    with open_client(sandbox.url) as client:
        client.test_connection()
        client.read_patients(None, date.today())
        sandbox.touch("OPX-1001", 3)
        client.read_patients(datetime.now(UTC) - timedelta(minutes=1), date.today())
        client.read_appointments(None)
        client.read_clinical_records(None)
        client.create_appointment(booking("P0000001", "never-deletes", 0, days_ahead=600))
        client.add_note(PatientNote("never-deletes-note", "P0000001", NoteKind.CALL_ATTEMPT, NOW, "No answer"))
    assert sandbox.request_log
    assert {method for method, _ in sandbox.request_log} == {"GET", "POST"}
    assert not any(name.startswith(("delete", "remove")) for name in dir(OptixClient))


# --- appointments and clinical records ---------------------------------------------------------------

UK = ZoneInfo("Europe/London")
NOW = datetime.now(UTC).replace(microsecond=0)


def test_appointments_are_read_in_utc_with_statuses_and_types_mapped(sandbox: OptixSandbox) -> None:
    rendered = {row["appointmentId"]: row for row in sandbox.appointments("OPX-2002")}
    with open_client(sandbox.url, "OPX-2002", OTHER_KEY, page_size=100) as client:
        batch = client.read_appointments(None)
    assert batch.rejected == []
    assert batch.source_ref == "optix:OPX-2002 appointments full"
    assert {a.pms_appointment_id for a in batch.records} == set(rendered)
    optix_status = {"Booked": "booked", "Completed": "completed", "Cancelled": "cancelled", "DNA": "no_show"}
    optix_type = {"SIGHT_TEST": "eye_test", "CL_CHECK": "contact_lens"}
    for appointment in batch.records:
        row = rendered[appointment.pms_appointment_id]
        assert row["start"].endswith("Z")
        assert appointment.starts_at.utcoffset() == timedelta(0)
        assert appointment.ends_at - appointment.starts_at == timedelta(minutes=row["durationMinutes"])
        assert appointment.status == optix_status[row["status"]]
        assert appointment.appointment_type == optix_type[row["type"]]
        assert appointment.pms_patient_id == row["patientId"] and appointment.clinician == row["clinicianId"]
        assert appointment.nvc_reference is None
        # The diary is kept in UK wall-clock time: 09:00-16:30 locally, whatever the UTC hour.
        local = appointment.starts_at.astimezone(UK)
        assert 9 <= local.hour < 17 and local.minute in (0, 30)
    statuses = Counter(a.status for a in batch.records)
    assert set(statuses) == set(AppointmentStatus)
    summer = [a for a in batch.records if a.starts_at.astimezone(UK).dst()]
    assert summer and all(a.starts_at.hour == a.starts_at.astimezone(UK).hour - 1 for a in summer)


def test_appointment_rows_in_every_optix_shape() -> None:
    def build(**row):
        base = {"appointmentId": "A1", "patientId": "P1", "start": "2025-07-01T08:00:00.000Z", "durationMinutes": 30}
        return build_appointment("demo-optix", optix_appointment_draft({**base, **row}))

    assert build(status="Arrived").status == AppointmentStatus.BOOKED
    assert build(status="DNA").status == AppointmentStatus.NO_SHOW
    assert build(status="Completed", type="COLLECTION").appointment_type == "collection"
    assert build(status="Booked", type="DOMICILIARY").appointment_type == "other"
    linked = build(status="Booked", externalReference="[NVC:call-42.bk]")
    assert linked.nvc_reference == "call-42.bk"
    assert build(status="Booked", externalReference="their own ref").nvc_reference is None
    with pytest.raises(ValueError, match="status 'Rescheduled' is not known"):
        build(status="Rescheduled")


def test_appointments_page_and_read_incrementally(sandbox: OptixSandbox) -> None:
    total = len(sandbox.appointments("OPX-1001"))
    with open_client(sandbox.url, page_size=7) as client:
        before = datetime.now(UTC)
        full = client.read_appointments(None)
        assert full.rows_read == total and full.rejected == []
        pages = sum(1 for m, path in sandbox.request_log if m == "GET" and path.endswith("/appointments"))
        assert pages == math.ceil(total / 7)
        made = client.create_appointment(booking("P0000004", "incremental-bk", 0, days_ahead=500))
        changed = client.read_appointments(before)
    assert [a.pms_appointment_id for a in changed.records] == [made.pms_appointment_id]
    assert changed.records[0].nvc_reference == "incremental-bk"
    assert changed.source_ref.startswith("optix:OPX-1001 appointments since ")


def test_clinical_records_map_optix_flag_codes(sandbox: OptixSandbox) -> None:
    rendered = {row["recordId"]: row for row in sandbox.clinical_records("OPX-2002")}
    codes = {"DIAB": "diabetic", "GLAU": "glaucoma", "GLS": "glaucoma_suspect", "OHT": "ocular_hypertension"}
    codes["FHG"] = "glaucoma_family_history"
    codes |= {"BVA": "binocular_vision_anomaly", "RXC": "corrected_refractive_error", "MYP": "progressive_myopia"}
    with open_client(sandbox.url, "OPX-2002", OTHER_KEY, page_size=100) as client:
        batch = client.read_clinical_records(None)
    assert batch.rejected == [] and {r.pms_record_id for r in batch.records} == set(rendered)
    for record in batch.records:
        row = rendered[record.pms_record_id]
        assert record.flags == sorted(codes[c] for c in row["flags"])
        assert (record.iop_right_mmhg, record.iop_left_mmhg) == (row["iop"]["right"], row["iop"]["left"])
        assert record.exam_date.isoformat() == row["examDate"] and record.clinician == row["optometristId"]
    assert sum(1 for r in batch.records if r.flags) > 10
    assert any(r.iop_right_mmhg and r.iop_right_mmhg > 21 for r in batch.records if "ocular_hypertension" in r.flags)


def test_clinical_rows_keep_unknown_codes_and_refuse_bad_pressures() -> None:
    row = {"recordId": "R1", "patientId": "P1", "examDate": "2024-03-01", "flags": ["DIAB", "CLW"]}
    record = build_clinical("demo-optix", optix_clinical_draft({**row, "iop": {"right": 14.5}}), date.today())
    assert (record.flags, record.unknown_flags, record.iop_right_mmhg, record.iop_left_mmhg) == (
        ["diabetic"],
        ["CLW"],
        14.5,
        None,
    )
    with pytest.raises(ValueError, match="IOP left"):
        build_clinical("demo-optix", optix_clinical_draft({**row, "iop": {"left": "high"}}), date.today())


# --- writing: bookings and notes -----------------------------------------------------------------------


def booking(
    patient_id: str, key: str, i: int, *, clinician: str | None = None, days_ahead: int = 450, minutes: int = 30
) -> BookingRequest:
    """A booking in its own half-hour slot (`i`), far from seeded diary entries and other tests' slots."""
    day = date.today() + timedelta(days=days_ahead + i // 14)
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=9, minutes=30 * (i % 14))
    return BookingRequest(key, patient_id, start, start + timedelta(minutes=minutes), "eye_test", clinician, "NVC call")


class FlakyPosts(httpx.BaseTransport):
    """Real HTTP to the sandbox, except that the next POSTs get the scripted fates:
    "timeout" (never sent, answer lost), "connect" (refused), "land-then-timeout" (applied, answer
    lost), or a status code answered without reaching the sandbox."""

    def __init__(self, *fates: str | int, retry_after: str | None = None):
        self.inner = httpx.HTTPTransport()
        self.fates = list(fates)
        self.retry_after = retry_after
        self.posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return self.inner.handle_request(request)
        self.posts += 1
        fate = self.fates.pop(0) if self.fates else "pass"
        if fate == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if fate == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(fate, int):
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return httpx.Response(fate, json={"error": {"code": "busy", "message": "Try later."}}, headers=headers)
        response = self.inner.handle_request(request)
        if fate == "land-then-timeout":
            response.read()
            raise httpx.ReadTimeout("timed out", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def flaky_client(url: str, transport: FlakyPosts, max_attempts: int = 3) -> OptixClient:
    return OptixClient(
        practice(url),
        api_url=url,
        optix_practice_id="OPX-1001",
        api_key=KEY,
        page_size=100,
        timeout_seconds=5,
        max_attempts=max_attempts,
        backoff_seconds=0.01,
        transport=transport,
    )


def made_for(sandbox: OptixSandbox, key: str) -> list[dict]:
    return [a for a in sandbox.nvc_appointments("OPX-1001") if a["nvc_reference"] == key]


def test_a_booking_is_looked_up_then_posted_in_optix_shape(sandbox: OptixSandbox) -> None:
    request = booking("P0000005", "shape-bk", 1, clinician="C02")
    with open_client(sandbox.url) as client:
        result = client.create_appointment(request)
        assert result.created is True
        # looked for it first, then one POST (a lookup retried on a dropped connection, seen once under
        # a loaded CI run, adds a GET: reads are retried, writes never blindly)
        methods = [m for m, _ in sandbox.request_log]
        assert methods[-1] == "POST" and set(methods[:-1]) == {"GET"} and len(methods) <= 3
        assert client.create_appointment(request).created is False
    row = next(r for r in sandbox.appointments("OPX-1001") if r["appointmentId"] == result.pms_appointment_id)
    assert row["externalReference"] == "[NVC:shape-bk]"
    assert (row["patientId"], row["type"], row["durationMinutes"], row["clinicianId"]) == (
        "P0000005",
        "SIGHT_TEST",
        30,
        "C02",
    )
    assert row["start"] == request.starts_at.strftime("%Y-%m-%dT%H:%M:%S.000Z") and row["status"] == "Booked"
    assert made_for(sandbox, "shape-bk") == [
        {
            "pms_appointment_id": result.pms_appointment_id,
            "pms_patient_id": "P0000005",
            "starts_at": request.starts_at,
            "nvc_reference": "shape-bk",
        }
    ]


def test_a_booking_in_uk_wall_clock_time_is_sent_in_utc(sandbox: OptixSandbox) -> None:
    local = datetime.combine(date.today() + timedelta(days=700), datetime.min.time()).replace(month=7, day=1, hour=10)
    request = BookingRequest("bst-bk", "P0000006", local, local + timedelta(minutes=20), "contact_lens")
    with open_client(sandbox.url) as client:
        client.create_appointment(request)
    (made,) = made_for(sandbox, "bst-bk")
    assert made["starts_at"] == local.replace(tzinfo=UK).astimezone(UTC)
    assert made["starts_at"].hour == 9  # BST


def test_a_lost_response_after_the_booking_landed_finds_it_instead_of_booking_twice(sandbox: OptixSandbox) -> None:
    sandbox.faults.lost_response_after_write_rate = 1.0
    with open_client(sandbox.url) as client:
        result = client.create_appointment(booking("P0000007", "lost-bk", 2))
    assert result.created is True  # this call's post made it; only its answer was lost
    # a look-up, the post, a look-up that found it (a look-up retried on a dropped connection adds a GET)
    methods = [m for m, _ in sandbox.request_log]
    assert methods.count("POST") == 1 and methods[0] == methods[-1] == "GET" and len(methods) <= 5
    assert [a["pms_appointment_id"] for a in made_for(sandbox, "lost-bk")] == [result.pms_appointment_id]


def test_a_post_that_never_landed_is_posted_again(sandbox: OptixSandbox, caplog: pytest.LogCaptureFixture) -> None:
    transport = FlakyPosts("timeout", "connect")
    with flaky_client(sandbox.url, transport) as client:
        result = client.create_appointment(booking("P0000008", "retry-bk", 3))
    assert result.created is True and transport.posts == 3
    # look-up first, then a look-up after the timeout, then the post: one POST reached the PMS, last (a
    # look-up retried on a dropped connection adds a GET, seen once in a loaded CI run: reads are
    # retried, writes never blindly)
    methods = [m for m, _ in sandbox.request_log]
    assert methods[-1] == "POST" and methods.count("POST") == 1 and 2 <= methods.count("GET") <= 4
    # after the timeout it looked (the post may have landed); after the refused connection it did not
    decisions = [r.getMessage() for r in caplog.records if "retry-bk" in r.getMessage()]
    assert len(decisions) == 2
    assert decisions[0].endswith("looking for it before trying again")
    assert decisions[1].endswith("nothing was written, trying again")
    assert len(made_for(sandbox, "retry-bk")) == 1


def test_a_post_whose_answer_is_always_lost_fails_as_lost_response_after_bounded_attempts(
    sandbox: OptixSandbox,
) -> None:
    transport = FlakyPosts("timeout", "timeout", "timeout", "timeout")
    with flaky_client(sandbox.url, transport) as client, pytest.raises(PmsError) as failure:
        client.create_appointment(booking("P0000009", "never-bk", 4))
    assert failure.value.problem == "lost_response"
    assert transport.posts == 3
    assert made_for(sandbox, "never-bk") == []
    assert KEY not in str(failure.value)


def test_an_answer_lost_after_landing_is_found_on_the_next_look(sandbox: OptixSandbox) -> None:
    transport = FlakyPosts("land-then-timeout")
    with flaky_client(sandbox.url, transport) as client:
        first = client.create_appointment(booking("P0000010", "landed-bk", 5))
        again = client.create_appointment(booking("P0000010", "landed-bk", 5))
    assert (first.created, again.created) == (True, False) and transport.posts == 1
    assert first.pms_appointment_id == again.pms_appointment_id
    assert len(made_for(sandbox, "landed-bk")) == 1


def test_server_errors_on_a_post_honour_retry_after_then_book(sandbox: OptixSandbox) -> None:
    transport = FlakyPosts(503, 429, retry_after="0.2")
    with flaky_client(sandbox.url, transport) as client:
        started = time.perf_counter()
        result = client.create_appointment(booking("P0000011", "busy-bk", 6))
        elapsed = time.perf_counter() - started
    assert result.created is True and transport.posts == 3
    assert elapsed >= 0.4
    assert len(made_for(sandbox, "busy-bk")) == 1


@pytest.mark.parametrize(("status", "problem"), [(500, "pms_error"), (429, "rate_limited")])
def test_a_post_optix_keeps_refusing_fails_after_bounded_attempts(
    sandbox: OptixSandbox, status: int, problem: str
) -> None:
    transport = FlakyPosts(status, status, status, status)
    with flaky_client(sandbox.url, transport) as client, pytest.raises(PmsError) as failure:
        client.create_appointment(booking("P0000012", f"refused-{status}", 7))
    assert failure.value.problem == problem and transport.posts == 3
    assert made_for(sandbox, f"refused-{status}") == []


def test_taken_slots_are_refused_per_clinician(sandbox: OptixSandbox) -> None:
    with open_client(sandbox.url) as client:
        client.create_appointment(booking("P0000013", "slot-c01", 8, clinician="C01"))
        taken = booking("P0000014", "slot-overlap", 8, clinician="C01")
        overlap = replace(
            taken, starts_at=taken.starts_at + timedelta(minutes=15), ends_at=taken.ends_at + timedelta(minutes=15)
        )
        with pytest.raises(PmsError) as failure:
            client.create_appointment(overlap)
        assert failure.value.problem == "slot_taken"
        assert "no longer free" in str(failure.value) and failure.value.check
        # Another optometrist is free at the same time.
        assert client.create_appointment(booking("P0000014", "slot-c02", 8, clinician="C02")).created
        # Without a clinician, any booking at the same start holds the slot.
        with pytest.raises(PmsError) as failure:
            client.create_appointment(booking("P0000015", "slot-any", 8))
        assert failure.value.problem == "slot_taken"
    assert made_for(sandbox, "slot-overlap") == made_for(sandbox, "slot-any") == []


def test_concurrent_bookings_of_one_slot_land_once(sandbox: OptixSandbox) -> None:
    outcomes: list[str] = []

    def book(n: int) -> None:
        with open_client(sandbox.url) as client:
            try:
                client.create_appointment(booking(f"P00000{20 + n}", f"race-{n}", 9, clinician="C03"))
                outcomes.append("booked")
            except PmsError as exc:
                outcomes.append(exc.problem)

    threads = [threading.Thread(target=book, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["booked"] + ["slot_taken"] * 5


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"appointment_type": "other"}, "no appointment type"),
        ({"idempotency_key": "has spaces"}, "idempotency key"),
        ({"ends_at": "starts"}, "whole number of minutes"),
    ],
)
def test_bookings_optix_cannot_take_are_refused_before_sending(
    sandbox: OptixSandbox, change: dict, reason: str
) -> None:
    request = booking("P0000016", "invalid-bk", 10)
    if change.get("ends_at") == "starts":
        change = {"ends_at": request.starts_at}
    with open_client(sandbox.url) as client, pytest.raises(PmsError) as failure:
        client.create_appointment(replace(request, **change))
    assert failure.value.problem == "invalid_booking" and reason in str(failure.value)
    assert sandbox.request_log == []


def test_a_booking_optix_rejects_is_invalid_booking(sandbox: OptixSandbox) -> None:
    past = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=1)
    request = BookingRequest("past-bk", "P0000016", past, past + timedelta(minutes=30), "eye_test", "C01")
    with open_client(sandbox.url) as client, pytest.raises(PmsError) as failure:
        client.create_appointment(request)
    assert failure.value.problem == "invalid_booking"
    assert "validation_error" in str(failure.value) and "start is in the past" in str(failure.value)


def test_unknown_patients_and_wrong_keys_on_writes(sandbox: OptixSandbox) -> None:
    note = PatientNote("ghost-note", "P9999999", NoteKind.CALL_ATTEMPT, NOW, "No answer")
    with open_client(sandbox.url) as client:
        with pytest.raises(PmsError) as failure:
            client.create_appointment(booking("P9999999", "ghost-bk", 11))
        assert failure.value.problem == "patient_not_found"
        with pytest.raises(PmsError) as failure:
            client.add_note(note)
        assert failure.value.problem == "patient_not_found"
    with open_client(sandbox.url, key=WRONG_KEY) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.create_appointment(booking("P0000001", "wrong-key-bk", 11))
    assert failure.value.problem == "invalid_credentials"
    assert not any(secret in str(failure.value) for secret in SECRETS)


def test_notes_land_once_in_optix_shape(sandbox: OptixSandbox) -> None:
    outcome = PatientNote("note-outcome-1", "P0000017", NoteKind.CALL_OUTCOME, NOW, "Booked for 1 Dec", "booked")
    attempt = PatientNote("note-attempt-1", "P0000017", NoteKind.CALL_ATTEMPT, NOW, "No answer", "no_answer")
    with open_client(sandbox.url) as client:
        first = client.add_note(outcome)
        sandbox.faults.lost_response_after_write_rate = 1.0
        second = client.add_note(attempt)
        sandbox.faults.lost_response_after_write_rate = 0
        assert (first.created, second.created) == (True, True)  # the lost answer's post made it
        assert client.add_note(outcome) == NoteResult(first.pms_note_id, False)
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as http:
        rows = http.get(f"{sandbox.url}/api/v2/practices/OPX-1001/patients/P0000017/notes").json()["data"]
    assert [(r["category"], r["externalReference"]) for r in rows] == [
        ("RECALL_CALL", "[NVC:note-outcome-1]"),
        ("CALL_ATTEMPT", "[NVC:note-attempt-1]"),
    ]
    assert rows[0]["text"] == "Booked for 1 Dec [outcome: booked]"
    assert rows[0]["occurredAt"] == NOW.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    mine = [n for n in sandbox.nvc_notes("OPX-1001") if n["pms_patient_id"] == "P0000017"]
    assert [(n["kind"], n["nvc_reference"]) for n in mine] == [
        ("call_outcome", "note-outcome-1"),
        ("call_attempt", "note-attempt-1"),
    ]


# --- the sandbox's own dialect ------------------------------------------------------------------------


def test_sandbox_speaks_optix_errors(sandbox: OptixSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    # Raw httpx here: no retry on a 429, so the sandbox's own rate limit is off (under a loaded CI
    # machine its bucket answered one of these requests 429, and the page read failed).
    monkeypatch.setattr(sandbox, "rate_limit_per_second", 0)
    base = f"{sandbox.url}/api/v2/practices/OPX-1001"
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client() as http:
        missing = http.get(base)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        too_many = http.get(f"{base}/patients", params={"limit": 1001}, headers=auth)
        assert (too_many.status_code, too_many.json()["error"]["code"]) == (400, "invalid_limit")
        bad_cursor = http.get(f"{base}/patients", params={"cursor": "not-a-cursor"}, headers=auth)
        assert (bad_cursor.status_code, bad_cursor.json()["error"]["code"]) == (400, "invalid_cursor")
        page = http.get(f"{base}/patients", params={"limit": 2}, headers=auth).json()
        assert set(page) == {"data", "pagination"} and len(page["data"]) == 2
        row = page["data"][0]
        assert row["patientId"].startswith("P") and row["updatedAt"].endswith("Z")
        assert set(row["contact"]) == {"mobile", "home", "email"}
        gone = http.delete(f"{base}/appointments", headers=auth)
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")
        sandbox.faults.rate_429 = 1.0
        limited = http.get(base, headers=auth)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1


def test_sandbox_speaks_optix_on_writes(sandbox: OptixSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "rate_limit_per_second", 0)  # raw httpx here: no retry on a 429
    base = f"{sandbox.url}/api/v2/practices/OPX-1001"
    auth = {"Authorization": f"Bearer {KEY}"}
    start = datetime.combine(date.today() + timedelta(days=800), datetime.min.time(), tzinfo=UTC)
    good = {"patientId": "P0000018", "start": start.isoformat(), "durationMinutes": 30, "type": "SIGHT_TEST"}
    with httpx.Client(headers=auth) as http:
        bad = http.post(f"{base}/appointments", json={**good, "type": "EYE_TEST", "durationMinutes": 0})
        assert (bad.status_code, bad.json()["error"]["code"]) == (422, "validation_error")
        assert "durationMinutes" in bad.json()["error"]["message"] and "type" in bad.json()["error"]["message"]
        naive = http.post(f"{base}/appointments", json={**good, "start": start.replace(tzinfo=None).isoformat()})
        assert naive.status_code == 422
        ghost = http.post(f"{base}/appointments", json={**good, "patientId": "P9999999"})
        assert (ghost.status_code, ghost.json()["error"]["code"]) == (404, "patient_not_found")
        made = http.post(f"{base}/appointments", json=good)
        assert made.status_code == 201 and made.json()["externalReference"] is None
        assert made.json()["clinicianId"] in {c.code for c in sandbox.clinicians("OPX-1001")}
        clash = http.post(f"{base}/appointments", json={**good, "patientId": "P0000019"})
        assert (clash.status_code, clash.json()["error"]["code"]) == (409, "slot_unavailable")
        found = http.get(
            f"{base}/appointments",
            params={
                "patientId": "P0000018",
                "from": start.isoformat(),
                "to": (start + timedelta(minutes=1)).isoformat(),
            },
        ).json()["data"]
        assert [row["appointmentId"] for row in found] == [made.json()["appointmentId"]]
        note = http.post(f"{base}/patients/P0000018/notes", json={"category": "CALL", "text": ""})
        assert (note.status_code, note.json()["error"]["code"]) == (422, "validation_error")
        assert http.get(f"{base}/patients/P9999999/notes").json()["error"]["code"] == "patient_not_found"
        clinicians = http.get(f"{base}/clinicians").json()["data"]
        assert {c["role"] for c in clinicians} == {"Optometrist", "Dispensing Optician"}
    assert made_for(sandbox, None)[-1]["pms_appointment_id"] == made.json()["appointmentId"]


# --- the shared PMS contract ---------------------------------------------------------------------------


class TestOptixContract(PmsContract):
    practice_ref = "OPX-1001"
    clinician_ref = "C01"

    @pytest.fixture(scope="class")
    def sandbox(self) -> Iterator[OptixSandbox]:
        """Its own server: the contract reads the whole class's request log at the end. Its rate limit
        is off: the contract's writes and retries could use up the per-second allowance, and a
        connection check (one attempt) would then fail as rate-limited rather than for the problem it
        is there to show. Rate limits have their own tests above."""
        server = OptixSandbox(
            practices={"OPX-1001": 50, "OPX-2002": 20, "OPX-3003": 5},
            api_keys={KEY: "OPX-1001", OTHER_KEY: "OPX-2002", DISABLED_KEY: "OPX-3003"},
            rate_limit_per_second=0,
        )
        server.api_access_disabled.add("OPX-3003")
        with server:
            yield server

    @pytest.fixture
    def client(self, sandbox: OptixSandbox) -> Iterator[OptixClient]:
        resource = OptixResource(max_attempts=4, backoff_seconds=0.01)
        with resource.open(practice(sandbox.url), {"api_key": KEY}) as client:
            yield client

    @pytest.fixture
    def failure_cases(self, sandbox: OptixSandbox) -> list:
        def opener(url: str, optix_practice_id: str, key: str, secrets: dict[str, str] | None = None):
            resource = OptixResource(max_attempts=1, backoff_seconds=0.01, timeout_seconds=2)
            return lambda: resource.open(
                practice(url, optix_practice_id), {"api_key": key} if secrets is None else secrets
            )

        nowhere = f"http://127.0.0.1:{free_port()}"
        return [
            ("invalid_credentials", opener(sandbox.url, "OPX-1001", WRONG_KEY), WRONG_KEY),
            ("practice_not_found", opener(sandbox.url, "OPX-2002", KEY), KEY),
            ("practice_not_found", opener(sandbox.url, "OPX-9999", KEY), KEY),
            ("api_access_disabled", opener(sandbox.url, "OPX-3003", DISABLED_KEY), DISABLED_KEY),
            ("unreachable", opener(nowhere, "OPX-1001", KEY), KEY),
            ("unsafe_url", opener("http://optix.example.com", "OPX-1001", KEY), KEY),
            ("missing_secret", opener(sandbox.url, "OPX-1001", KEY, secrets={}), KEY),
        ]


# --- seed data -----------------------------------------------------------------------------------------


def test_seed_is_deterministic() -> None:
    day = date(2025, 6, 1)
    first = seed_patients(500, seed=7, today=day)
    assert first == seed_patients(500, seed=7, today=day)
    assert first != seed_patients(500, seed=8, today=day)
    assert [p.index for p in first] == list(range(1, 501))


def test_seed_is_uk_realistic() -> None:
    day = date(2025, 6, 1)
    patients = seed_patients(5000, seed=7, today=day)  # beyond the 1,000 drama mobiles
    n = len(patients)
    share = lambda pred: sum(1 for p in patients if pred(p)) / n  # noqa: E731
    assert 0.76 < share(lambda p: p.mobile) < 0.84
    assert 0.46 < share(lambda p: p.landline) < 0.54
    assert 0.005 < share(lambda p: not p.mobile and not p.landline) < 0.04
    assert 0.03 < share(lambda p: p.date_of_birth is None) < 0.07
    assert 0.25 < share(lambda p: p.recall_due) < 0.35
    assert 0.06 < share(lambda p: "diabetic" in p.flags) < 0.10
    # A mobile is one person's, except a child reached on a parent's (the parent named as guardian).
    holders: dict[str, list] = {}
    for p in patients:
        if p.mobile:
            holders.setdefault(p.mobile, []).append(p)
    assert all(sum(1 for h in held if not h.guardian_name) <= 1 for held in holders.values())
    assert any(len(held) > 1 for held in holders.values())
    for patient in patients:
        for number in (patient.mobile, patient.landline):
            if number:
                phone = normalise_phone(number)
                national = phone.e164[3:]
                assert is_ofcom_drama_number(national) or phonenumbers.is_valid_number(phonenumbers.parse(phone.e164))
        assert patient.updated_at.tzinfo is not None and patient.updated_at < datetime(2025, 6, 1, tzinfo=UTC)
        if patient.last_eye_test and patient.date_of_birth:
            assert patient.date_of_birth < patient.last_eye_test < day
        if patient.date_of_birth:
            assert 3 <= (day - patient.date_of_birth).days // 365 <= 96
    households = Counter((p.last_name, p.landline) for p in patients if p.landline)
    assert any(count > 1 for count in households.values())


def test_seed_draws_distinct_numbers_before_households_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every number is drawn once, the 1,000 drama mobiles first; only the contact pass (children
    joining a parent's household) makes two patients share one."""
    monkeypatch.setattr(seed_module, "contact_pass", lambda *args: None)
    patients = seed_patients(5000, seed=7, today=date(2025, 6, 1))
    mobiles = [p.mobile for p in patients if p.mobile]
    assert len(mobiles) == len(set(mobiles))
    assert sum(1 for m in mobiles if is_ofcom_drama_number(m.replace(" ", "")[1:])) == 1000


# Slow-ish (a few seconds): the biggest practice the product supports must seed and page quickly.
def test_a_200000_patient_practice_seeds_and_serves_pages_quickly() -> None:
    started = time.perf_counter()
    with OptixSandbox(practices={"OPX-BIG": 200_000}, api_keys={KEY: "OPX-BIG"}) as server:
        assert isinstance(server, OptixSandbox)
        assert server.patient_count("OPX-BIG") == 200_000
        print(f"\nseeded 200,000 patients in {time.perf_counter() - started:.1f} s")
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            http.get("/api/v2/practices/OPX-BIG")  # warm the connection
            cursor = None
            for _ in range(3):
                t0 = time.perf_counter()
                params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
                page = http.get("/api/v2/practices/OPX-BIG/patients", params=params).json()
                elapsed = time.perf_counter() - t0
                assert len(page["data"]) == 1000
                print(f"page of 1000 in {elapsed * 1000:.0f} ms")  # speed is for bench/, not asserted
                cursor = page["pagination"]["nextCursor"]
