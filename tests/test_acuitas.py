"""Acuitas: the resource against the Acuitas sandbox over real loopback HTTP (the shared PMS contract,
then what is particular to Acuitas: day-first dates, the version gate, offset paging, sessions)."""

from __future__ import annotations

import logging
import math
import socket
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest

from nvc_pipelines.model import BookingRequest, Channel, NoteKind, PatientNote, PatientStatus, PmsKind, Practice
from nvc_pipelines.normalise import UK_TZ, InvalidValue, build_appointment, build_patient
from resources.acuitas import AcuitasClient, AcuitasResource, acuitas_appointment_draft, acuitas_draft
from resources.http import HttpStatusError
from resources.protocol import PmsClient, PmsConnectionFailed, PmsError
from sandboxes.acuitas import AcuitasSandbox, optom_codes
from tests.pms_contract import PmsContract, future_slot

DATABASE = "ACUITAS_DEMO"
USERNAME = "nvc_api"
PASSWORD = "acuitas-pw-7Qx9-test-secret"  # distinctive, so a leak into a message or log is easy to spot
READ_ONLY_PASSWORD = "acuitas-pw-readonly-4Hd2"
NO_ROLES_PASSWORD = "acuitas-pw-noroles-9Kc1"
WRONG_PASSWORD = "acuitas-pw-typo-0000-never-valid"
SECRETS = (PASSWORD, READ_ONLY_PASSWORD, NO_ROLES_PASSWORD, WRONG_PASSWORD)
USERS = {
    USERNAME: (PASSWORD, {"API Read", "Diary Write"}),
    "nvc_readonly": (READ_ONLY_PASSWORD, {"API Read"}),
    "nvc_noroles": (NO_ROLES_PASSWORD, set()),
}
CONTACT_DB = "ACUITAS_CONTACT"  # a database of their own for the status and contact tests' edits
# An Acuitas optometrist's user code in the demo database (dispensing opticians' GOC numbers start 02-).
OPTOM = next(code for code, c in optom_codes(DATABASE).items() if c.goc_number.startswith("01-"))


def practice(url: str, database: str = DATABASE) -> Practice:
    return Practice(
        practice_id="demo-acuitas",
        display_name="Demo",
        pms_kind=PmsKind.ACUITAS,
        settings={"server_url": url, "database": database},
        status="connected",
    )


def open_client(
    url: str,
    database: str = DATABASE,
    username: str = USERNAME,
    password: str = PASSWORD,
    **config: float | int,
) -> AcuitasClient:
    resource = AcuitasResource(**{"max_attempts": 4, "backoff_seconds": 0.01, "timeout_seconds": 5.0, **config})
    return resource.open(practice(url, database), {"api_username": username, "api_password": password})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_to(server: AcuitasSandbox, method: str, suffix: str) -> int:
    return sum(1 for m, path in server.request_log if m == method and path.endswith(suffix))


# --- the shared contract -------------------------------------------------------------------------------


class TestAcuitasContract(PmsContract):
    practice_ref = DATABASE
    clinician_ref = OPTOM

    @pytest.fixture(scope="class")
    def sandbox(self) -> Iterator[AcuitasSandbox]:
        with AcuitasSandbox(users=USERS) as server:
            yield server

    @pytest.fixture(scope="class")
    def old_server(self) -> Iterator[AcuitasSandbox]:
        with AcuitasSandbox(users=USERS, version="7.4.2") as server:
            yield server

    @pytest.fixture
    def client(self, sandbox: AcuitasSandbox) -> Iterator[AcuitasClient]:
        with open_client(sandbox.url) as client:
            yield client

    @pytest.fixture
    def failure_cases(self, sandbox: AcuitasSandbox, old_server: AcuitasSandbox) -> list:
        url = sandbox.url
        return [
            ("invalid_credentials", lambda: open_client(url, password=WRONG_PASSWORD), WRONG_PASSWORD),
            ("invalid_credentials", lambda: open_client(url, username="nvc_typo"), PASSWORD),
            ("database_not_found", lambda: open_client(url, database="ACUITAS_LIVE"), PASSWORD),
            (
                "insufficient_permissions",
                lambda: open_client(url, username="nvc_noroles", password=NO_ROLES_PASSWORD),
                NO_ROLES_PASSWORD,
            ),
            (
                "insufficient_permissions",
                lambda: open_client(url, username="nvc_readonly", password=READ_ONLY_PASSWORD),
                READ_ONLY_PASSWORD,
            ),
            ("unsupported_version", lambda: open_client(old_server.url), PASSWORD),
            ("unreachable", lambda: open_client(f"http://127.0.0.1:{free_port()}", max_attempts=1), PASSWORD),
            ("unsafe_url", lambda: open_client("http://acuitas.smith-opticians.example:8443"), PASSWORD),
        ]


# --- Acuitas specifics -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running_sandbox() -> Iterator[AcuitasSandbox]:
    databases = {DATABASE: 50, "ACUITAS_BRANCH2": 230, "ACUITAS_BRANCH3": 40, CONTACT_DB: 60}
    with AcuitasSandbox(databases=databases, users=USERS) as server:
        yield server


@pytest.fixture
def acuitas(running_sandbox: AcuitasSandbox) -> AcuitasSandbox:
    """The shared server with no faults, a fresh request log, a full rate-limit bucket and normal sessions."""
    running_sandbox.reset()
    running_sandbox.token_ttl_seconds = 1200.0
    return running_sandbox


def login(http: httpx.Client, password: str = PASSWORD, database: str = DATABASE) -> dict[str, str]:
    body = {"database": database, "username": USERNAME, "password": password}
    return {"X-Acuitas-Token": http.post("/acuitas/api/session", json=body).json()["token"]}


def test_connection_names_the_practice_and_version(acuitas: AcuitasSandbox) -> None:
    with open_client(acuitas.url) as client:
        assert isinstance(client, PmsClient)
        info = client.test_connection()
    assert info.pms == "Acuitas"
    assert info.practice_name
    assert info.version == "8.2.1.1045"
    assert DATABASE in info.detail


def test_the_sandbox_speaks_the_acuitas_dialect(acuitas: AcuitasSandbox) -> None:
    with httpx.Client(base_url=acuitas.url) as http:
        assert http.get("/acuitas/api/version").json()["ProductVersion"] == "8.2.1.1045"
        missing = http.get("/acuitas/api/patients")
        assert missing.status_code == 401 and missing.json()["Status"] == "Error"
        wrong = http.post(
            "/acuitas/api/session", json={"database": DATABASE, "username": USERNAME, "password": WRONG_PASSWORD}
        )
        assert (wrong.status_code, wrong.json()["ErrorCode"]) == (401, "AUTH_FAILED")
        no_db = http.post("/acuitas/api/session", json={"database": "NOPE", "username": USERNAME, "password": PASSWORD})
        assert (no_db.status_code, no_db.json()["ErrorCode"]) == (404, "DATABASE_NOT_FOUND")
        session = http.post(
            "/acuitas/api/session", json={"database": DATABASE, "username": USERNAME, "password": PASSWORD}
        ).json()
        assert set(session) == {"token", "expiresIn"}
        auth = {"X-Acuitas-Token": session["token"]}
        page = http.get("/acuitas/api/patients", params={"offset": 0, "limit": 2}, headers=auth).json()
        assert set(page) == {"TotalCount", "Offset", "Records"} and page["TotalCount"] == 50
        row = page["Records"][0]
        assert {"PatientId", "Forename", "DateOfBirth", "MobileTel", "HomeTel", "WorkTel", "RecallDue"} <= set(row)
        datetime.strptime(row["Modified"], "%d/%m/%Y %H:%M:%S")  # day first, no offset
        bad = http.get("/acuitas/api/patients", params={"modifiedSince": "2025-01-01T00:00:00Z"}, headers=auth)
        assert (bad.status_code, bad.json()["ErrorCode"]) == (400, "INVALID_PARAMETER")
        too_many = http.get("/acuitas/api/patients", params={"limit": 501}, headers=auth)
        assert too_many.status_code == 400
        diary = http.get("/acuitas/api/diary", params={"limit": 5}, headers=auth).json()["Records"]
        assert {r["Status"] for r in diary} <= {"BK", "ARR", "CMP", "CAN", "DNA"}
        datetime.strptime(diary[0]["Start"], "%d/%m/%Y %H:%M")
        assert http.delete("/acuitas/api/diary", headers=auth).json()["ErrorCode"] == "NOT_FOUND"
        acuitas.faults.rate_429 = 1.0
        limited = http.get("/acuitas/api/patients", headers=auth)
        assert (limited.status_code, limited.json()["ErrorCode"]) == (429, "RATE_LIMITED")
        assert int(limited.headers["Retry-After"]) >= 1


def test_day_first_dates_are_read_day_first(acuitas: AcuitasSandbox) -> None:
    # 02/03/1965 is 2 March (not 3 February); 05/12/2023 is 5 December.
    acuitas.update_patient(
        DATABASE, "100003", date_of_birth=date(1965, 3, 2), last_eye_test=date(2023, 12, 5), recall_due=None
    )
    with httpx.Client(base_url=acuitas.url) as http:
        row = http.get("/acuitas/api/patients/100003", headers=login(http)).json()
    assert (row["DateOfBirth"], row["LastSightTest"], row["RecallDue"]) == ("02/03/1965", "05/12/2023", "05/12/2025")

    seeded = acuitas.patients(DATABASE)
    with open_client(acuitas.url) as client:
        result = client.read_patients(None, date.today())
        appointments = client.read_appointments(None)
        exams = client.read_clinical_records(None)
    assert result.rejected == []
    patient = next(p for p in result.patients if p.pms_patient_id == "100003")
    assert patient.date_of_birth == date(1965, 3, 2)
    assert patient.last_eye_test_date == date(2023, 12, 5)
    assert patient.pms_recall_due_date == date(2025, 12, 5)  # Acuitas's own: 24 months after the last test
    for p in result.patients:
        seed = seeded[p.pms_patient_id]
        assert p.date_of_birth == seed.date_of_birth
        assert p.last_eye_test_date == seed.last_eye_test
        assert [ph.e164 for ph in p.phones] == [
            "+44" + n.replace(" ", "")[1:] for n in (seed.mobile, seed.landline) if n
        ]
        if seed.recall_due:
            assert p.pms_recall_due_date == seed.recall_due
        assert p.pms_recall_due_date or not seed.last_eye_test  # Acuitas always gives one after a test
        # UK local time read back to UTC (a stamp in October's repeated hour reads as the earlier one).
        exact = seed.updated_at.replace(microsecond=0)
        assert p.source_updated_at in (exact, exact - timedelta(hours=1))
    # Diary starts are UK wall-clock, day first: read back to the same local day and time.
    raw_starts = {e["AppointmentId"]: e["Start"] for e in acuitas.diary_entries(DATABASE)}
    assert appointments.rejected == [] and len(appointments.records) == len(raw_starts)
    for a in appointments.records:
        assert a.starts_at.tzinfo is not None
        assert a.starts_at.astimezone(UK_TZ).strftime("%d/%m/%Y %H:%M") == raw_starts[int(a.pms_appointment_id)]
    raw_exams = {e["ExamId"]: e["ExamDate"] for e in acuitas.exams(DATABASE)}
    assert exams.rejected == []
    assert all(r.exam_date.strftime("%d/%m/%Y") == raw_exams[int(r.pms_record_id)] for r in exams.records)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ("02/03/2025 09:30", datetime(2025, 3, 2, 9, 30, tzinfo=UTC)),  # GMT
        ("02/07/2025 09:30", datetime(2025, 7, 2, 8, 30, tzinfo=UTC)),  # BST
    ],
)
def test_diary_times_are_uk_local_time(start: str, expected: datetime) -> None:
    row = {"AppointmentId": 1, "PatientId": 2, "Start": start, "Duration": 20, "Status": "ARR", "AppointmentType": "CL"}
    appointment = build_appointment("p", acuitas_appointment_draft(row))
    assert appointment.starts_at == expected
    assert appointment.ends_at == expected + timedelta(minutes=20)
    assert (appointment.status, appointment.appointment_type) == ("booked", "contact_lens")


def test_unknown_alert_codes_are_kept_as_unknown(acuitas: AcuitasSandbox) -> None:
    acuitas.update_patient(DATABASE, "100004", flags=["diabetic", "AMB", "CAT"], clinical_notes=None)
    with open_client(acuitas.url) as client:
        patient = next(p for p in client.read_patients(None, date.today()).patients if p.pms_patient_id == "100004")
        exams = client.read_clinical_records(None).records
    # AMB (amblyopia) is a binocular vision anomaly, which the child recall rules use; CAT is not.
    assert patient.risk_flags == ["binocular_vision_anomaly", "diabetic"]
    assert patient.unknown_risk_values == ["CAT"]
    # Exams carry the codes too; the recall codes map, the rest pass through.
    assert all(set(r.unknown_flags) <= {"CAT"} for r in exams)
    assert any(r.flags for r in exams)


def test_offset_paging_with_a_small_limit_reads_every_patient_once(acuitas: AcuitasSandbox) -> None:
    with open_client(acuitas.url, page_size=7) as client:
        result = client.read_patients(None, date.today())
        ids = [p.pms_patient_id for p in result.patients]
        assert len(ids) == len(set(ids)) == 50 and result.rejected == []
        assert requests_to(acuitas, "GET", "/patients") == math.ceil(50 / 7)
        acuitas.request_log.clear()
    with open_client(acuitas.url, database="ACUITAS_BRANCH2", page_size=50) as client:
        big = client.read_patients(None, date.today())
    assert len({p.pms_patient_id for p in big.patients}) == 230
    assert requests_to(acuitas, "GET", "/patients") == 5


def test_a_record_that_joins_a_filtered_read_mid_way_is_not_missed(acuitas: AcuitasSandbox) -> None:
    db = "ACUITAS_BRANCH3"  # a database of its own: other tests' edits would be "changed" too
    since = datetime.now(UTC) - timedelta(seconds=1)
    touched = acuitas.touch(db, 9)
    late = min(set(acuitas.patients(db)) - set(touched), key=int)  # sorts ahead of every touched id
    assert int(late) < int(touched[2])
    with open_client(acuitas.url, db, page_size=3) as client:
        rows = client.iter_patient_rows(since)
        first_page = [next(rows) for _ in range(3)]
        acuitas.update_patient(db, late, mobile="07700 900998")
        rest = list(rows)
        counts = Counter(str(r["PatientId"]) for r in first_page + rest)
        assert set(counts) == set(touched) | {late}
        # TotalCount grew during the pass, so the client read the (small) filtered list again: the
        # newcomer, which offset paging had stepped over, came in the second pass.
        assert counts[late] == 1 and all(counts[pid] >= 2 for pid in touched)
        result = client.read_patients(since, date.today())
    assert sorted(p.pms_patient_id for p in result.patients) == sorted(set(touched) | {late})


def test_incremental_read_sends_uk_local_modified_since(acuitas: AcuitasSandbox) -> None:
    db = "ACUITAS_BRANCH2"
    with open_client(acuitas.url, db) as client:
        before = datetime.now(UTC)
        touched = acuitas.touch(db, 0.02)
        assert len(touched) == 5
        changed = client.read_patients(before, date.today())
        assert sorted(p.pms_patient_id for p in changed.patients) == touched
        assert changed.source_ref.startswith(f"acuitas:{db} patients since ")
        assert [r for r in acuitas.request_log if "/patients" in r[1]]
        assert client.read_patients(datetime.now(UTC) + timedelta(seconds=2), date.today()).patients == []


def test_an_expired_token_is_renewed_once_transparently(acuitas: AcuitasSandbox) -> None:
    with open_client(acuitas.url) as client:
        client.test_connection()
        logins = acuitas.logins
        assert acuitas.expire_tokens() >= 1
        assert len(client.read_patients(None, date.today()).patients) == 50
        assert acuitas.logins == logins + 1
        assert client.read_appointments(None).records  # the new token keeps working
        assert acuitas.logins == logins + 1
        expired = [r for r in acuitas.request_log if r == ("POST", "/acuitas/api/session")]
        assert len(expired) >= 2


def test_a_session_that_dies_at_once_fails_clearly(acuitas: AcuitasSandbox) -> None:
    acuitas.token_ttl_seconds = 0  # every token is expired on arrival: re-login once, then give up
    with open_client(acuitas.url) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.read_patients(None, date.today())
    assert failure.value.problem == "session_expired"
    assert "clock" in failure.value.check


def test_old_versions_are_refused_with_a_clear_message() -> None:
    with AcuitasSandbox(users=USERS, version="7.4.2") as old:
        with open_client(old.url) as client:
            with pytest.raises(PmsConnectionFailed) as failure:
                client.test_connection()
            with pytest.raises(PmsConnectionFailed) as read_failure:
                client.read_patients(None, date.today())
        log = list(old.request_log)
    assert failure.value.problem == read_failure.value.problem == "unsupported_version"
    assert "Acuitas 7.4 is not supported: the API needs version 8.0 or later; ask the practice to upgrade" in str(
        failure.value
    )
    assert "Check:" in str(failure.value)
    assert {path for _, path in log} == {"/acuitas/api/version"}  # the password never went to the old server
    with AcuitasSandbox(users=USERS, version="8.0") as oldest_supported, open_client(oldest_supported.url) as client:
        assert client.test_connection().version == "8.0.0.1045"


@pytest.mark.parametrize(
    ("case", "problem", "check"),
    [
        ("wrong password", "invalid_credentials", "api_password"),
        ("unknown database", "database_not_found", "database setting"),
        ("no roles", "insufficient_permissions", "API Read"),
        ("read-only user", "insufficient_permissions", "Diary Write"),
        ("nothing listening", "unreachable", "firewall"),
    ],
)
def test_connection_failures_say_what_to_check(
    acuitas: AcuitasSandbox, case: str, problem: str, check: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{free_port()}" if case == "nothing listening" else acuitas.url
    user, password, database = {
        "wrong password": (USERNAME, WRONG_PASSWORD, DATABASE),
        "unknown database": (USERNAME, PASSWORD, "ACUITAS_LIVE"),
        "no roles": ("nvc_noroles", NO_ROLES_PASSWORD, DATABASE),
        "read-only user": ("nvc_readonly", READ_ONLY_PASSWORD, DATABASE),
        "nothing listening": (USERNAME, PASSWORD, DATABASE),
    }[case]
    with open_client(url, database, user, password, max_attempts=1) as client:
        with pytest.raises(PmsConnectionFailed) as failure:
            client.test_connection()
        if case != "read-only user":  # a read-only user can read; it is the connection test that refuses it
            with pytest.raises(PmsConnectionFailed) as read_failure:
                client.read_patients(None, date.today())
            assert read_failure.value.problem == problem
    error = failure.value
    assert error.problem == problem
    assert error.pms == "Acuitas" and error.practice_id == "demo-acuitas"
    assert check in error.check or check in str(error)
    text = f"{error} {caplog.text}"
    assert not any(secret in text for secret in SECRETS)
    assert user not in text


def test_settings_secrets_and_urls(acuitas: AcuitasSandbox) -> None:
    resource = AcuitasResource()
    assert resource.required_settings() == ("server_url", "database")
    assert resource.optional_settings() == ("ca_bundle",)
    assert resource.required_secrets() == ("api_username", "api_password")
    with pytest.raises(PmsConnectionFailed) as failure:
        resource.open(practice(acuitas.url, database=""), {"api_username": USERNAME, "api_password": PASSWORD})
    assert failure.value.problem == "missing_setting" and "database" in str(failure.value)
    with pytest.raises(PmsConnectionFailed) as failure:
        resource.open(practice(acuitas.url), {"api_username": USERNAME})
    assert failure.value.problem == "missing_secret" and "api_password" in str(failure.value)
    for url in ("http://192.168.1.20:8443", "ftp://127.0.0.1/", "not a url"):
        with pytest.raises(PmsConnectionFailed) as failure:
            open_client(url)
        assert failure.value.problem == "unsafe_url" and PASSWORD not in str(failure.value)
    # The API root may be given with its /acuitas/api prefix.
    with open_client(acuitas.url + "/acuitas/api/") as client:
        assert client.test_connection().pms == "Acuitas"


def test_429_and_500_are_retried_and_the_read_completes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resources.acuitas")
    # A bucket of 5 requests a second and 11 requests: the 6th gets a 429 with Retry-After: 1.
    with AcuitasSandbox(users=USERS, rate_limit_per_second=5) as server:
        with open_client(server.url, page_size=5, max_attempts=5) as client:
            result = client.read_patients(None, date.today())
        throttled = server.throttled
    assert len({p.pms_patient_id for p in result.patients}) == 50
    assert throttled >= 1
    assert "HTTP 429" in caplog.text
    assert not any(secret in caplog.text for secret in SECRETS)


def test_server_errors_are_retried_for_reads_and_reported_when_they_persist(acuitas: AcuitasSandbox) -> None:
    acuitas.faults.rate_500 = 0.3
    with open_client(acuitas.url, max_attempts=6) as client:
        assert len(client.read_patients(None, date.today()).patients) == 50
    acuitas.faults.rate_500 = 1.0
    with open_client(acuitas.url, max_attempts=2) as client, pytest.raises(PmsConnectionFailed) as failure:
        client.test_connection()
    assert failure.value.problem == "pms_error"
    assert "HTTP 500" in str(failure.value) and "INTERNAL_ERROR" in str(failure.value)


def test_a_booking_writes_the_marker_into_comments_and_is_found_again(acuitas: AcuitasSandbox) -> None:
    start, end = future_slot(3, days_ahead=500)
    booking = BookingRequest("acuitas-bk-1", "100010", start, end, "eye_test", OPTOM, "Booked on an NVC call " * 20)
    with open_client(acuitas.url) as client:
        made = client.create_appointment(booking)
        again = client.create_appointment(booking)
        read = {a.pms_appointment_id: a for a in client.read_appointments(None).records}
    assert made.created is True and again == type(again)(made.pms_appointment_id, False)
    entry = next(e for e in acuitas.diary_entries(DATABASE) if str(e["AppointmentId"]) == made.pms_appointment_id)
    assert entry["Comments"].startswith("[NVC:acuitas-bk-1] Booked on an NVC call")
    assert len(entry["Comments"]) <= 255  # long notes are cut, the marker survives
    assert entry["Optom"] == OPTOM and entry["AppointmentType"] == "ST" and entry["Status"] == "BK"
    assert entry["Start"] == start.astimezone(UK_TZ).strftime("%d/%m/%Y %H:%M")
    appointment = read[made.pms_appointment_id]
    assert (appointment.nvc_reference, appointment.starts_at, appointment.ends_at) == ("acuitas-bk-1", start, end)
    # The lookup before the write is what made the second call a no-op: one POST in all.
    assert requests_to(acuitas, "POST", "/acuitas/api/diary") == 1


def test_a_lost_response_is_found_by_lookup_not_written_twice(acuitas: AcuitasSandbox) -> None:
    start, end = future_slot(7, days_ahead=500)
    booking = BookingRequest("acuitas-lost-1", "100013", start, end, "eye_test", OPTOM)
    note = PatientNote("acuitas-lost-note", "100013", NoteKind.CALL_OUTCOME, datetime.now(UTC), "Booked", "booked")
    with open_client(acuitas.url) as client:
        client.test_connection()  # log in first: the fault drops every answer to a POST, logins included
        acuitas.faults.lost_response_after_write_rate = 1.0
        made = client.create_appointment(booking)
        noted = client.add_note(note)
        acuitas.faults.lost_response_after_write_rate = 0
    assert made.created is True and noted.created is True
    assert [
        a["pms_appointment_id"] for a in acuitas.nvc_appointments(DATABASE) if a["nvc_reference"] == "acuitas-lost-1"
    ] == [made.pms_appointment_id]
    assert [n["pms_note_id"] for n in acuitas.nvc_notes(DATABASE) if n["nvc_reference"] == "acuitas-lost-note"] == [
        noted.pms_note_id
    ]
    assert requests_to(acuitas, "POST", "/acuitas/api/diary") == 1
    assert requests_to(acuitas, "POST", "/callnotes") == 1


def test_write_refusals_are_clear(acuitas: AcuitasSandbox) -> None:
    start, end = future_slot(5, days_ahead=500)
    with open_client(acuitas.url) as client:
        with pytest.raises(PmsError) as info:
            client.create_appointment(BookingRequest("acuitas-bad-optom", "100011", start, end, "eye_test", "ZZZ"))
        assert info.value.problem == "invalid_booking" and "ZZZ" in str(info.value)
        with pytest.raises(PmsError) as info:
            client.create_appointment(BookingRequest("acuitas-bad-type", "100011", start, end, "other", OPTOM))
        assert info.value.problem == "invalid_booking"
        with pytest.raises(PmsError) as info:
            note = PatientNote("acuitas-note-ghost", "999999", NoteKind.CALL_OUTCOME, datetime.now(UTC), "x", "booked")
            client.add_note(note)
        assert info.value.problem == "patient_not_found"
    with open_client(acuitas.url, username="nvc_readonly", password=READ_ONLY_PASSWORD) as client:
        with pytest.raises(PmsError) as info:
            client.create_appointment(BookingRequest("acuitas-ro", "100011", start, end, "eye_test", OPTOM))
        assert info.value.problem == "insufficient_permissions"


def test_call_outcomes_and_attempts_become_call_notes(acuitas: AcuitasSandbox) -> None:
    when = datetime(2025, 7, 2, 13, 5, 0, tzinfo=UTC)
    notes = [
        PatientNote("acuitas-note-a", "100012", NoteKind.CALL_ATTEMPT, when, "No answer after 6 rings", "no_answer"),
        PatientNote("acuitas-note-b", "100012", NoteKind.CALL_OUTCOME, when, "Booked for 3 Sept", "booked"),
    ]
    with open_client(acuitas.url) as client:
        results = [client.add_note(n) for n in notes]
        assert all(r.created for r in results)
        assert client.add_note(notes[1]) == type(results[1])(results[1].pms_note_id, False)
    landed = {n["nvc_reference"]: n for n in acuitas.nvc_notes(DATABASE)}
    assert landed["acuitas-note-a"]["kind"] == "call_attempt" and landed["acuitas-note-a"]["outcome"] == "NO_ANSWER"
    assert landed["acuitas-note-b"]["kind"] == "call_outcome" and landed["acuitas-note-b"]["outcome"] == "BOOKED"
    assert landed["acuitas-note-b"]["call_time"] == when  # 14:05 BST on the wire
    assert requests_to(acuitas, "POST", "/callnotes") == 2


def test_tls_certificate_failures_have_their_own_problem(acuitas: AcuitasSandbox) -> None:
    with open_client(acuitas.url) as client:
        error = client._translate(httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] self-signed certificate"))
        assert error.problem == "tls_certificate" and "self-signed" in error.check
        refused = client._translate(HttpStatusError(404, {"ErrorCode": "NOT_FOUND", "Message": "No API route"}))
        assert refused.problem == "api_not_found"


def test_the_client_never_deletes(acuitas: AcuitasSandbox) -> None:
    with open_client(acuitas.url) as client:
        client.test_connection()
        client.read_patients(None, date.today())
        client.read_appointments(None)
        client.read_clinical_records(None)
    assert acuitas.request_log
    assert {method for method, _ in acuitas.request_log} <= {"GET", "POST"}
    assert not any(name.startswith(("delete", "remove")) for name in dir(AcuitasClient))


def test_a_practice_ca_bundle_that_cannot_be_used_is_a_clear_tls_failure(tmp_path) -> None:
    settings = {"server_url": "https://acuitas.practice.example:8443", "database": DATABASE}
    for bundle in (tmp_path / "missing.pem", tmp_path / "empty.pem"):
        if bundle.name == "empty.pem":
            bundle.write_text("not a certificate\n")
        p = Practice("demo-acuitas", "Demo", PmsKind.ACUITAS, {**settings, "ca_bundle": str(bundle)}, "connected")
        with pytest.raises(PmsConnectionFailed) as info:
            AcuitasResource().open(p, {"api_username": USERNAME, "api_password": PASSWORD})
        assert info.value.problem == "tls_certificate" and "ca_bundle" in str(info.value)
        assert PASSWORD not in str(info.value)


# --- status, contact preferences and guardians -------------------------------------------------------

TODAY = date.today()


def patient_row(**fields: object) -> dict[str, object]:
    """An Acuitas patient as the API sends it, with `fields` changed (None removes a field)."""
    row: dict[str, object] = {
        "PatientId": 100001,
        "Title": "Mrs",
        "Forename": "Siân",
        "Surname": "O'Neill",
        "DateOfBirth": "02/03/1965",
        "MobileTel": "07700 900123",
        "HomeTel": "",
        "WorkTel": "",
        "Email": "",
        "LastSightTest": "05/12/2023",
        "RecallDue": "05/12/2025",
        "ClinicalAlerts": [],
        "Notes": "",
        "Modified": "01/06/2025 10:00:00",
        "RecordStatus": "ACT",
        "Deceased": False,
        "DateOfDeath": "",
        "GoneAway": False,
        "GoneAwayDate": "",
        "ParentGuardian": "",
        "DataProcessing": {"RecallConsent": "Agreed", "Channels": {"Telephone": "OptIn", "SMS": "OptIn", "Email": ""}},
    }
    for name, value in fields.items():
        if value is None:
            row.pop(name, None)
        else:
            row[name] = value
    return row


def translate(**fields: object):
    return build_patient("p", acuitas_draft(patient_row(**fields)), TODAY, strict=False)


def screen(recall: str = "Agreed", telephone: object = "OptIn", sms: object = "", email: object = "") -> dict:
    return {"RecallConsent": recall, "Channels": {"Telephone": telephone, "SMS": sms, "Email": email}}


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ACT", PatientStatus.ACTIVE),
        ("ARC", PatientStatus.INACTIVE),
        ("LFT", PatientStatus.INACTIVE),
        ("MRG", PatientStatus.INACTIVE),
        ("DEC", PatientStatus.DECEASED),
        ("", PatientStatus.ACTIVE),  # blank: never set
        (None, PatientStatus.ACTIVE),  # absent: a server that predates the field
        (" arc ", PatientStatus.INACTIVE),  # codes are read whatever their case and spacing
    ],
)
def test_each_record_status_code(code: str | None, expected: PatientStatus) -> None:
    patient = translate(RecordStatus=code)  # None: the field is absent
    assert patient.status == expected
    assert patient.status_date is None


def test_the_deceased_tick_and_date_outrank_the_record_status() -> None:
    ticked = translate(RecordStatus="ACT", Deceased=True, DateOfDeath="02/03/2025")  # ticked, not archived
    assert (ticked.status, ticked.status_date) == (PatientStatus.DECEASED, date(2025, 3, 2))  # day first
    no_date = translate(RecordStatus="ARC", Deceased=True)
    assert (no_date.status, no_date.status_date) == (PatientStatus.DECEASED, None)
    coded = translate(RecordStatus="DEC", DateOfDeath="27/10/2025")  # the code without the tick
    assert (coded.status, coded.status_date) == (PatientStatus.DECEASED, date(2025, 10, 27))
    dated = translate(DateOfDeath="27/10/2025")  # a date of death with no tick still means deceased
    assert dated.status == PatientStatus.DECEASED
    old_server = translate(Deceased="Y", DateOfDeath="27/10/2025 00:00:00")
    assert (old_server.status, old_server.status_date) == (PatientStatus.DECEASED, date(2025, 10, 27))
    both = translate(Deceased=True, GoneAway=True, DateOfDeath="01/01/2025")
    assert both.status == PatientStatus.DECEASED


def test_gone_away_is_a_tick_on_an_active_record() -> None:
    moved = translate(GoneAway=True)
    assert (moved.status, moved.status_date) == (PatientStatus.GONE_AWAY, None)
    dated = translate(GoneAway="true", GoneAwayDate="14/08/2025")
    assert (dated.status, dated.status_date) == (PatientStatus.GONE_AWAY, date(2025, 8, 14))
    archived_and_moved = translate(RecordStatus="ARC", GoneAway=True)
    assert archived_and_moved.status == PatientStatus.GONE_AWAY


def test_unknown_words_reject_the_row_with_the_word_in_the_reason() -> None:
    with pytest.raises(InvalidValue, match=r"RecordStatus 'SUS' is not known \(ACT, ARC, LFT, MRG, DEC\)"):
        acuitas_draft(patient_row(RecordStatus="SUS"))
    with pytest.raises(InvalidValue, match="Deceased 'maybe' is not a tick"):
        acuitas_draft(patient_row(Deceased="maybe"))
    with pytest.raises(InvalidValue, match="RecallConsent 'Pending' is not known"):
        acuitas_draft(patient_row(DataProcessing=screen(recall="Pending")))
    with pytest.raises(InvalidValue, match="Telephone choice 'Ask first' is not known") as both:
        acuitas_draft(patient_row(RecordStatus="XX", DataProcessing=screen(telephone="Ask first")))
    assert "RecordStatus 'XX'" in str(both.value)  # every unreadable word is named at once
    with pytest.raises(InvalidValue, match="not a Data Processing record"):
        acuitas_draft(patient_row(DataProcessing="Agreed"))
    # A tick settles the status whatever an unknown code says.
    assert translate(RecordStatus="SUS", Deceased=True).status == PatientStatus.DECEASED
    assert translate(RecordStatus="SUS", GoneAway=True).status == PatientStatus.GONE_AWAY
    # A date of death that cannot be read does not undo the tick: still deceased, with no date (a
    # rejected row would leave the stored copy alive and callable).
    unreadable = translate(Deceased=True, DateOfDeath="31/02/2025")
    assert unreadable.status == PatientStatus.DECEASED and unreadable.status_date is None


@pytest.mark.parametrize(
    ("recall", "no_recall"),
    [("Agreed", False), ("Rejected", True), ("To Be Completed", False), ("Expired", False), ("", False)],
)
def test_recall_consent_only_a_refusal_stops_recalls(recall: str, no_recall: bool) -> None:
    patient = translate(DataProcessing=screen(recall=recall))
    assert patient.contact.no_recall is no_recall
    assert patient.contact.phone_recall is True


def test_channel_choices_become_phone_recall_and_consented_channels() -> None:
    objector = translate(DataProcessing=screen(telephone="OptOut", sms="OptIn", email="OptOut"))
    assert objector.contact.phone_recall is False
    assert objector.contact.channels == {Channel.SMS}
    assert objector.contact.may_phone is False
    happy = translate(DataProcessing=screen(telephone="Opt In", sms="opt-out", email="OPTIN"))
    assert happy.contact.phone_recall is True and happy.contact.channels == {Channel.PHONE, Channel.EMAIL}
    assert happy.contact.may_phone is True
    # Telephone never asked but SMS answered: channels are recorded, and the phone is not refused.
    unasked = translate(DataProcessing=screen(telephone="", sms="OptOut"))
    assert unasked.contact.phone_recall is True
    assert unasked.contact.channels == {Channel.PHONE} and unasked.contact.may_phone is True


def test_missing_contact_fields_are_not_a_refusal() -> None:
    for fields in (
        {"DataProcessing": None},  # a server without the Data Processing screen
        {"DataProcessing": {}},
        {"DataProcessing": {"RecallConsent": "To Be Completed"}},
        {"DataProcessing": screen(recall="To Be Completed", telephone="", sms="", email="")},
        {"DataProcessing": {"RecallConsent": "", "Channels": {"Telephone": None}}},
    ):
        patient = translate(**fields)
        assert patient.contact.phone_recall is True, fields
        assert patient.contact.no_recall is False, fields
        assert patient.contact.channels is None, fields
        assert patient.contact.may_phone is True, fields
    bare = translate(
        RecordStatus=None, Deceased=None, DateOfDeath=None, GoneAway=None, ParentGuardian=None, DataProcessing=None
    )
    assert (bare.status, bare.status_date, bare.guardian_name) == (PatientStatus.ACTIVE, None, None)


def test_guardian_present_or_absent() -> None:
    child = translate(ParentGuardian="  Mrs  Siân O'Neill ", Forename="Alfie", Title="Master")
    assert child.guardian_name == "Mrs Siân O'Neill"  # spacing tidied, spelling kept
    for blank in ("", "   ", None):
        assert translate(ParentGuardian=blank).guardian_name is None


def test_the_sandbox_renders_status_and_contact_in_acuitas_words(acuitas: AcuitasSandbox) -> None:
    truth = acuitas.seed_records(CONTACT_DB)
    assert len(truth) == 60 and all(pid.isdigit() for pid in truth)

    def first(test) -> str:
        return next(pid for pid, p in truth.items() if test(p))

    cases = {
        "deceased": first(lambda p: p.status == "deceased" and p.status_date),
        "gone_away": first(lambda p: p.status == "gone_away"),
        "inactive": first(lambda p: p.status == "inactive"),
        "objector": first(lambda p: p.status == "active" and not p.phone_recall),
        "child": first(lambda p: p.guardian_name),
    }
    with httpx.Client(base_url=acuitas.url) as http:
        auth = login(http, database=CONTACT_DB)
        rows = {k: http.get(f"/acuitas/api/patients/{pid}", headers=auth).json() for k, pid in cases.items()}
    dead = rows["deceased"]
    assert (dead["RecordStatus"], dead["Deceased"], dead["GoneAway"]) == ("DEC", True, False)
    assert dead["DateOfDeath"] == truth[cases["deceased"]].status_date.strftime("%d/%m/%Y")
    moved = rows["gone_away"]
    assert (moved["RecordStatus"], moved["GoneAway"], moved["Deceased"], moved["DateOfDeath"]) == (
        "ACT",
        True,
        False,
        "",
    )
    assert rows["inactive"]["RecordStatus"] == "ARC"
    assert rows["objector"]["DataProcessing"]["Channels"]["Telephone"] == "OptOut"
    assert rows["child"]["ParentGuardian"] == truth[cases["child"]].guardian_name
    assert all(set(r["DataProcessing"]) == {"RecallConsent", "Channels"} for r in rows.values())
    assert all(set(r["DataProcessing"]["Channels"]) == {"Telephone", "SMS", "Email"} for r in rows.values())
    assert rows["objector"]["ParentGuardian"] == ""  # blanks as "", never null


def test_a_patient_marked_deceased_or_opted_out_mid_day_arrives_incrementally(acuitas: AcuitasSandbox) -> None:
    truth = acuitas.seed_records(CONTACT_DB)
    callable_ids = [
        pid for pid, p in truth.items() if p.status == "active" and p.phone_recall and not p.no_recall and p.mobile
    ]
    died, objector, refused, guarded = callable_ids[:4]
    with open_client(acuitas.url, CONTACT_DB) as client:
        since = datetime.now(UTC) - timedelta(seconds=1)
        assert client.read_patients(since, TODAY).patients == []  # nothing changed yet
        acuitas.update_patient(CONTACT_DB, died, status="deceased", status_date=TODAY - timedelta(days=2))
        acuitas.update_patient(CONTACT_DB, objector, phone_recall=False)
        acuitas.update_patient(CONTACT_DB, refused, no_recall=True, sms_consent=False, email_consent=None)
        acuitas.update_patient(CONTACT_DB, guarded, guardian_name="Mr Tom O'Neill")
        changed = client.read_patients(since, TODAY)
    assert changed.rejected == []
    got = {p.pms_patient_id: p for p in changed.patients}
    assert set(got) == {died, objector, refused, guarded}
    assert (got[died].status, got[died].status_date) == (PatientStatus.DECEASED, TODAY - timedelta(days=2))
    assert got[objector].contact.phone_recall is False and got[objector].contact.may_phone is False
    assert got[objector].status == PatientStatus.ACTIVE
    assert got[refused].contact.no_recall is True and got[refused].contact.may_phone is False
    assert Channel.SMS not in (got[refused].contact.channels or ())
    assert got[guarded].guardian_name == "Mr Tom O'Neill"
    # Each edit bumped Modified like any other field's.
    assert all(p.source_updated_at and p.source_updated_at >= since.replace(microsecond=0) for p in got.values())


def test_an_unknown_status_code_is_a_rejected_row_not_a_guess(acuitas: AcuitasSandbox) -> None:
    truth = acuitas.seed_records(CONTACT_DB)
    pid = next(pid for pid, p in truth.items() if p.status == "active")
    before = truth[pid]
    acuitas.update_patient(CONTACT_DB, pid, status="SUS")  # a code Acuitas may grow: sent verbatim
    try:
        with open_client(acuitas.url, CONTACT_DB) as client:
            result = client.read_patients(None, TODAY)
        rejected = {r.row_ref: r for r in result.rejected}
        assert set(rejected) == {pid}
        assert "Acuitas RecordStatus 'SUS' is not known" in rejected[pid].reason
        assert rejected[pid].raw["RecordStatus"] == "SUS"
        assert len(result.patients) == 59
    finally:
        acuitas.update_patient(CONTACT_DB, pid, status=before.status)


def test_update_patient_refuses_contact_values_it_cannot_render(acuitas: AcuitasSandbox) -> None:
    pid = next(iter(acuitas.seed_records(CONTACT_DB)))
    for bad in ({"phone_recall": "no"}, {"sms_consent": "yes"}, {"status_date": "01/01/2025"}, {"status": ""}):
        with pytest.raises(ValueError):
            acuitas.update_patient(CONTACT_DB, pid, **bad)
