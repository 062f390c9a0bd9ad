"""Sycle: the shared PMS contract plus Sycle's own dialect (the vendor API's GET-with-a-JSON-body calls,
the token in the body, clinics, open slots, booking by patient details, page numbers, field mapping,
expiring tokens, phone/cell_phone), against the Sycle sandbox over real loopback HTTP. A client written
only from the published description replays its request sequence against the same sandbox."""

from __future__ import annotations

import json
import logging
import math
import socket
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest

from nvc_pipelines.model import (
    BookingRequest,
    BookingResult,
    Channel,
    NoteKind,
    PatientNote,
    PatientStatus,
    PhoneType,
    PmsKind,
    Practice,
)
from nvc_pipelines.normalise import InvalidValue, build_patient, normalise_phone
from resources.protocol import PmsClient, PmsConnectionFailed, PmsError
from resources.sycle import SycleClient, SycleResource, suggest_field_mapping, sycle_draft
from sandboxes.sycle import OTHER_ALERTS, SycleSandbox
from tests.pms_contract import PmsContract, future_slot

USER = "nvc-vendor-7Rt"
PASSWORD = "sycle-pass-9Kd2-test-secret"  # distinctive, so a leak into a message or log is easy to spot
WRONG = "sycle-pass-typo-0000-never-valid"
SECRETS = (PASSWORD, WRONG)
LOC1, LOC2 = "2803-9506", "2803-9507"
JSON_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
FIELD_MAP = {
    "field_map.last_eye_test": "custom_3",
    "field_map.recall_due": "custom_5",
    "field_map.mobile": "cell_phone",
}
TODAY = date.today()
UK = ZoneInfo("Europe/London")


def practice(url: str, location_id: str = LOC1, **settings: str | None) -> Practice:
    merged = {"account_url": url, "location_id": location_id, **FIELD_MAP, **settings}
    return Practice(
        practice_id=f"demo-sycle-{location_id.lower()}",
        display_name="Demo",
        pms_kind=PmsKind.SYCLE,
        settings={k: v for k, v in merged.items() if v is not None},
        status="connected",
    )


def open_client(
    url: str,
    location_id: str = LOC1,
    password: str = PASSWORD,
    settings: dict[str, str | None] | None = None,
    **config: float,
) -> SycleClient:
    resource = SycleResource(**{"page_size": 20, "max_attempts": 4, "backoff_seconds": 0.01, **config})
    secrets = {"api_username": USER, "api_password": password}
    return resource.open(practice(url, location_id, **(settings or {})), secrets)


def vendor(url: str, endpoint: str, body: dict, token: str | None = None) -> httpx.Response:
    """One call as Sycle's vendor API takes it: GET with a JSON body, the token inside it."""
    payload = {**({"token": token} if token else {}), **body}
    return httpx.request("GET", f"{url}/api/vendor/{endpoint}/", content=json.dumps(payload), headers=JSON_FORM)


def login(url: str) -> str:
    return vendor(url, "token", {"username": USER, "password": PASSWORD}).json()["token"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def e164(national: str) -> str:
    return "+44" + national.replace(" ", "")[1:]


def make(**kwargs: object) -> SycleSandbox:
    """A sandbox (not started) with the test tokens and a rate limit the contract never hits."""
    options: dict[str, object] = {"logins": {USER: PASSWORD}, "rate_limit_per_second": 1000.0}
    options.update(kwargs)
    return SycleSandbox(**options)  # type: ignore[arg-type]


# --- the shared contract --------------------------------------------------------------------------------


class TestSycleContract(PmsContract):
    practice_ref = LOC1
    clinician_ref = None  # Sycle's booking call names no staff member: the clinic's diary decides

    @pytest.fixture(scope="class")
    def sandbox(self) -> Iterator[SycleSandbox]:
        server = make()
        server.start()
        yield server
        server.stop()

    @pytest.fixture(scope="class")
    def disabled_sandbox(self) -> Iterator[SycleSandbox]:
        server = make(clinics={LOC1: 3}, api_enabled=False)
        server.start()
        yield server
        server.stop()

    @pytest.fixture
    def client(self, sandbox: SycleSandbox) -> Iterator[SycleClient]:
        with open_client(sandbox.url) as client:
            yield client

    @pytest.fixture
    def failure_cases(self, sandbox: SycleSandbox, disabled_sandbox: SycleSandbox) -> list:
        url = sandbox.url
        return [
            ("invalid_credentials", lambda: open_client(url, password=WRONG), WRONG),
            ("api_access_disabled", lambda: open_client(disabled_sandbox.url), PASSWORD),
            ("location_not_found", lambda: open_client(url, "2803-9999"), PASSWORD),
            ("unsafe_url", lambda: open_client("brightsight.sycle.net"), PASSWORD),
            ("unsafe_url", lambda: open_client("http://brightsight.sycle.net"), PASSWORD),
            ("unreachable", lambda: open_client(f"http://127.0.0.1:{free_port()}", max_attempts=1), PASSWORD),
            (
                "invalid_field_mapping",
                lambda: open_client(url, settings={"field_map.last_eye_test": "custom_9"}),
                PASSWORD,
            ),
        ]


# --- Sycle's own behaviour -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running() -> Iterator[SycleSandbox]:
    server = make()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sycle(running: SycleSandbox) -> SycleSandbox:
    """The shared server with no faults, an empty request log and a full rate-limit bucket."""
    running.reset()
    return running


def test_connection_names_the_location_and_the_field_map(sycle: SycleSandbox) -> None:
    with open_client(sycle.url) as client:
        assert isinstance(client, PmsClient)
        info = client.test_connection()
    assert info.pms == "Sycle"
    assert info.practice_name == "Brightsight Opticians Leeds"
    assert LOC1 in info.detail and "Eye Exam" in info.detail and "Recall" in info.detail
    assert "last_eye_test=custom_3" in info.detail and "mobile=cell_phone" in info.detail


def test_full_read_matches_the_sycle_records(sycle: SycleSandbox) -> None:
    seeded = sycle.patients(LOC1)
    with open_client(sycle.url) as client:
        result = client.read_patients(None, TODAY)
    assert result.rejected == []
    assert result.source_ref == "sycle:2803-9506 full"
    assert {p.pms_patient_id for p in result.patients} == set(seeded)
    resolved = {str(a["patient_id"]) for a in sycle.alerts(LOC1) if not a["active"]}
    assert resolved, "the seed should include resolved alerts"
    for patient in result.patients:
        seed = seeded[patient.pms_patient_id]
        assert (patient.first_name, patient.last_name) == (seed.first_name, seed.last_name)
        assert patient.date_of_birth == seed.date_of_birth
        assert patient.last_eye_test_date == seed.last_eye_test
        # The open eye exam recall, never a contact lens check that falls due sooner.
        assert patient.pms_recall_due_date == seed.recall_due
        assert patient.risk_flags == sorted(seed.flags)  # a resolved alert flags nobody
        assert set(patient.unknown_risk_values) <= set(OTHER_ALERTS)
        assert patient.address and seed.postcode in patient.address
        assert patient.source_updated_at is not None and patient.source_updated_at.tzinfo is not None
    assert any(p.unknown_risk_values for p in result.patients)  # free-text alerts kept raw, not lost


def test_the_two_locations_are_read_separately(sycle: SycleSandbox) -> None:
    with open_client(sycle.url, LOC1) as first, open_client(sycle.url, LOC2) as second:
        one = first.read_patients(None, TODAY)
        two = second.read_patients(None, TODAY)
        assert second.test_connection().practice_name == "Brightsight Opticians Harrogate"
        other = sorted(p.pms_patient_id for p in two.patients)[0]
        start_at, end_at = future_slot(0, days_ahead=900)
        with pytest.raises(PmsError) as failure:
            first.create_appointment(BookingRequest("cross-location", other, start_at, end_at, "eye_test"))
    assert failure.value.problem == "patient_not_found"
    assert len(one.patients) == sycle.patient_count(LOC1) == 50
    assert len(two.patients) == sycle.patient_count(LOC2) == 20
    assert not {p.pms_patient_id for p in one.patients} & {p.pms_patient_id for p in two.patients}
    assert set(sycle.patients(LOC2)) == {p.pms_patient_id for p in two.patients}
    assert {p.practice_id for p in one.patients} == {"demo-sycle-2803-9506"}
    assert {p.practice_id for p in two.patients} == {"demo-sycle-2803-9507"}


def test_page_numbers_read_every_patient_once(sycle: SycleSandbox) -> None:
    with open_client(sycle.url, page_size=7) as client:
        result = client.read_patients(None, TODAY)
    ids = [p.pms_patient_id for p in result.patients]
    assert len(ids) == len(set(ids)) == 50
    patient_pages = [path for method, path in sycle.request_log if path == "/api/vendor/patients/"]
    assert len(patient_pages) == math.ceil(50 / 7)
    assert {method for method, _ in sycle.request_log} == {"GET"}  # Sycle's vendor API: every call a GET
    token = login(sycle.url)
    last = vendor(sycle.url, "patients", {"clinic_id": LOC1, "page": 8, "per_page": 7}, token).json()
    beyond = vendor(sycle.url, "patients", {"clinic_id": LOC1, "page": 9, "per_page": 7}, token).json()
    assert last["meta"] == {"page": 8, "per_page": 7, "total_pages": 8, "total_count": 50}
    assert len(last["patients"]) == 1 and beyond["patients"] == []


def test_the_field_mapping_decides_where_the_last_eye_test_is_read(sycle: SycleSandbox) -> None:
    seeded = sycle.patients(LOC1)
    rows = {pid: sycle.patient_row(LOC1, pid) for pid in seeded}
    with open_client(sycle.url, settings={"field_map.last_eye_test": "custom_4"}) as client:
        previous = {p.pms_patient_id: p.last_eye_test_date for p in client.read_patients(None, TODAY).patients}
    with open_client(sycle.url) as client:
        last = {p.pms_patient_id: p.last_eye_test_date for p in client.read_patients(None, TODAY).patients}
    assert previous != last
    for pid, row in rows.items():
        assert last[pid] == seeded[pid].last_eye_test
        custom_4 = row["custom_fields"]["custom_4"]
        assert previous[pid] == (datetime.strptime(custom_4, "%d/%m/%Y").date() if custom_4 else None)
    # Not reading the field at all is a choice too.
    with open_client(sycle.url, settings={"field_map.last_eye_test": "none"}) as client:
        assert all(p.last_eye_test_date is None for p in client.read_patients(None, TODAY).patients)


def test_without_a_mapping_the_labels_are_followed_and_said(sycle: SycleSandbox) -> None:
    layout = dict(sycle.custom_fields)
    sycle.set_custom_fields(
        {
            "custom_1": ("Previous Sight Test", "date", "previous_eye_test"),
            "custom_2": ("Referred By", "text", "referral_source"),
            "custom_8": ("Date of Last Sight Test", "text", "last_eye_test"),
        }
    )
    try:
        unmapped = {"field_map.last_eye_test": None, "field_map.recall_due": None, "field_map.mobile": None}
        with open_client(sycle.url, settings=unmapped) as client:
            info = client.test_connection()
            result = client.read_patients(None, TODAY)
    finally:
        sycle.set_custom_fields(layout)
    assert "field_map.last_eye_test=custom_8 (suggested" in info.detail
    seeded = sycle.patients(LOC1)
    assert all(p.last_eye_test_date == seeded[p.pms_patient_id].last_eye_test for p in result.patients)


def test_suggest_field_mapping() -> None:
    with make(clinics={LOC1: 1}) as server:
        fields = vendor(server.url, "patient_fields", {"clinic_id": LOC1}, login(server.url))
    assert suggest_field_mapping(fields.json()["fields"]) == {
        "last_eye_test": "custom_3",  # "Last Eye Exam", not "Previous Eye Exam"
        "recall_due": "custom_5",
        "mobile": "cell_phone",
        "phone": "phone",
        "email": "email",
        "date_of_death": "custom_6",  # "Date of Death", never "Date of Birth"
    }
    other = [
        {"key": "tel", "label": "Telephone", "type": "phone"},
        {"key": "custom_1", "label": "Next Recall", "type": "date"},
        {"key": "custom_2", "label": "Prior Sight Test", "type": "date"},
        {"key": "custom_3", "label": "Sight Test Date", "type": "text"},
        {"key": "custom_4", "label": "Mobile No.", "type": "text"},
        {"key": "custom_5", "label": "CL Check Due", "type": "date"},
        {"key": "custom_6", "label": "Hearing Test", "type": "date"},
    ]
    assert suggest_field_mapping(other) == {
        "last_eye_test": "custom_3",
        "recall_due": "custom_1",
        "mobile": "custom_4",
        "phone": "tel",
    }
    assert suggest_field_mapping([{"key": "custom_1", "label": "Favourite Colour", "type": "text"}]) == {}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"field_map.last_eye_test": "custom_9"}, "'custom_9'"),
        ({"field_map.last_eye_test": "cell_phone"}, "cell_phone ('Cell Phone'), a phone field"),
        ({"field_map.mobile": "custom_3"}, "custom_3 ('Last Eye Exam'), a date field"),
    ],
)
def test_a_bad_field_mapping_is_refused_at_connect(sycle: SycleSandbox, settings: dict[str, str], named: str) -> None:
    with open_client(sycle.url, settings=settings) as client:
        with pytest.raises(PmsConnectionFailed) as failure:
            client.test_connection()
        with pytest.raises(PmsConnectionFailed) as read_failure:
            client.read_patients(None, TODAY)  # never a sync that silently reads the wrong field
    assert failure.value.problem == read_failure.value.problem == "invalid_field_mapping"
    assert named in str(failure.value)
    assert "custom_3 ('Last Eye Exam')" in failure.value.check  # what this location has
    assert PASSWORD not in str(failure.value)


def test_an_unknown_field_map_target_is_refused() -> None:
    with pytest.raises(PmsConnectionFailed) as failure:
        open_client("https://brightsight.sycle.net", settings={"field_map.last_eye_tset": "custom_3"})
    assert failure.value.problem == "invalid_field_mapping"
    assert "field_map.last_eye_tset" in str(failure.value)


def test_an_expired_token_is_renewed_with_the_login(sycle: SycleSandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with open_client(sycle.url) as client:
        client.test_connection()
        logins = sum(1 for _, path in sycle.request_log if path == "/api/vendor/token/")
        sycle.expire_tokens()  # the token's lifetime ends between two syncs
        assert client.read_patients(None, TODAY).patients
        again = sum(1 for _, path in sycle.request_log if path == "/api/vendor/token/")
        assert (logins, again) == (1, 2)  # one login per connection, one more when the token expired
        # A password changed in Sycle since: the renewal fails, saying which login to check.
        sycle.expire_tokens()
        sycle.logins[USER] = "changed-in-sycle"
        try:
            with pytest.raises(PmsConnectionFailed) as failure:
                client.read_patients(None, TODAY)
        finally:
            sycle.logins[USER] = PASSWORD
    assert failure.value.problem == "invalid_credentials"
    assert "api_username and api_password" in failure.value.check
    assert not any(secret in f"{failure.value} {caplog.text}" for secret in (*SECRETS, USER))


def test_a_wrong_password_points_at_a_typo(sycle: SycleSandbox) -> None:
    with open_client(sycle.url, password=WRONG) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.test_connection()
    assert failure.value.problem == "invalid_credentials"
    assert "typo" in failure.value.check and WRONG not in str(failure.value)


@pytest.mark.parametrize("url", ["brightsight.sycle.net", "http://brightsight.sycle.net"])
def test_an_account_url_without_https_is_refused_before_any_request(url: str) -> None:
    with pytest.raises(PmsConnectionFailed) as failure:
        open_client(url)
    assert failure.value.problem == "unsafe_url"
    assert "must start with https://" in str(failure.value)
    assert PASSWORD not in str(failure.value)


def test_phone_and_cell_phone_are_both_kept_mobile_first(sycle: SycleSandbox) -> None:
    seeded = sycle.patients(LOC1)
    with open_client(sycle.url) as client:
        patients = {p.pms_patient_id: p for p in client.read_patients(None, TODAY).patients}
    both = [pid for pid, s in seeded.items() if s.mobile and s.landline]
    assert len(both) >= 5
    formats = set()
    for pid in both:
        row = sycle.patient_row(LOC1, pid)
        formats |= {row["phone"][:3], row["cell_phone"][:3]}
        phones = patients[pid].phones
        assert [p.e164 for p in phones] == [e164(seeded[pid].mobile), e164(seeded[pid].landline)]
        assert [p.type for p in phones] == [PhoneType.MOBILE, PhoneType.LANDLINE]
    assert "+44" in formats and any(f.startswith("0") for f in formats)  # typed both ways
    swapped = [pid for pid in both if normalise_phone(sycle.patient_row(LOC1, pid)["phone"]).type == PhoneType.MOBILE]
    assert swapped, "some receptionists typed the mobile into the phone box; it still comes first"
    only_landline = [pid for pid, s in seeded.items() if s.landline and not s.mobile]
    assert all([p.type for p in patients[pid].phones] == [PhoneType.LANDLINE] for pid in only_landline)


def test_an_alert_added_later_reaches_the_next_incremental_read(sycle: SycleSandbox) -> None:
    with open_client(sycle.url) as client:
        patient = next(p for p in client.read_patients(None, TODAY).patients if not p.risk_flags)
        since = datetime.now(UTC) - timedelta(seconds=1)
        sycle.add_alert(LOC1, patient.pms_patient_id, "OHT")
        changed = client.read_patients(since, TODAY)
        clinical = client.read_clinical_records(since)
    assert [p.pms_patient_id for p in changed.patients] == [patient.pms_patient_id]
    assert changed.patients[0].risk_flags == ["ocular_hypertension"]
    assert [r.flags for r in clinical.records] == [["ocular_hypertension"]]


def test_bookings_and_notes_in_sycle_form(sycle: SycleSandbox) -> None:
    start_at, end_at = future_slot(3, days_ahead=800)
    with open_client(sycle.url) as client:
        pid = sorted(p.pms_patient_id for p in client.read_patients(None, TODAY).patients)[5]
        sycle.request_log.clear()
        result = client.create_appointment(
            BookingRequest("sycle-bk-1", pid, start_at, end_at, "eye_test", None, "Eye test booked by NVC")
        )
        booked_with = [path for _, path in sycle.request_log]
        # The clinic takes one appointment at a time (its collision_limit): the time is no longer open.
        other, third = sorted(sycle.patients(LOC1))[6:8]
        with pytest.raises(PmsError) as clash:
            client.create_appointment(BookingRequest("sycle-bk-3", third, start_at, end_at, "eye_test"))
        # The patient already booked at that very time is not booked twice, whatever the request's key.
        again = client.create_appointment(BookingRequest("sycle-bk-5", pid, start_at, end_at, "eye_test"))
        # A named clinician must have the slot; one Sycle does not know is refused before booking.
        later = future_slot(5, 800)
        with pytest.raises(PmsError) as bad_staff:
            client.create_appointment(BookingRequest("sycle-bk-4", other, *later, "eye_test", "2803-S99"))
        named = client.create_appointment(BookingRequest("sycle-bk-6", other, *later, "eye_test", "2803-S01"))
        with pytest.raises(PmsError) as bad_type:
            client.create_appointment(BookingRequest("sycle-bk-7", third, *future_slot(7, 800), "other"))
        note = PatientNote("sycle-note-1", pid, NoteKind.CALL_OUTCOME, datetime.now(UTC), "Left a message", "voicemail")
        note_result = client.add_note(note)
        synced = {a.pms_appointment_id: a for a in client.read_appointments(None).records}
    assert booked_with[-2:] == ["/api/vendor/open_slots/", "/api/vendor/appointment/"]
    assert result.created and clash.value.problem == "slot_taken"
    assert again == BookingResult(result.pms_appointment_id, created=False)
    assert bad_staff.value.problem == "invalid_booking" and named.created
    assert bad_type.value.problem == "invalid_booking" and "Hearing Test" in str(bad_type.value)
    made = next(a for a in sycle.nvc_appointments(LOC1) if a["nvc_reference"] == "sycle-bk-1")
    assert made["pms_appointment_id"] == result.pms_appointment_id
    assert (made["pms_patient_id"], made["starts_at"]) == (pid, start_at)
    assert made["pms_appointment_id"].startswith("2803-")
    appointment = synced[result.pms_appointment_id]
    assert appointment.nvc_reference == "sycle-bk-1" and appointment.clinician == made["staff_id"]
    assert appointment.starts_at == start_at and appointment.appointment_type == "eye_test"
    assert appointment.notes == "Eye test booked by NVC [NVC:sycle-bk-1]"
    written = next(n for n in sycle.nvc_notes(LOC1) if n["nvc_reference"] == "sycle-note-1")
    assert written["pms_note_id"] == note_result.pms_note_id and note_result.created
    assert (written["kind"], written["outcome"]) == ("call", "left_voicemail")
    assert written["note"].startswith("NVC call outcome (voicemail): Left a message")


def test_a_booking_is_found_by_patient_and_time_without_a_marker(sycle: SycleSandbox) -> None:
    """An account that drops the modelled `notes`: exactly-once rests on the patient and the time alone."""
    start_at, end_at = future_slot(9, days_ahead=820)
    with open_client(sycle.url) as client:
        pid = sorted(sycle.patients(LOC1))[11]
        row = sycle.patient_row(LOC1, pid)
        # The practice booked the patient at that time through the published call, with no note.
        token = login(sycle.url)
        body = {
            "start": start_at.astimezone(UK).strftime("%Y-%m-%d %H:%M:%S"),
            "clinic_id": LOC1,
            "appt_type_id": "2803-1",
            "ref_source_name": "Walk-in",
            "sub_ref_name": "",
            "patient": {k: row[k] or "" for k in ("first_name", "last_name", "email")} | {"phone": row["phone"] or ""},
        }
        made = vendor(sycle.url, "appointment", body, token)
        assert made.status_code == 200, made.text
        found = client.create_appointment(BookingRequest("sycle-bk-nomark", pid, start_at, end_at, "eye_test"))
    assert found == BookingResult(made.json()["appointment"]["appt_id"], created=False)


def test_429_with_retry_after_is_retried_and_the_read_completes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resources.sycle")
    # 5 requests a second, 10 patient pages plus alerts and recalls: Sycle answers 429 + Retry-After.
    with make(clinics={LOC1: 50}, rate_limit_per_second=5) as server:
        with open_client(server.url, page_size=5, max_attempts=5) as client:
            result = client.read_patients(None, TODAY)
        throttled = server.throttled
    assert len({p.pms_patient_id for p in result.patients}) == 50
    assert throttled >= 1 and "HTTP 429" in caplog.text
    assert not any(secret in caplog.text for secret in SECRETS)


def test_settings_secrets_and_missing_ones() -> None:
    resource = SycleResource()
    assert resource.required_settings() == ("account_url", "location_id")
    assert resource.optional_settings() == (
        "field_map.last_eye_test",
        "field_map.recall_due",
        "field_map.mobile",
        "field_map.phone",
        "field_map.email",
        "field_map.date_of_death",
        "referral_source",
        "referral_subcategory",
        "ca_bundle",
    )
    assert resource.required_secrets() == ("api_username", "api_password")
    url = "https://brightsight.sycle.net"
    cases = [
        (practice(url, ""), {"api_username": USER, "api_password": PASSWORD}, "missing_setting"),
        (practice(""), {"api_username": USER, "api_password": PASSWORD}, "missing_setting"),
        (practice(url), {}, "missing_secret"),
        (practice(url), {"api_username": USER, "api_password": " "}, "missing_secret"),
    ]
    for candidate, secrets, problem in cases:
        with pytest.raises(PmsConnectionFailed) as failure:
            resource.open(candidate, secrets)
        assert failure.value.problem == problem and failure.value.check


def test_sandbox_speaks_sycle(sycle: SycleSandbox) -> None:
    url = sycle.url
    wrong = vendor(url, "token", {"username": USER, "password": WRONG})
    assert (wrong.status_code, wrong.json()["errors"][0]["code"]) == (401, "invalid_credentials")
    token = login(url)
    # The token travels in the body: a header is not read, a missing token is refused.
    header = httpx.request(
        "GET", f"{url}/api/vendor/clinics/", headers={**JSON_FORM, "Authorization": f"Token {token}"}
    )
    assert (header.status_code, header.json()["errors"][0]["code"]) == (401, "token_invalid")
    assert vendor(url, "clinics", {}, token).status_code == 200
    # The trailing slash is part of every endpoint.
    assert httpx.request("GET", f"{url}/api/vendor/clinics", content=json.dumps({"token": token})).status_code == 404
    missing = vendor(url, "patients", {"clinic_id": "2803-9999"}, token)
    assert (missing.status_code, missing.json()["errors"][0]["code"]) == (404, "clinic_not_found")
    too_many = vendor(url, "patients", {"clinic_id": LOC1, "per_page": 201}, token)
    assert (too_many.status_code, too_many.json()["errors"][0]["code"]) == (422, "invalid_per_page")
    row = vendor(url, "patients", {"clinic_id": LOC1, "per_page": 1}, token).json()["patients"][0]
    assert row["patient_id"].startswith("2803-") and row["updated_at"][19] in "+-"  # local time with its offset
    assert {"phone", "cell_phone", "custom_fields", "birth_date"} <= set(row)
    for method in ("DELETE", "POST", "PUT"):
        gone = httpx.request(
            method, f"{url}/api/vendor/patients/{row['patient_id']}/", content=json.dumps({"token": token})
        )
        assert gone.status_code == 404
    assert sycle.patient_count(LOC1) == 50
    sycle.expire_tokens()
    expired = vendor(url, "clinics", {}, token)
    assert (expired.status_code, expired.json()["errors"][0]["code"]) == (401, "token_expired")
    fresh = login(url)
    sycle.faults.rate_429 = 1.0
    limited = vendor(url, "clinics", {}, fresh)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["errors"][0]["code"] == "rate_limited"
    with make(clinics={LOC1: 1}, api_enabled=False) as server:
        off = vendor(server.url, "token", {"username": USER, "password": PASSWORD})
    assert (off.status_code, off.json()["errors"][0]["code"]) == (403, "api_disabled")


def test_the_client_never_deletes() -> None:
    assert not any(name.startswith(("delete", "remove")) or "delete" in name for name in dir(SycleClient))


# --- status, contact preferences and guardians ---------------------------------------------------------

DEATH_MAP = {"date_of_death": "custom_6"}


def sycle_patient(field_map: dict[str, str] | None = None, **row: object):
    """One Sycle patient row (with `row` over the defaults) through the client's translation and the
    shared normalisation."""
    base: dict[str, object] = {
        "patient_id": 1000001,
        "first_name": "Ann",
        "last_name": "Lee",
        "cell_phone": "07700 900123",
        "custom_fields": {},
    }
    mapping = {"mobile": "cell_phone", **(DEATH_MAP if field_map is None else field_map)}
    return build_patient("demo-sycle", sycle_draft({**base, **row}, mapping, [], []), TODAY, strict=False)


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("active", PatientStatus.ACTIVE),
        ("inactive", PatientStatus.INACTIVE),
        ("deceased", PatientStatus.DECEASED),
        ("moved", PatientStatus.GONE_AWAY),
        ("Moved", PatientStatus.GONE_AWAY),
        ("Deceased", PatientStatus.DECEASED),
        (None, PatientStatus.ACTIVE),  # an account without the field: nothing says otherwise
        ("", PatientStatus.ACTIVE),
    ],
)
def test_each_sycle_status_word(word: str | None, status: PatientStatus) -> None:
    assert sycle_patient(status=word).status == status


def test_an_unknown_sycle_status_is_refused_by_name() -> None:
    with pytest.raises(InvalidValue, match="patient status 'prospect' is not known"):
        sycle_patient(status="prospect")


def test_the_date_of_death_comes_through_the_field_mapping() -> None:
    died = TODAY - timedelta(days=10)
    typed = died.strftime("%d/%m/%Y")
    patient = sycle_patient(status="deceased", custom_fields={"custom_6": typed})
    assert (patient.status, patient.status_date) == (PatientStatus.DECEASED, died)
    # A date typed into the custom field while the status was left alone still means deceased.
    assert sycle_patient(status="active", custom_fields={"custom_6": typed}).status == PatientStatus.DECEASED
    # The field as a tick box ("Yes") is read too: deceased, no date.
    ticked = sycle_patient(status="active", custom_fields={"custom_6": "Yes"})
    assert (ticked.status, ticked.status_date) == (PatientStatus.DECEASED, None)
    assert sycle_patient(status="active", custom_fields={"custom_6": ""}).status == PatientStatus.ACTIVE
    # Unmapped: the status alone, without a date.
    unmapped = sycle_patient({}, status="deceased", custom_fields={"custom_6": typed})
    assert (unmapped.status, unmapped.status_date) == (PatientStatus.DECEASED, None)
    # Sycle's status says deceased: believed, whatever was typed in the date field.
    unsure = sycle_patient(status="deceased", custom_fields={"custom_6": "not sure"})
    assert (unsure.status, unsure.status_date) == (PatientStatus.DECEASED, None)
    # The status says otherwise and the field holds neither a date nor yes/no: refused by name.
    with pytest.raises(InvalidValue, match="deceased 'not sure' is neither yes/no nor a date"):
        sycle_patient(status="active", custom_fields={"custom_6": "not sure"})


def test_sycle_opt_out_boxes() -> None:
    unticked = sycle_patient(do_not_call=False, do_not_text=False, do_not_email=False, recall_opt_out=False)
    assert unticked.contact.channels == {Channel.PHONE, Channel.SMS, Channel.EMAIL} and unticked.contact.may_phone
    # An account whose patients lack the boxes: nothing refused.
    bare = sycle_patient().contact
    assert (bare.phone_recall, bare.no_recall, bare.channels) == (
        True,
        False,
        {Channel.PHONE, Channel.SMS, Channel.EMAIL},
    )
    no_call = sycle_patient(do_not_call=True).contact
    assert no_call.phone_recall is False and not no_call.may_phone and Channel.PHONE not in no_call.channels
    no_text = sycle_patient(do_not_text=True, do_not_email="Y").contact
    assert no_text.channels == {Channel.PHONE} and no_text.may_phone
    opted_out = sycle_patient(recall_opt_out=True).contact
    assert opted_out.no_recall and opted_out.phone_recall and not opted_out.may_phone
    # A box Sycle filled with something that is not a yes/no keeps the refusal, never loses it.
    garbled = sycle_patient(do_not_call="unknown", recall_opt_out="?").contact
    assert (garbled.phone_recall, garbled.no_recall) == (False, True)


@pytest.mark.parametrize(
    ("party", "guardian"),
    [
        ("Mrs Jane Smith", "Mrs Jane Smith"),
        ("  Mr   Rhys  Ap Rhys ", "Mr Rhys Ap Rhys"),
        ("Self", None),
        ("self", None),
        ("N/A", None),
        ("", None),
        (None, None),
    ],
)
def test_the_responsible_party_is_the_guardian(party: str | None, guardian: str | None) -> None:
    assert sycle_patient(responsible_party=party).guardian_name == guardian


def test_a_patient_named_as_their_own_responsible_party_has_no_guardian() -> None:
    assert sycle_patient(responsible_party="Ann Lee").guardian_name is None
    assert sycle_patient(title="Dr", responsible_party="dr ann  lee").guardian_name is None
    assert sycle_patient(responsible_party="Mr Tom Lee").guardian_name == "Mr Tom Lee"


def test_sandbox_renders_contact_in_sycle_words(sycle: SycleSandbox) -> None:
    truth = sycle.seed_records(LOC1)
    rows = {pid: sycle.patient_row(LOC1, pid) for pid in truth}
    assert {row["status"] for row in rows.values()} == {"active", "inactive", "deceased", "moved"}
    for pid, row in rows.items():
        seed = truth[pid]
        assert row["do_not_call"] is (not seed.phone_recall) and row["recall_opt_out"] is seed.no_recall
        assert row["do_not_text"] is (seed.sms_consent is False)
        assert row["do_not_email"] is (seed.email_consent is False)
        assert row["responsible_party"] == (seed.guardian_name or "Self")
        dead = seed.status == "deceased" and seed.status_date
        assert row["custom_fields"]["custom_6"] == (seed.status_date.strftime("%d/%m/%Y") if dead else "")
    answer = vendor(sycle.url, "patient_fields", {"clinic_id": LOC1}, login(sycle.url)).json()
    fields = {f["key"]: f for f in answer["fields"]}
    assert fields["custom_6"]["label"] == "Date of Death" and fields["custom_6"]["custom"]
    assert {fields[k]["type"] for k in ("do_not_call", "do_not_text", "do_not_email", "recall_opt_out")} == {"boolean"}


def test_deceased_and_opted_out_mid_day_arrive_on_the_next_incremental_read(sycle: SycleSandbox) -> None:
    died = TODAY - timedelta(days=1)
    with open_client(sycle.url) as client:
        before = client.read_patients(None, TODAY).patients
        callable_adults = sorted(
            (
                p.pms_patient_id
                for p in before
                if p.status == PatientStatus.ACTIVE and p.contact.may_phone and p.guardian_name is None
            ),
            key=lambda pid: int(pid.rpartition("-")[2]),
        )
        dies, objects, child = callable_adults[-3:]
        since = datetime.now(UTC)
        sycle.update_patient(LOC1, dies, status="deceased", status_date=died)
        sycle.update_patient(LOC1, objects, phone_recall=False, no_recall=True, email_consent=False)
        sycle.update_patient(LOC1, child, guardian_name="Ms Kerry O'Neill")
        changed = {p.pms_patient_id: p for p in client.read_patients(since, TODAY).patients}
    assert set(changed) == {dies, objects, child}
    assert (changed[dies].status, changed[dies].status_date) == (PatientStatus.DECEASED, died)
    opted_out = changed[objects].contact
    assert (opted_out.phone_recall, opted_out.no_recall, opted_out.may_phone) == (False, True, False)
    assert opted_out.channels is not None and Channel.EMAIL not in opted_out.channels
    assert changed[child].guardian_name == "Ms Kerry O'Neill"


def test_without_a_date_of_death_field_only_the_status_says_deceased(sycle: SycleSandbox) -> None:
    layout = dict(sycle.custom_fields)
    sycle.set_custom_fields({k: v for k, v in layout.items() if v[2] != "date_of_death"})
    try:
        with open_client(sycle.url) as client:
            info = client.test_connection()
            patients = client.read_patients(None, TODAY).patients
    finally:
        sycle.set_custom_fields(layout)
    assert "date_of_death" not in info.detail
    dead = [p for p in patients if p.status == PatientStatus.DECEASED]
    assert dead and all(p.status_date is None for p in dead)


def test_a_sycle_status_word_nvc_does_not_know_is_a_rejected_row(sycle: SycleSandbox) -> None:
    pid = sorted(sycle.seed_records(LOC1), key=lambda pid: int(pid.rpartition("-")[2]))[2]
    was = sycle.seed_records(LOC1)[pid].status
    with open_client(sycle.url) as client:
        since = datetime.now(UTC)
        sycle.update_patient(LOC1, pid, status="prospect")
        try:
            result = client.read_patients(since, TODAY)
        finally:
            sycle.update_patient(LOC1, pid, status=was)
    assert result.patients == []
    assert [(r.row_ref, r.raw["status"]) for r in result.rejected] == [(f"sycle:{pid}", "prospect")]
    assert "patient status 'prospect' is not known" in result.rejected[0].reason


# --- a client written only from the published description --------------------------------------------


class PublishedSycleClient:
    """What a developer writes from the public description alone (a WordPress booking plugin's calls):
    `https://{subdomain}.sycle.net/api/vendor/{endpoint}/`, every call a GET with a JSON body sent as
    application/x-www-form-urlencoded, the token inside the body. Nothing from NVC's client or the sandbox."""

    def __init__(self, base: str):
        self.base = base.rstrip("/") + "/api/vendor/"
        self.http = httpx.Client()
        self.token: str | None = None
        self.calls: list[str] = []

    def _get(self, endpoint: str, body: dict) -> dict:
        self.calls.append(endpoint)
        if self.token is not None:
            body = {"token": self.token, **body}
        response = self.http.request(
            "GET",
            self.base + endpoint + "/",
            content=json.dumps(body),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response.raise_for_status()
        return response.json()

    def authenticate(self, username: str, password: str) -> None:
        self.token = self._get("token", {"username": username, "password": password})["token"]

    def clinics(self) -> list[dict]:
        return self._get("clinics", {"proximity": {"zip": "LS1 1AB", "miles": 25}})["clinic_details"]

    def clinic(self, clinic_id: str) -> dict:
        return self._get(f"clinics/{clinic_id}", {})["clinic_details"]

    def open_slots(self, clinic_id: str, start_date: str, end_date: str, length: int) -> list[dict]:
        body = {"clinic_id": clinic_id, "start_date": start_date, "end_date": end_date, "length": length}
        return self._get("open_slots", body)["open_slots"]

    def book(self, start: str, clinic_id: str, appt_type_id: str, ref: str, sub: str, patient: dict) -> dict:
        body = {
            "start": start,
            "clinic_id": clinic_id,
            "appt_type_id": appt_type_id,
            "ref_source_name": ref,
            "sub_ref_name": sub,
            "patient": patient,
        }
        return self._get("appointment", body)


def test_a_client_written_from_the_published_description_works_unchanged(sycle: SycleSandbox) -> None:
    day = (TODAY + timedelta(days=950)).isoformat()
    published = PublishedSycleClient(sycle.url)
    published.authenticate(USER, PASSWORD)
    details = published.clinics()
    ids = [d["clinic"]["clinic_id"] for d in details]
    assert ids == [LOC1, LOC2] and all(i.startswith("2803-") for i in ids)
    detail = published.clinic(LOC1)
    clinic = detail["clinic"]
    assert set(clinic) == {"clinic_id", "clinic_name", "address", "phone1", "phone2", "collision_limit"}
    assert set(clinic["address"]) == {"street1", "street2", "city", "state", "country", "zip"}
    eye = next(t for t in detail["appointment_types"] if t["name"] == "Eye Exam")
    assert set(eye) == {"appt_type_id", "name", "length"} and eye["appt_type_id"].startswith("2803-")
    source = detail["referral_sources"][0]
    assert set(source) == {"ref_source_id", "name", "referral_subcategories"}
    assert set(source["referral_subcategories"][0]) == {"sub_ref_id", "name"}
    slots = published.open_slots(LOC1, day, day, eye["length"])
    assert all(set(s) == {"staff", "slots"} and set(s["staff"]) == {"title", "first_name", "last_name"} for s in slots)
    first = next(slot["time"] for s in slots for slot in s["slots"])
    patient = {"first_name": "Morwenna", "last_name": "Trelawny", "phone": "07700 900765", "email": "mt@example.com"}
    answer = published.book(
        first, LOC1, eye["appt_type_id"], source["name"], source["referral_subcategories"][0]["name"], patient
    )
    assert answer  # what `appointment` answers is not described; any 2xx is a booking
    assert published.calls == ["token", "clinics", f"clinics/{LOC1}", "open_slots", "appointment"]
    assert {method for method, _ in sycle.request_log} == {"GET"}
    after = published.open_slots(LOC1, day, day, eye["length"])
    assert first not in {slot["time"] for s in after for slot in s["slots"]}  # the slot is taken now
    # NVC's client reads the same booking back from the diary.
    with open_client(sycle.url) as client:
        booked = [a for a in client.read_appointments(None).records if a.starts_at.date().isoformat() == day]
    assert len(booked) == 1 and booked[0].appointment_type == "eye_test"
