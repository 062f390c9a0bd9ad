"""The base every HTTP PMS client shares (`resources.base`), checked across all four PMS at once
against their loopback sandboxes: the error table, one meaning of `created` after a lost response,
and one backoff policy for writes."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

import resources.base as base
from nvc_pipelines.application.demo import demo_connections, start_sandboxes
from nvc_pipelines.model import BookingRequest, NoteKind, PatientNote, Practice
from nvc_pipelines.retry import WRITE_BACKOFF_CAP_SECONDS, write_wait
from resources.acuitas import AcuitasResource
from resources.base import ErrorRule, PmsClientBase
from resources.http import HttpPmsResource, HttpStatusError
from resources.optisoft import OptisoftResource
from resources.optix import OptixResource
from resources.protocol import PmsConnectionFailed, PmsError
from resources.sycle import SycleResource
from sandboxes.acuitas import optom_codes
from sandboxes.base import SandboxServer
from tests.pms_contract import TODAY, future_slot

PMS = ("optix", "acuitas", "optisoft", "sycle")
RESOURCES: dict[str, type[HttpPmsResource]] = {
    "optix": OptixResource,
    "acuitas": AcuitasResource,
    "optisoft": OptisoftResource,
    "sycle": SycleResource,
}
# Where each sandbox keeps what NVC wrote (`nvc_appointments(ref)`, `nvc_notes(ref)`).
REFS = {"optix": "OPX-1001", "acuitas": "ACUITAS_DEMO", "optisoft": "OS-1001", "sycle": "2803-9506"}


@pytest.fixture(scope="module")
def sandboxes() -> Iterator[dict[str, SandboxServer]]:
    started = start_sandboxes(0)
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def connections(sandboxes: dict[str, SandboxServer]) -> dict[str, tuple[Practice, dict[str, str]]]:
    out = {}
    for (practice_id, kind, name, settings, secrets), pms in zip(demo_connections(sandboxes), PMS, strict=True):
        out[pms] = (Practice(practice_id, name, kind, settings, "connected"), secrets)
    return out


@pytest.fixture(scope="module")
def clinicians(sandboxes: dict[str, SandboxServer]) -> dict[str, str]:
    optisoft = sandboxes["optisoft"].select(REFS["optisoft"], "SELECT GOCNumber, Active FROM Clinicians")  # type: ignore[attr-defined]
    return {
        "optix": "C01",
        "acuitas": next(code for code, c in optom_codes(REFS["acuitas"]).items() if c.goc_number.startswith("01-")),
        "optisoft": next(c["GOCNumber"] for c in optisoft if c["Active"] and c["GOCNumber"].startswith("01-")),
        "sycle": "2803-S01",
    }


def open_client(connections: dict[str, tuple[Practice, dict[str, str]]], pms: str, **config: Any) -> PmsClientBase:
    practice, secrets = connections[pms]
    resource = RESOURCES[pms](**{"max_attempts": 4, "backoff_seconds": 0.01, "timeout_seconds": 10.0, **config})
    client = resource.open(practice, secrets)
    assert isinstance(client, PmsClientBase)
    return client


def first_patient(client: PmsClientBase) -> str:
    return sorted(p.pms_patient_id for p in client.read_patients(None, TODAY).patients)[0]  # type: ignore[attr-defined]


# --- the error table -----------------------------------------------------------------------------------


def test_a_rule_matches_on_every_condition_it_sets() -> None:
    rule = ErrorRule("slot_taken", "m", "c", status=409, code=("A", "B"), on="booking")
    assert rule.matches(409, "A", "booking") and rule.matches(409, "B", "booking")
    assert not rule.matches(409, "A", None)  # a read
    assert not rule.matches(409, "A", "note")
    assert not rule.matches(400, "A", "booking") and not rule.matches(409, "C", "booking")
    writes = ErrorRule("invalid_{kind}", "m", "c", status=(400, 422), on=base.WRITES)
    assert writes.matches(422, "", "note") and writes.matches(400, "x", "booking") and not writes.matches(400, "", None)
    assert ErrorRule("any", "m", "c").matches(418, "whatever", None)


# (status, body, write, problem): per PMS, answers its table names, one shared failure, and the fallback.
TABLES: dict[str, list[tuple[int, Any, str | None, str]]] = {
    "optix": [
        (401, {"error": {"code": "unauthorized", "message": "Bad key"}}, None, "invalid_credentials"),
        (403, {"error": {"code": "api_access_disabled"}}, None, "api_access_disabled"),
        (404, {"error": {"code": "patient_not_found"}}, "booking", "patient_not_found"),
        (409, {"error": {"code": "slot_conflict"}}, "booking", "slot_taken"),
        (409, {"error": {"code": "conflict"}}, None, "bad_request"),  # a 409 is a taken slot only for a booking
        (422, {"error": {"code": "validation"}}, "note", "invalid_note"),
        (422, {"error": {"code": "validation"}}, None, "bad_request"),
    ],
    "acuitas": [
        (401, {"ErrorCode": "TOKEN_EXPIRED"}, None, "session_expired"),
        (401, {"ErrorCode": "AUTH_FAILED"}, None, "invalid_credentials"),
        (503, {"ErrorCode": "DATABASE_NOT_FOUND"}, None, "database_not_found"),  # the code outranks the status
        (404, {"ErrorCode": "PATIENT_NOT_FOUND"}, "note", "patient_not_found"),
        (409, {}, "booking", "slot_taken"),
        (400, {"ErrorCode": "INVALID_OPTOM"}, "booking", "invalid_booking"),
    ],
    "optisoft": [
        (503, {"code": "CONNECTOR_OFFLINE", "message": "not polling"}, None, "connector_offline"),
        (504, {"code": "CONNECTOR_TIMEOUT"}, None, "connector_timeout"),
        (401, {"code": "DB_LOGIN_FAILED"}, None, "invalid_credentials"),
        (409, {"code": "SLOT_TAKEN"}, "booking", "slot_taken"),
        (422, {"code": "CLINICIAN_INACTIVE"}, "booking", "invalid_clinician"),
        (404, {"code": "NOT_FOUND"}, None, "pms_error"),
    ],
    "sycle": [
        (401, {"errors": [{"code": "invalid_credentials"}]}, None, "invalid_credentials"),
        (403, {"errors": [{"code": "api_disabled"}]}, None, "api_access_disabled"),
        (404, {"errors": [{"code": "clinic_not_found"}]}, None, "location_not_found"),
        (404, {"errors": [{"code": "patient_not_found"}]}, "booking", "patient_not_found"),
        (409, {"errors": [{"code": "slot_unavailable"}]}, "booking", "slot_taken"),
        (422, {"errors": [{"code": "invalid"}]}, "booking", "invalid_booking"),
        (422, {"errors": [{"code": "invalid"}]}, "note", "invalid_note"),
    ],
}


@pytest.mark.parametrize("pms", PMS)
def test_each_pms_translates_through_its_own_table(connections, pms: str) -> None:
    with open_client(connections, pms) as client:
        for status, body, write, problem in TABLES[pms]:
            error = client._translate(HttpStatusError(status, body), on=write)
            assert error.problem == problem, (status, body, write, str(error))
            assert str(error).startswith(f"{client.pms_name} (practice {client.practice.practice_id}): ")
            assert "{" not in str(error) and "Check:" in str(error)  # every template was filled
        # What every HTTP PMS shares comes from one place, worded per PMS.
        assert client._translate(HttpStatusError(502, "bad gateway")).problem == "pms_error"
        assert client._translate(HttpStatusError(429, None)).problem == "rate_limited"
        assert client._translate(httpx.ConnectError("refused")).problem == "unreachable"
        tls = client._translate(httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] self-signed certificate"))
        assert tls.problem == "tls_certificate" and isinstance(tls, PmsConnectionFailed)
        # A status no row names is the fallback: a request NVC should not have sent.
        assert client._translate(HttpStatusError(418, {})).problem == "bad_request"


@pytest.mark.parametrize("pms", PMS)
def test_secrets_are_scrubbed_from_what_the_pms_said(connections, pms: str) -> None:
    _, secrets = connections[pms]
    with open_client(connections, pms) as client:
        for secret in secrets.values():
            for echo in (secret, secret.upper()):
                said = {
                    "optix": {"error": {"code": "bad", "message": f"login {echo} refused"}},
                    "acuitas": {"ErrorCode": "BAD", "Message": f"login {echo} refused"},
                    "optisoft": {"code": "BAD", "message": f"login {echo} refused"},
                    "sycle": {"errors": [{"code": "bad", "detail": f"login {echo} refused"}]},
                }[pms]
                text = str(client._translate(HttpStatusError(418, said)))
                assert "refused" in text and secret.lower() not in text.lower(), text


# --- one exactly-once write: the same `created` everywhere ------------------------------------------


@pytest.mark.parametrize("pms", PMS)
def test_a_write_found_after_a_lost_response_is_created_by_this_call(
    sandboxes, connections, clinicians, pms: str
) -> None:
    """Every PMS gives the same answer: the record a lost answer's send made counts as created by
    this call (the outbox's `already_there` stays for deliveries that wrote nothing); asking again
    finds it and says `created=False`; there is one record."""
    sandbox, ref = sandboxes[pms], REFS[pms]
    with open_client(connections, pms) as client:
        client.test_connection()  # Acuitas logs in with a POST: log in before answers to POSTs are lost
        pid = first_patient(client)
        start, end = future_slot(1, days_ahead=900)
        booking = BookingRequest(f"base-lost-{pms}", pid, start, end, "eye_test", clinicians[pms], "NVC")
        note = PatientNote(f"base-lost-note-{pms}", pid, NoteKind.CALL_OUTCOME, datetime.now(UTC), "Booked", "booked")
        sandbox.faults.lost_response_after_write_rate = 1.0
        try:
            made = client.create_appointment(booking)  # type: ignore[attr-defined]
            noted = client.add_note(note)  # type: ignore[attr-defined]
        finally:
            sandbox.faults.lost_response_after_write_rate = 0
        again = client.create_appointment(booking)  # type: ignore[attr-defined]
        noted_again = client.add_note(note)  # type: ignore[attr-defined]
    assert (made.created, noted.created) == (True, True)
    assert (again.pms_appointment_id, again.created) == (made.pms_appointment_id, False)
    assert (noted_again.pms_note_id, noted_again.created) == (noted.pms_note_id, False)
    assert [a["nvc_reference"] for a in sandbox.nvc_appointments(ref)].count(booking.idempotency_key) == 1
    assert [n["nvc_reference"] for n in sandbox.nvc_notes(ref)].count(note.idempotency_key) == 1


# --- one backoff policy ----------------------------------------------------------------------------------


def test_the_write_backoff_doubles_to_one_cap_with_jitter_and_honours_retry_after() -> None:
    random.seed(3)
    waits = [write_wait(retry, 1.0) for retry in range(1, 9)]
    for retry, wait in enumerate(waits, 1):
        floor = min(WRITE_BACKOFF_CAP_SECONDS, 2.0 ** (retry - 1))
        assert floor <= wait <= floor + 1.0
    assert max(waits) <= WRITE_BACKOFF_CAP_SECONDS + 1.0
    assert len({round(w % 1, 6) for w in waits}) > 1  # jittered
    assert write_wait(5, 1.0, retry_after=2.5) == 2.5


class RefusedWrites(httpx.BaseTransport):
    """Real HTTP to the sandbox, except that a write (a POST carrying NVC's marker, Sycle's `appointment`
    GET, or Optisoft's `diary.book`) is refused before it is sent: nothing lands, so the client waits and
    tries again."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner = inner
        self.refused = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sycle_write = request.url.path.endswith(("/api/vendor/appointment/", "/api/vendor/communication/"))
        body = request.read() if request.method == "POST" or sycle_write else b""
        optisoft = b'"operation"' in body
        if (b'"diary.book"' in body) if optisoft else (b"[NVC:" in body):
            self.refused += 1
            raise httpx.ConnectError("connection refused", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("pms", PMS)
def test_every_pms_waits_between_writes_by_the_one_policy(
    connections, clinicians, pms: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the same random seed, every PMS waits exactly the same between tries of a refused
    write: `write_wait`, capped at `WRITE_BACKOFF_CAP_SECONDS` plus jitter, `max_attempts` tries."""
    slept: list[float] = []

    class Clock:
        sleep: Callable[[float], None] = staticmethod(slept.append)

    monkeypatch.setattr(base, "time", Clock)
    backoff = 6.0
    with open_client(connections, pms, max_attempts=4, backoff_seconds=backoff) as client:
        client.test_connection()
        pid = first_patient(client)
        transport = RefusedWrites(client.http.client._transport)
        client.http.client._transport = transport
        start, end = future_slot(3, days_ahead=900)
        booking = BookingRequest(f"base-refused-{pms}", pid, start, end, "eye_test", clinicians[pms], "NVC")
        random.seed(11)
        with pytest.raises(PmsError) as failure:
            client.create_appointment(booking)  # type: ignore[attr-defined]
    assert failure.value.problem == "unreachable" and transport.refused == 4
    random.seed(11)
    assert slept == [write_wait(retry, backoff) for retry in (1, 2, 3)]
    assert slept[1] >= WRITE_BACKOFF_CAP_SECONDS and all(w <= WRITE_BACKOFF_CAP_SECONDS + backoff for w in slept)
