"""Optix: the resource against the Optix sandbox over real loopback HTTP, and the shared seed data."""

from __future__ import annotations

import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import httpx
import phonenumbers
import pytest

from nvc_pipelines.model import PhoneType, PmsKind, Practice
from nvc_pipelines.normalise import is_ofcom_drama_number, normalise_phone
from nvc_pipelines.sandboxes.base import Faults
from nvc_pipelines.sandboxes.optix import OptixSandbox
from nvc_pipelines.sandboxes.seed import seed_patients
from resources.optix import OptixClient, OptixResource
from resources.protocol import PmsClient, PmsConnectionFailed

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
    """The shared server with no faults and an empty request log (tests compare against its current data)."""
    running_sandbox.faults = Faults()
    running_sandbox.request_log.clear()
    running_sandbox.throttled = 0
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
    assert resource.optional_settings() == ("api_url",)
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
    assert sandbox.request_log
    assert {method for method, _ in sandbox.request_log} == {"GET"}
    assert not any(name.startswith(("delete", "remove")) for name in dir(OptixClient))


# --- the sandbox's own dialect ------------------------------------------------------------------------


def test_sandbox_speaks_optix_errors(sandbox: OptixSandbox) -> None:
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
        sandbox.faults.rate_429 = 1.0
        limited = http.get(base, headers=auth)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1


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
    mobiles = [p.mobile for p in patients if p.mobile]
    assert len(mobiles) == len(set(mobiles))
    assert sum(1 for m in mobiles if is_ofcom_drama_number(m.replace(" ", "")[1:])) == 1000
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


# Slow-ish (a few seconds): the biggest practice the product supports must seed and page quickly.
def test_a_200000_patient_practice_seeds_and_serves_pages_quickly() -> None:
    started = time.perf_counter()
    with OptixSandbox(practices={"OPX-BIG": 200_000}, api_keys={KEY: "OPX-BIG"}) as server:
        assert isinstance(server, OptixSandbox)
        assert server.patient_count("OPX-BIG") == 200_000
        assert time.perf_counter() - started < 30
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            http.get("/api/v2/practices/OPX-BIG")  # warm the connection
            cursor = None
            for _ in range(3):
                t0 = time.perf_counter()
                params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
                page = http.get("/api/v2/practices/OPX-BIG/patients", params=params).json()
                elapsed = time.perf_counter() - t0
                assert len(page["data"]) == 1000
                assert elapsed < 0.5  # typically ~40 ms; generous for a loaded CI machine
                cursor = page["pagination"]["nextCursor"]
