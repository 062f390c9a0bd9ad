"""Sycle: the shared PMS contract plus Sycle's own dialect (locations, page numbers, field mapping,
expiring tokens, phone/cell_phone), against the Sycle sandbox over real loopback HTTP."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

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
from sandboxes.base import Faults
from sandboxes.sycle import OTHER_ALERTS, SycleSandbox
from tests.pms_contract import PmsContract, future_slot

TOKEN = "sycle-token-9Kd2-test-secret"  # distinctive, so a leak into a message or log is easy to spot
EXPIRED = "sycle-token-expired-4Hq7-secret"
WRONG = "sycle-token-typo-0000-never-valid"
SECRETS = (TOKEN, EXPIRED, WRONG)
FIELD_MAP = {
    "field_map.last_eye_test": "custom_3",
    "field_map.recall_due": "custom_5",
    "field_map.mobile": "cell_phone",
}
TODAY = date.today()


def practice(url: str, location_id: str = "LOC-1", **settings: str | None) -> Practice:
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
    location_id: str = "LOC-1",
    token: str = TOKEN,
    settings: dict[str, str | None] | None = None,
    **config: float,
) -> SycleClient:
    resource = SycleResource(**{"page_size": 20, "max_attempts": 4, "backoff_seconds": 0.01, **config})
    return resource.open(practice(url, location_id, **(settings or {})), {"api_token": token})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def e164(national: str) -> str:
    return "+44" + national.replace(" ", "")[1:]


def make(**kwargs: object) -> SycleSandbox:
    """A sandbox (not started) with the test tokens and a rate limit the contract never hits."""
    options: dict[str, object] = {"tokens": {TOKEN: "active", EXPIRED: "expired"}, "rate_limit_per_second": 1000.0}
    options.update(kwargs)
    return SycleSandbox(**options)  # type: ignore[arg-type]


# --- the shared contract --------------------------------------------------------------------------------


class TestSycleContract(PmsContract):
    practice_ref = "LOC-1"
    clinician_ref = "PRV-01"

    @pytest.fixture(scope="class")
    def sandbox(self) -> Iterator[SycleSandbox]:
        server = make()
        server.start()
        yield server
        server.stop()

    @pytest.fixture(scope="class")
    def disabled_sandbox(self) -> Iterator[SycleSandbox]:
        server = make(locations={"LOC-1": 3}, api_enabled=False)
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
            ("invalid_credentials", lambda: open_client(url, token=WRONG), WRONG),
            ("token_expired", lambda: open_client(url, token=EXPIRED), EXPIRED),
            ("api_access_disabled", lambda: open_client(disabled_sandbox.url), TOKEN),
            ("location_not_found", lambda: open_client(url, "LOC-9"), TOKEN),
            ("unsafe_url", lambda: open_client("brightsight.sycle.net"), TOKEN),
            ("unsafe_url", lambda: open_client("http://brightsight.sycle.net"), TOKEN),
            ("unreachable", lambda: open_client(f"http://127.0.0.1:{free_port()}", max_attempts=1), TOKEN),
            (
                "invalid_field_mapping",
                lambda: open_client(url, settings={"field_map.last_eye_test": "custom_9"}),
                TOKEN,
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
    """The shared server with no faults and an empty request log."""
    running.faults = Faults()
    running.request_log.clear()
    running.throttled = 0
    return running


def test_connection_names_the_location_and_the_field_map(sycle: SycleSandbox) -> None:
    with open_client(sycle.url) as client:
        assert isinstance(client, PmsClient)
        info = client.test_connection()
    assert info.pms == "Sycle"
    assert info.practice_name == "Brightsight Opticians Leeds"
    assert "LOC-1" in info.detail and "last_eye_test=custom_3" in info.detail and "mobile=cell_phone" in info.detail


def test_full_read_matches_the_sycle_records(sycle: SycleSandbox) -> None:
    seeded = sycle.patients("LOC-1")
    with open_client(sycle.url) as client:
        result = client.read_patients(None, TODAY)
    assert result.rejected == []
    assert result.source_ref == "sycle:LOC-1 full"
    assert {p.pms_patient_id for p in result.patients} == set(seeded)
    resolved = {str(a["patient_id"]) for a in sycle.alerts("LOC-1") if not a["active"]}
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
    with open_client(sycle.url, "LOC-1") as first, open_client(sycle.url, "LOC-2") as second:
        one = first.read_patients(None, TODAY)
        two = second.read_patients(None, TODAY)
        assert second.test_connection().practice_name == "Brightsight Opticians Harrogate"
        other = sorted(p.pms_patient_id for p in two.patients)[0]
        start_at, end_at = future_slot(0, days_ahead=900)
        with pytest.raises(PmsError) as failure:
            first.create_appointment(BookingRequest("cross-location", other, start_at, end_at, "eye_test", "PRV-01"))
    assert failure.value.problem == "patient_not_found"
    assert len(one.patients) == sycle.patient_count("LOC-1") == 50
    assert len(two.patients) == sycle.patient_count("LOC-2") == 20
    assert not {p.pms_patient_id for p in one.patients} & {p.pms_patient_id for p in two.patients}
    assert set(sycle.patients("LOC-2")) == {p.pms_patient_id for p in two.patients}
    assert {p.practice_id for p in one.patients} == {"demo-sycle-loc-1"}
    assert {p.practice_id for p in two.patients} == {"demo-sycle-loc-2"}


def test_page_numbers_read_every_patient_once(sycle: SycleSandbox) -> None:
    with open_client(sycle.url, page_size=7) as client:
        result = client.read_patients(None, TODAY)
    ids = [p.pms_patient_id for p in result.patients]
    assert len(ids) == len(set(ids)) == 50
    patient_pages = [path for method, path in sycle.request_log if method == "GET" and path.endswith("/patients")]
    assert len(patient_pages) == math.ceil(50 / 7)
    with httpx.Client(base_url=sycle.url, headers={"Authorization": f"Token {TOKEN}"}) as http:
        last = http.get("/api/v1/locations/LOC-1/patients", params={"page": 8, "per_page": 7}).json()
        beyond = http.get("/api/v1/locations/LOC-1/patients", params={"page": 9, "per_page": 7}).json()
    assert last["meta"] == {"page": 8, "per_page": 7, "total_pages": 8, "total_count": 50}
    assert len(last["patients"]) == 1 and beyond["patients"] == []


def test_the_field_mapping_decides_where_the_last_eye_test_is_read(sycle: SycleSandbox) -> None:
    seeded = sycle.patients("LOC-1")
    rows = {pid: sycle.patient_row("LOC-1", pid) for pid in seeded}
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
    seeded = sycle.patients("LOC-1")
    assert all(p.last_eye_test_date == seeded[p.pms_patient_id].last_eye_test for p in result.patients)


def test_suggest_field_mapping() -> None:
    with make(locations={"LOC-1": 1}) as server:
        fields = httpx.get(f"{server.url}/api/v1/locations/LOC-1/fields", headers={"Authorization": f"Token {TOKEN}"})
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
    assert TOKEN not in str(failure.value)


def test_an_unknown_field_map_target_is_refused() -> None:
    with pytest.raises(PmsConnectionFailed) as failure:
        open_client("https://brightsight.sycle.net", settings={"field_map.last_eye_tset": "custom_3"})
    assert failure.value.problem == "invalid_field_mapping"
    assert "field_map.last_eye_tset" in str(failure.value)


def test_an_expired_token_says_to_generate_a_new_one(sycle: SycleSandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with open_client(sycle.url, token=EXPIRED) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.test_connection()
    assert failure.value.problem == "token_expired"
    assert "the API token has expired" in str(failure.value)
    assert "generate a new API token in Sycle" in failure.value.check
    # A token that expires between syncs fails the next read the same way.
    token = "sycle-token-expiring-7Uj1-secret"
    sycle.tokens[token] = "active"
    with open_client(sycle.url, token=token) as client:
        client.test_connection()
        sycle.expire_token(token)
        with pytest.raises(PmsConnectionFailed) as later:
            client.read_patients(None, TODAY)
    assert later.value.problem == "token_expired"
    assert not any(secret in f"{failure.value} {later.value} {caplog.text}" for secret in (*SECRETS, token))


def test_a_wrong_token_points_at_a_typo(sycle: SycleSandbox) -> None:
    with open_client(sycle.url, token=WRONG) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.test_connection()
    assert failure.value.problem == "invalid_credentials"
    assert "typo" in failure.value.check and WRONG not in str(failure.value)


@pytest.mark.parametrize("url", ["brightsight.sycle.net", "http://brightsight.sycle.net"])
def test_an_account_url_without_https_is_refused_before_any_request(url: str) -> None:
    with pytest.raises(PmsConnectionFailed) as failure:
        open_client(url)
    assert failure.value.problem == "unsafe_url"
    assert "must start with https://" in str(failure.value)
    assert TOKEN not in str(failure.value)


def test_phone_and_cell_phone_are_both_kept_mobile_first(sycle: SycleSandbox) -> None:
    seeded = sycle.patients("LOC-1")
    with open_client(sycle.url) as client:
        patients = {p.pms_patient_id: p for p in client.read_patients(None, TODAY).patients}
    both = [pid for pid, s in seeded.items() if s.mobile and s.landline]
    assert len(both) >= 5
    formats = set()
    for pid in both:
        row = sycle.patient_row("LOC-1", pid)
        formats |= {row["phone"][:3], row["cell_phone"][:3]}
        phones = patients[pid].phones
        assert [p.e164 for p in phones] == [e164(seeded[pid].mobile), e164(seeded[pid].landline)]
        assert [p.type for p in phones] == [PhoneType.MOBILE, PhoneType.LANDLINE]
    assert "+44" in formats and any(f.startswith("0") for f in formats)  # typed both ways
    swapped = [
        pid for pid in both if normalise_phone(sycle.patient_row("LOC-1", pid)["phone"]).type == PhoneType.MOBILE
    ]
    assert swapped, "some receptionists typed the mobile into the phone box; it still comes first"
    only_landline = [pid for pid, s in seeded.items() if s.landline and not s.mobile]
    assert all([p.type for p in patients[pid].phones] == [PhoneType.LANDLINE] for pid in only_landline)


def test_an_alert_added_later_reaches_the_next_incremental_read(sycle: SycleSandbox) -> None:
    with open_client(sycle.url) as client:
        patient = next(p for p in client.read_patients(None, TODAY).patients if not p.risk_flags)
        since = datetime.now(UTC) - timedelta(seconds=1)
        sycle.add_alert("LOC-1", patient.pms_patient_id, "OHT")
        changed = client.read_patients(since, TODAY)
        clinical = client.read_clinical_records(since)
    assert [p.pms_patient_id for p in changed.patients] == [patient.pms_patient_id]
    assert changed.patients[0].risk_flags == ["ocular_hypertension"]
    assert [r.flags for r in clinical.records] == [["ocular_hypertension"]]


def test_bookings_and_notes_in_sycle_form(sycle: SycleSandbox) -> None:
    start_at, end_at = future_slot(3, days_ahead=800)
    with open_client(sycle.url) as client:
        pid = sorted(p.pms_patient_id for p in client.read_patients(None, TODAY).patients)[5]
        result = client.create_appointment(
            BookingRequest("sycle-bk-1", pid, start_at, end_at, "eye_test", "PRV-02", "Eye test booked by NVC")
        )
        # Another provider's diary is free at the same time; the same provider's is not.
        other, third = sorted(sycle.patients("LOC-1"))[6:8]
        second = client.create_appointment(BookingRequest("sycle-bk-2", other, start_at, end_at, "eye_test", "PRV-03"))
        with pytest.raises(PmsError) as clash:
            client.create_appointment(BookingRequest("sycle-bk-3", third, start_at, end_at, "eye_test", "PRV-02"))
        # A patient already booked at that very time is not booked twice, whatever the request's key.
        again = client.create_appointment(BookingRequest("sycle-bk-5", other, start_at, end_at, "eye_test", "PRV-03"))
        with pytest.raises(PmsError) as bad_provider:
            client.create_appointment(BookingRequest("sycle-bk-4", other, *future_slot(5, 800), "eye_test", "PRV-99"))
        note = PatientNote("sycle-note-1", pid, NoteKind.CALL_OUTCOME, datetime.now(UTC), "Left a message", "voicemail")
        note_result = client.add_note(note)
        synced = {a.pms_appointment_id: a for a in client.read_appointments(None).records}
    assert result.created and second.created and clash.value.problem == "slot_taken"
    assert again == BookingResult(second.pms_appointment_id, created=False)
    assert bad_provider.value.problem == "invalid_booking"
    made = next(a for a in sycle.nvc_appointments("LOC-1") if a["nvc_reference"] == "sycle-bk-1")
    assert made["pms_appointment_id"] == result.pms_appointment_id
    assert (made["pms_patient_id"], made["starts_at"], made["provider_id"]) == (pid, start_at, "PRV-02")
    appointment = synced[result.pms_appointment_id]
    assert appointment.nvc_reference == "sycle-bk-1" and appointment.clinician == "PRV-02"
    assert appointment.starts_at == start_at and appointment.appointment_type == "eye_test"
    assert appointment.notes == "Eye test booked by NVC [NVC:sycle-bk-1]"
    written = next(n for n in sycle.nvc_notes("LOC-1") if n["nvc_reference"] == "sycle-note-1")
    assert written["pms_note_id"] == note_result.pms_note_id and note_result.created
    assert (written["kind"], written["outcome"]) == ("call", "left_voicemail")
    assert written["note"].startswith("NVC call outcome (voicemail): Left a message")


def test_429_with_retry_after_is_retried_and_the_read_completes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resources.sycle")
    # 5 requests a second, 10 patient pages plus alerts and recalls: Sycle answers 429 + Retry-After.
    with make(locations={"LOC-1": 50}, rate_limit_per_second=5) as server:
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
        "ca_bundle",
    )
    assert resource.required_secrets() == ("api_token",)
    url = "https://brightsight.sycle.net"
    cases = [
        (practice(url, ""), {"api_token": TOKEN}, "missing_setting"),
        (practice(""), {"api_token": TOKEN}, "missing_setting"),
        (practice(url), {}, "missing_secret"),
    ]
    for candidate, secrets, problem in cases:
        with pytest.raises(PmsConnectionFailed) as failure:
            resource.open(candidate, secrets)
        assert failure.value.problem == problem and failure.value.check


def test_sandbox_speaks_sycle(sycle: SycleSandbox) -> None:
    base = f"{sycle.url}/api/v1/locations"
    auth = {"Authorization": f"Token {TOKEN}"}
    with httpx.Client() as http:
        assert http.get(base, headers={"Authorization": f"Bearer {TOKEN}"}).json() == {
            "errors": [{"code": "token_invalid", "detail": "The API token is missing or invalid."}]
        }
        expired = http.get(base, headers={"Authorization": f"Token {EXPIRED}"})
        assert (expired.status_code, expired.json()["errors"][0]["code"]) == (401, "token_expired")
        missing = http.get(f"{base}/LOC-9/patients", headers=auth)
        assert (missing.status_code, missing.json()["errors"][0]["code"]) == (404, "location_not_found")
        too_many = http.get(f"{base}/LOC-1/patients", params={"per_page": 201}, headers=auth)
        assert (too_many.status_code, too_many.json()["errors"][0]["code"]) == (422, "invalid_per_page")
        row = http.get(f"{base}/LOC-1/patients", params={"per_page": 1}, headers=auth).json()["patients"][0]
        assert isinstance(row["patient_id"], int) and row["updated_at"][19] in "+-"  # local time with its offset
        assert {"phone", "cell_phone", "custom_fields", "birth_date"} <= set(row)
        gone = http.delete(f"{base}/LOC-1/patients/{row['patient_id']}", headers=auth)
        assert gone.status_code == 404 and sycle.patient_count("LOC-1") == 50
        sycle.faults.rate_429 = 1.0
        limited = http.get(base, headers=auth)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["errors"][0]["code"] == "rate_limited"
    with make(locations={"LOC-1": 1}, api_enabled=False) as server:
        off = httpx.get(f"{server.url}/api/v1/locations", headers=auth)
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
    truth = sycle.seed_records("LOC-1")
    rows = {pid: sycle.patient_row("LOC-1", pid) for pid in truth}
    assert {row["status"] for row in rows.values()} == {"active", "inactive", "deceased", "moved"}
    for pid, row in rows.items():
        seed = truth[pid]
        assert row["do_not_call"] is (not seed.phone_recall) and row["recall_opt_out"] is seed.no_recall
        assert row["do_not_text"] is (seed.sms_consent is False)
        assert row["do_not_email"] is (seed.email_consent is False)
        assert row["responsible_party"] == (seed.guardian_name or "Self")
        dead = seed.status == "deceased" and seed.status_date
        assert row["custom_fields"]["custom_6"] == (seed.status_date.strftime("%d/%m/%Y") if dead else "")
    with httpx.Client(base_url=sycle.url, headers={"Authorization": f"Token {TOKEN}"}) as http:
        fields = {f["key"]: f for f in http.get("/api/v1/locations/LOC-1/fields").json()["fields"]}
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
            key=int,
        )
        dies, objects, child = callable_adults[-3:]
        since = datetime.now(UTC)
        sycle.update_patient("LOC-1", dies, status="deceased", status_date=died)
        sycle.update_patient("LOC-1", objects, phone_recall=False, no_recall=True, email_consent=False)
        sycle.update_patient("LOC-1", child, guardian_name="Ms Kerry O'Neill")
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
    pid = sorted(sycle.seed_records("LOC-1"), key=int)[2]
    was = sycle.seed_records("LOC-1")[pid].status
    with open_client(sycle.url) as client:
        since = datetime.now(UTC)
        sycle.update_patient("LOC-1", pid, status="prospect")
        try:
            result = client.read_patients(since, TODAY)
        finally:
            sycle.update_patient("LOC-1", pid, status=was)
    assert result.patients == []
    assert [(r.row_ref, r.raw["status"]) for r in result.rejected] == [(f"sycle:{pid}", "prospect")]
    assert "patient status 'prospect' is not known" in result.rejected[0].reason
