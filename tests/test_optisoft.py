"""Optisoft: the resource against a real relay on loopback and a real Optisoft Connector process
that long-polls it and runs SQL on the practice's own (SQLite) database."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

import resources.optisoft as optisoft_resource
from nvc_pipelines.model import BookingRequest, Channel, NoteKind, PatientNote, PatientStatus, PmsKind, Practice
from nvc_pipelines.normalise import build_patient
from nvc_pipelines.recall import add_months
from resources.optisoft import (
    MAX_BANDS,
    OptisoftClient,
    OptisoftResource,
    optisoft_draft,
    recall_bands,
    recall_tab,
    since_param,
)
from resources.protocol import PmsConnectionFailed, PmsError
from sandboxes.optisoft import ConnectorGone, OptisoftSandbox
from sandboxes.seed import seed_clinicians
from tests.pms_contract import TODAY, PmsContract, future_slot

SEED = 7
PRACTICE = "OS-4417"
OFFLINE_PRACTICE = "OS-9002"  # enrolled at the relay, but its connector was never started
PATIENTS = 120
# Distinctive, so a leak into a message, a log or the SQL log is easy to spot.
USERNAME, PASSWORD = "NVC_LINK_7731", "os-db-pass-K7v2-test-secret"
RO_USERNAME, RO_PASSWORD = "NVC_READER_5510", "os-ro-pass-Q1w8-test-secret"
WRONG_PASSWORD, WRONG_USERNAME = "os-db-pass-typo-0000-never-valid", "NVC_LINK_TYPO_1"
SECRETS = (USERNAME, PASSWORD, RO_USERNAME, RO_PASSWORD, WRONG_PASSWORD, WRONG_USERNAME)
CLINICIANS = seed_clinicians(SEED)
OPTOMETRISTS = [c.goc_number for c in CLINICIANS if c.goc_number.startswith("01-")]
DISPENSING_OPTICIAN = next(c.goc_number for c in CLINICIANS if c.goc_number.startswith("02-"))

# --- watching this process for any access to a practice database ------------------------------------

_watched: list[str] = []  # the sandbox directory while a sandbox is up
_db_access: list[tuple[str, str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watched:
        return
    if event == "sqlite3.connect":
        _db_access.append((event, str(args[0] if args else "")))
    elif event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        path = os.fsdecode(args[0])
        if path.startswith(_watched[0]) and "optisoft.db" in path:
            _db_access.append((event, path))


_audit_installed: list[bool] = []


def _watch(directory: Path) -> None:
    if not _audit_installed:
        sys.addaudithook(_audit)  # hooks cannot be removed; it does nothing while `_watched` is empty
        _audit_installed.append(True)
    _watched[:] = [str(directory)]
    _db_access.clear()


# --- helpers -----------------------------------------------------------------------------------------


def practice(url: str, code: str = PRACTICE) -> Practice:
    return Practice(
        practice_id="demo-optisoft",
        display_name="Demo",
        pms_kind=PmsKind.OPTISOFT,
        settings={"server_address": url, "practice_code": code},
        status="connected",
    )


def open_client(
    url: str, code: str = PRACTICE, username: str = USERNAME, password: str = PASSWORD, **config: float | int
) -> OptisoftClient:
    resource = OptisoftResource(
        **{"page_size": 25, "max_attempts": 4, "backoff_seconds": 0.01, "timeout_seconds": 15, **config}
    )
    return resource.open(practice(url, code), {"db_username": username, "db_password": password})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def booking(key: str, patient_id: str, slot: int, goc: str | None, kind: str = "eye_test") -> BookingRequest:
    start, end = future_slot(slot, days_ahead=200)  # clear of the contract's slots (400+ days ahead)
    return BookingRequest(key, patient_id, start, end, kind, goc, "Booked on an NVC call")


def patient_ids(sandbox: OptisoftSandbox) -> list[str]:
    return [str(r["PatientID"]) for r in sandbox.select(PRACTICE, "SELECT PatientID FROM Patients ORDER BY PatientID")]


def queries(sandbox: OptisoftSandbox, operation: str | None = None) -> int:
    return sum(1 for code, op in sandbox.job_log if code == PRACTICE and operation in (None, op))


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OptisoftSandbox]:
    """The relay plus one practice (database + connector process), shared by the class."""
    directory = tmp_path_factory.mktemp("optisoft")
    _watch(directory)
    server = OptisoftSandbox(
        practices={PRACTICE: PATIENTS},
        db_users={USERNAME: (PASSWORD, True), RO_USERNAME: (RO_PASSWORD, False)},
        directory=directory,
        seed=SEED,
        offline_after_seconds=1.0,
        answer_timeout_seconds=10.0,
        poll_wait_seconds=3.0,
    )
    server.register_practice(OFFLINE_PRACTICE)
    try:
        with server:
            yield server
    finally:
        _watched.clear()


@pytest.fixture
def client(sandbox: OptisoftSandbox) -> Iterator[OptisoftClient]:
    with open_client(sandbox.url) as c:
        yield c


@pytest.fixture
def failure_cases(sandbox: OptisoftSandbox) -> list[tuple[str, Any, str]]:
    quick: dict[str, Any] = {"max_attempts": 2}
    return [
        ("unreachable", lambda: open_client(f"http://127.0.0.1:{free_port()}", **quick), PASSWORD),
        ("practice_not_found", lambda: open_client(sandbox.url, "OS-0000", **quick), PASSWORD),
        ("invalid_credentials", lambda: open_client(sandbox.url, password=WRONG_PASSWORD, **quick), WRONG_PASSWORD),
        ("invalid_credentials", lambda: open_client(sandbox.url, username=WRONG_USERNAME, **quick), WRONG_USERNAME),
        ("connector_offline", lambda: open_client(sandbox.url, OFFLINE_PRACTICE, **quick), PASSWORD),
        ("unsafe_url", lambda: open_client("http://relay.optisoft.example", **quick), PASSWORD),
    ]


class TestOptisoftContract(PmsContract):
    practice_ref = PRACTICE
    clinician_ref = OPTOMETRISTS[0]

    # pytest runs the contract's tests first, then these: the checks on the practice database below
    # also cover every read and write the contract made.

    # --- connection --------------------------------------------------------------------------------

    def test_connection_names_the_practice_and_what_the_login_may_do(self, client, sandbox) -> None:
        info = client.test_connection()
        name = sandbox.select(PRACTICE, "SELECT PracticeName FROM PracticeDetails")[0]["PracticeName"]
        assert (info.pms, info.practice_name) == ("Optisoft", name)
        assert info.version and PRACTICE in info.detail and "read and write" in info.detail
        with open_client(sandbox.url, username=RO_USERNAME, password=RO_PASSWORD) as reader:
            assert "only read" in reader.test_connection().detail

    def test_connector_stopped_or_crashed_is_connector_offline(self, sandbox) -> None:
        pid = patient_ids(sandbox)[0]
        try:
            sandbox.stop_connector(PRACTICE)  # the Windows service stopped: it says goodbye
            started = time.monotonic()
            with open_client(sandbox.url, max_attempts=2) as c:
                with pytest.raises(PmsConnectionFailed) as failure:
                    c.test_connection()
                with pytest.raises(PmsConnectionFailed) as write_failure:
                    c.create_appointment(booking("os-offline-1", pid, 90, OPTOMETRISTS[0]))
            print(f"connector_offline reported after {time.monotonic() - started:.1f} s")
            assert failure.value.problem == write_failure.value.problem == "connector_offline"
            assert "Optisoft Connector" in failure.value.check and "Check:" in str(failure.value)
            with pytest.raises(ConnectorGone):
                sandbox.patient_count(PRACTICE)  # nobody at the practice end is running

            sandbox.start_connector(PRACTICE)
            with open_client(sandbox.url) as c:
                assert c.test_connection().pms == "Optisoft"

            sandbox.stop_connector(PRACTICE, crash=True)  # killed: no goodbye, the relay notices
            with open_client(sandbox.url, max_attempts=1) as c, pytest.raises(PmsConnectionFailed) as crashed:
                c.test_connection()
            assert crashed.value.problem == "connector_offline"
        finally:
            if not sandbox.connector(PRACTICE).running:
                sandbox.start_connector(PRACTICE)
        assert "os-offline-1" not in {a["nvc_reference"] for a in sandbox.nvc_appointments(PRACTICE)}

    def test_secrets_never_reach_a_message_or_a_log(self, sandbox, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        texts = []
        for username, password in ((USERNAME, WRONG_PASSWORD), (WRONG_USERNAME, PASSWORD)):
            with open_client(sandbox.url, username=username, password=password, max_attempts=1) as c:
                with pytest.raises(PmsConnectionFailed) as failure:
                    c.test_connection()
                with pytest.raises(PmsConnectionFailed) as read_failure:
                    c.read_patients(None, TODAY)
            assert failure.value.problem == read_failure.value.problem == "invalid_credentials"
            assert "Login failed for user '<db username>'" in str(failure.value)  # Optisoft's words, scrubbed
            texts += [str(failure.value), str(read_failure.value)]
        connector = sandbox.connector(PRACTICE)
        texts += [caplog.text, connector.log_path.read_text(), connector.sql_log_path.read_text()]
        texts += [repr(sandbox.request_log), repr(open_client(sandbox.url))]
        assert not any(secret in text for secret in SECRETS for text in texts)

    # --- reads -------------------------------------------------------------------------------------

    def test_paging_is_keyset_and_a_patient_edited_mid_sync_comes_once(self, sandbox) -> None:
        before = queries(sandbox, "patients.list")
        with open_client(sandbox.url, page_size=7) as c:
            assert len({p.pms_patient_id for p in c.read_patients(None, TODAY).patients}) == PATIENTS
            assert queries(sandbox, "patients.list") - before == math.ceil(PATIENTS / 7)
            rows = c.iter_rows("patients.list", "PatientID", None)
            first_page = [next(rows) for _ in range(7)]
            edited = str(first_page[0]["PatientID"])
            sandbox.update_patient(PRACTICE, edited, Mobile="07700 900998")
            rest = list(rows)
        ids = [str(r["PatientID"]) for r in first_page + rest]
        assert len(set(ids)) == PATIENTS and len(ids) == PATIENTS + 1
        assert str(rest[-1]["PatientID"]) == edited and rest[-1]["Mobile"] == "07700 900998"

    def test_recalls_come_from_the_recalls_table(self, client, sandbox) -> None:
        # The Spectacles category's due date; "Suppressed by Appointment" holds it to a future appointment.
        due = {
            str(r["PatientID"]): max(date.fromisoformat(r["Due"]), date.fromisoformat(r["Held"] or r["Due"]))
            for r in sandbox.select(
                PRACTICE,
                "SELECT r.PatientID, r.DueDate AS Due, CASE WHEN r.SuppressedByAppt = 1 THEN"
                " (SELECT MIN(substr(d.StartDateTime, 1, 10)) FROM Diary d WHERE d.PatientID = r.PatientID"
                " AND d.Status = 'Booked' AND d.StartDateTime >= ?) END AS Held FROM Recalls r WHERE r.RecallType = 'ST'",
                TODAY.isoformat(),
            )
        }
        lens_only = {
            str(r["PatientID"])
            for r in sandbox.select(PRACTICE, "SELECT PatientID FROM Recalls WHERE RecallType IN ('CL', 'SC')")
        } - set(due)
        patients = {p.pms_patient_id: p for p in client.read_patients(None, TODAY).patients}
        assert due and lens_only  # both kinds of recall really occur in the seeded practice
        assert {pid: p.pms_recall_due_date for pid, p in patients.items() if p.pms_recall_due_date} == due
        assert all(patients[pid].pms_recall_due_date is None for pid in lens_only)

        # A recall moved on Optisoft's recall screen changes no patient row; the next sync still sees it.
        pid = sorted(due)[0]
        since = datetime.now(UTC) - timedelta(milliseconds=5)
        sandbox.set_recall(PRACTICE, pid, date(2031, 3, 14))
        changed = client.read_patients(since, TODAY).patients
        assert [(p.pms_patient_id, p.pms_recall_due_date) for p in changed] == [(pid, date(2031, 3, 14))]

    def test_the_recall_tab_is_seeded_as_optisoft_keeps_it(self, client, sandbox) -> None:
        tabs = sandbox.select(
            PRACTICE,
            "SELECT r.PatientID, r.RecallType, r.StartDate, r.DueDate, r.NextBand, b.Months, b.SendMethod"
            " FROM Recalls r JOIN RecallBands b ON b.CategoryID = r.CategoryID AND b.Band = 1",
        )
        assert {t["RecallType"] for t in tabs} == {"ST", "CL", "SC"}
        for tab in tabs:  # each category falls due band 1's months after its start date
            start, due = date.fromisoformat(tab["StartDate"]), date.fromisoformat(tab["DueDate"])
            assert add_months(start, tab["Months"]) == due, tab
        per_patient = sandbox.select(
            PRACTICE, "SELECT MAX(n) AS n FROM (SELECT COUNT(*) AS n FROM Recalls GROUP BY PatientID)"
        )
        assert per_patient[0]["n"] <= 3
        bands = sandbox.select(PRACTICE, "SELECT CategoryID, MAX(Band) AS Bands FROM RecallBands GROUP BY CategoryID")
        assert max(b["Bands"] for b in bands) == 7
        methods = {r["SendMethod"] for r in sandbox.select(PRACTICE, "SELECT DISTINCT SendMethod FROM RecallBands")}
        assert methods == {"Letter", "Email", "SMS", "Telephone"}
        # The seed's canonical fields, in Optisoft's ticks.
        truth = sandbox.seed_records(PRACTICE)
        rows = {str(r["PatientID"]): r for r in sandbox.select(PRACTICE, "SELECT * FROM Patients")}
        for pid, seed in truth.items():
            row = rows[pid]
            assert (row["Deceased"], row["GoneAway"], row["Inactive"]) == (
                int(seed.status == "deceased"),
                int(seed.status == "gone_away"),
                int(seed.status == "inactive"),
            ), pid
            assert row["NoTelephoneRecall"] == int(not seed.phone_recall) and row["NoRecall"] == int(seed.no_recall)
            assert (row["SMSConsent"], row["EmailConsent"]) == (
                int(bool(seed.sms_consent)),
                int(bool(seed.email_consent)),
            )
            assert row["ParentGuardian"] == seed.guardian_name

    def test_a_patient_marked_deceased_or_opted_out_mid_day_arrives_incrementally(self, client, sandbox) -> None:
        truth = sandbox.seed_records(PRACTICE)
        plain = [
            pid
            for pid, p in sorted(truth.items())
            if p.status == "active" and p.phone_recall and not p.no_recall and p.sms_consent and p.guardian_name is None
        ]
        died, objector, lapsed = plain[-3:]
        before = {p.pms_patient_id: p for p in client.read_patients(None, TODAY).patients}
        assert all(before[pid].contact.may_phone for pid in (died, objector, lapsed))

        since = datetime.now(UTC) - timedelta(milliseconds=5)
        sandbox.update_contact(PRACTICE, died, status="deceased", status_date=TODAY - timedelta(days=2))
        sandbox.update_patient(PRACTICE, objector, phone_recall=False, sms_consent=False, HomePhone=None)
        sandbox.update_contact(PRACTICE, lapsed, status="gone_away", no_recall=True, guardian_name="Mr Ian  Ward")
        changed = {p.pms_patient_id: p for p in client.read_patients(since, TODAY).patients}

        assert set(changed) == {died, objector, lapsed}
        assert (changed[died].status, changed[died].status_date) == ("deceased", TODAY - timedelta(days=2))
        assert changed[objector].status == "active" and not changed[objector].contact.phone_recall
        assert not {Channel.PHONE, Channel.SMS} & (changed[objector].contact.channels or {Channel.PHONE})
        assert not changed[objector].contact.may_phone
        assert (changed[lapsed].status, changed[lapsed].contact.no_recall) == ("gone_away", True)
        assert changed[lapsed].guardian_name == "Mr Ian Ward"
        # In Optisoft's own words, on the patient row whose ModifiedDate moved on.
        rows = {
            str(r["PatientID"]): r
            for r in sandbox.select(
                PRACTICE,
                "SELECT PatientID, Deceased, DeceasedDate, GoneAway, NoRecall, NoTelephoneRecall, SMSConsent"
                " FROM Patients WHERE ModifiedDate >= ?",
                since_param(since),
            )
        }
        assert (rows[died]["Deceased"], rows[died]["DeceasedDate"]) == (1, (TODAY - timedelta(days=2)).isoformat())
        assert (rows[objector]["NoTelephoneRecall"], rows[objector]["SMSConsent"]) == (1, 0)
        assert (rows[lapsed]["GoneAway"], rows[lapsed]["NoRecall"]) == (1, 1)
        # The canonical truth follows, so the contract's comparison holds after the edit.
        after = sandbox.seed_records(PRACTICE)
        assert (after[died].status, after[objector].phone_recall, after[lapsed].status) == (
            "deceased",
            False,
            "gone_away",
        )

        sandbox.update_contact(PRACTICE, died, status="active")  # a mistaken tick, cleared
        again = client.read_patients(since, TODAY).patients
        assert {(p.pms_patient_id, p.status, p.status_date) for p in again if p.pms_patient_id == died} == {
            (died, "active", None)
        }

    def test_suppressed_by_appointment_holds_the_recall_until_the_appointment(self, client, sandbox) -> None:
        free = sandbox.select(
            PRACTICE,
            "SELECT r.PatientID, r.DueDate FROM Recalls r WHERE r.RecallType = 'ST' AND r.SuppressedByAppt = 0"
            " AND NOT EXISTS (SELECT 1 FROM Diary d WHERE d.PatientID = r.PatientID AND d.Status = 'Booked'"
            " AND d.StartDateTime >= ?) ORDER BY r.PatientID",
            TODAY.isoformat(),
        )
        pid = str(free[0]["PatientID"])
        sandbox.set_recall(PRACTICE, pid, TODAY - timedelta(days=30))  # overdue: NVC would call
        made = client.create_appointment(booking("os-held-1", pid, 106, OPTOMETRISTS[0]))
        visit = client.read_appointments(None).records
        day = next(a.starts_at for a in visit if a.pms_appointment_id == made.pms_appointment_id).date()
        assert day > TODAY

        since = datetime.now(UTC) - timedelta(milliseconds=5)
        sandbox.suppress_recall(PRACTICE, pid)  # staff tick the box as they book
        held = client.read_patients(since, TODAY).patients
        assert [(p.pms_patient_id, p.pms_recall_due_date) for p in held] == [(pid, day)]
        assert held[0].contact.may_phone == next(  # contact preferences untouched
            p.contact.may_phone for p in client.read_patients(None, TODAY).patients if p.pms_patient_id == pid
        )

        since = datetime.now(UTC) - timedelta(milliseconds=5)
        sandbox.suppress_recall(PRACTICE, pid, suppressed=False)
        released = client.read_patients(since, TODAY).patients
        assert [(p.pms_patient_id, p.pms_recall_due_date) for p in released] == [(pid, TODAY - timedelta(days=30))]

    def test_times_are_uk_local_in_the_diary_and_utc_in_nvc(self, client, sandbox) -> None:
        pid = patient_ids(sandbox)[5]
        year = TODAY.year + 1
        summer = datetime(year, 7, 14, 9, 30, tzinfo=UTC)  # 10:30 BST
        winter = datetime(year, 1, 13, 9, 30, tzinfo=UTC)  # 09:30 GMT
        for key, start in (("os-tz-summer", summer), ("os-tz-winter", winter)):
            request = BookingRequest(key, pid, start, start + timedelta(minutes=30), "eye_test", OPTOMETRISTS[1])
            assert client.create_appointment(request).created is True
        rows = sandbox.select(PRACTICE, "SELECT StartDateTime, Comment FROM Diary WHERE instr(Comment, '[NVC:os-tz-')")
        stored = {r["Comment"].split("[NVC:")[1].rstrip("]"): r["StartDateTime"] for r in rows}
        assert stored == {"os-tz-summer": f"{year}-07-14 10:30", "os-tz-winter": f"{year}-01-13 09:30"}
        read = {a.nvc_reference: a for a in client.read_appointments(None).records if a.nvc_reference}
        assert read["os-tz-summer"].starts_at == summer and read["os-tz-winter"].starts_at == winter
        assert read["os-tz-summer"].ends_at == summer + timedelta(minutes=30)

    # --- the clinician -----------------------------------------------------------------------------

    @pytest.mark.parametrize("goc", ["12345", "1-12345", "03-12345", "01-1234", "01-123456", "GOC 01-12345", "", None])
    def test_a_malformed_goc_number_is_refused_before_anything_is_sent(self, client, sandbox, goc) -> None:
        sent = queries(sandbox)
        with pytest.raises(PmsError) as failure:
            client.create_appointment(booking("os-goc-format", patient_ids(sandbox)[0], 100, goc))
        assert failure.value.problem == "invalid_clinician"
        assert "GOC" in str(failure.value) and "Check:" in str(failure.value)
        assert queries(sandbox) == sent  # refused in NVC: not even a lookup reached the practice

    def test_unknown_and_inactive_clinicians_are_refused(self, client, sandbox) -> None:
        clinicians = sandbox.select(PRACTICE, "SELECT GOCNumber, Active FROM Clinicians")
        known = {c["GOCNumber"] for c in clinicians}
        inactive = next(c["GOCNumber"] for c in clinicians if not c["Active"])
        unknown = next(f"01-{n:05d}" for n in range(99999, 0, -1) if f"01-{n:05d}" not in known)
        pid = patient_ids(sandbox)[1]
        for key, goc, words in (("os-goc-unknown", unknown, "no clinician"), ("os-goc-left", inactive, "not active")):
            with pytest.raises(PmsError) as failure:
                client.create_appointment(booking(key, pid, 101, goc))
            assert failure.value.problem == "invalid_clinician"
            assert words in str(failure.value) and goc in str(failure.value)
        assert not {"os-goc-unknown", "os-goc-left"} & {a["nvc_reference"] for a in sandbox.nvc_appointments(PRACTICE)}

    def test_a_dispensing_optician_cannot_do_an_eye_test(self, client, sandbox) -> None:
        pid = patient_ids(sandbox)[2]
        with pytest.raises(PmsError) as failure:
            client.create_appointment(booking("os-do-eye-test", pid, 102, DISPENSING_OPTICIAN))
        assert failure.value.problem == "invalid_clinician"
        assert "optometrist (01-)" in str(failure.value)
        # ... but may see a patient to collect their glasses.
        made = client.create_appointment(booking("os-do-collection", pid, 102, DISPENSING_OPTICIAN, "collection"))
        assert made.created is True
        read = {a.nvc_reference: a for a in client.read_appointments(None).records if a.nvc_reference}
        assert read["os-do-collection"].appointment_type == "collection"
        assert "os-do-eye-test" not in read

    # --- writes ------------------------------------------------------------------------------------

    def test_a_lost_response_after_a_booking_is_found_not_repeated(self, client, sandbox) -> None:
        pid = patient_ids(sandbox)[3]
        sandbox.faults.lost_response_after_write_rate = 1.0  # every applied write loses its answer
        try:
            assert client.test_connection().pms == "Optisoft"  # reads are not writes: unaffected
            made = client.create_appointment(booking("os-lost-1", pid, 103, OPTOMETRISTS[0]))
            noted = client.add_note(
                PatientNote("os-lost-note", pid, NoteKind.CALL_OUTCOME, datetime.now(UTC), "Booked")
            )
        finally:
            sandbox.faults.lost_response_after_write_rate = 0
        assert made.created is True and noted.created is True
        assert [a["nvc_reference"] for a in sandbox.nvc_appointments(PRACTICE)].count("os-lost-1") == 1
        assert [n["nvc_reference"] for n in sandbox.nvc_notes(PRACTICE)].count("os-lost-note") == 1
        again = client.create_appointment(booking("os-lost-1", pid, 103, OPTOMETRISTS[0]))
        assert (again.pms_appointment_id, again.created) == (made.pms_appointment_id, False)
        read = {a.nvc_reference: a for a in client.read_appointments(None).records if a.nvc_reference}
        assert read["os-lost-1"].pms_appointment_id == made.pms_appointment_id
        (log,) = sandbox.select(PRACTICE, "SELECT LogID FROM ContactLog WHERE instr(Notes, '[NVC:os-lost-note]')")
        assert noted.pms_note_id == str(log["LogID"])

    def test_call_notes_go_into_the_contact_log(self, client, sandbox) -> None:
        pid = patient_ids(sandbox)[4]
        at = datetime(2025, 7, 1, 15, 5, tzinfo=UTC)
        made = [
            client.add_note(PatientNote("os-note-attempt", pid, NoteKind.CALL_ATTEMPT, at, "No answer", "no_answer")),
            client.add_note(PatientNote("os-note-outcome", pid, NoteKind.CALL_OUTCOME, at, "Declined", "declined")),
        ]
        rows = sandbox.select(
            PRACTICE,
            "SELECT LogID, PatientID, ContactDate, Method, Category, Outcome, Notes FROM ContactLog"
            " WHERE instr(Notes, '[NVC:os-note-') ORDER BY LogID",
        )
        assert [(n.pms_note_id, n.created) for n in made] == [(str(r["LogID"]), True) for r in rows]
        assert [(str(r["PatientID"]), r["Method"], r["Category"], r["Outcome"]) for r in rows] == [
            (pid, "Telephone", "Call attempt", "No answer"),
            (pid, "Telephone", "Call outcome", "Declined"),
        ]
        assert rows[0]["ContactDate"] == "2025-07-01 16:05:00.000"  # BST
        assert rows[0]["Notes"] == "No answer [NVC:os-note-attempt]"
        kinds = {n["nvc_reference"]: n["kind"] for n in sandbox.nvc_notes(PRACTICE)}
        assert (kinds["os-note-attempt"], kinds["os-note-outcome"]) == ("call_attempt", "call_outcome")

    def test_a_read_only_login_reads_but_cannot_write(self, sandbox) -> None:
        pid = patient_ids(sandbox)[6]
        with open_client(sandbox.url, username=RO_USERNAME, password=RO_PASSWORD) as reader:
            assert len(reader.read_patients(None, TODAY).patients) == PATIENTS
            with pytest.raises(PmsError) as booking_failure:
                reader.create_appointment(booking("os-ro-booking", pid, 104, OPTOMETRISTS[0]))
            with pytest.raises(PmsError) as note_failure:
                reader.add_note(PatientNote("os-ro-note", pid, NoteKind.CALL_ATTEMPT, datetime.now(UTC), "No answer"))
        assert booking_failure.value.problem == note_failure.value.problem == "permission_denied"
        assert "write access" in booking_failure.value.check
        assert "os-ro-booking" not in {a["nvc_reference"] for a in sandbox.nvc_appointments(PRACTICE)}
        assert "os-ro-note" not in {n["nvc_reference"] for n in sandbox.nvc_notes(PRACTICE)}

    # --- the practice database stays at the practice -------------------------------------------------

    def test_only_the_connector_process_opens_the_practice_database(self, client, sandbox) -> None:
        client.read_patients(None, TODAY)
        client.add_note(
            PatientNote("os-where-note", patient_ids(sandbox)[7], NoteKind.CALL_ATTEMPT, datetime.now(UTC), "x")
        )
        assert _db_access == []  # this process (relay + resource) never connected to or opened it
        assert "sqlite3" not in inspect.getsource(optisoft_resource)
        connector = sandbox.connector(PRACTICE)
        db = str(sandbox.db_path(PRACTICE).resolve())
        holders = set()
        for process in psutil.process_iter():
            try:
                if any(f.path.startswith(db) for f in process.open_files()):
                    holders.add(process.pid)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        assert holders == {connector.pid} and connector.pid != os.getpid()
        writers = {e["pid"] for e in connector.sql_log}
        assert writers and os.getpid() not in writers  # every statement ever run came from a connector

    def test_the_connector_only_dials_out(self, sandbox) -> None:
        relay_port = int(sandbox.url.rsplit(":", 1)[1])
        connections = psutil.Process(sandbox.connector(PRACTICE).pid).net_connections(kind="inet")
        assert not [c for c in connections if c.status == psutil.CONN_LISTEN]
        assert connections and all(c.raddr and c.raddr.port == relay_port for c in connections)

    def test_no_delete_ever_reaches_the_practice_database(self, client, sandbox) -> None:
        # Both writes here, so the log holds a booking and a note whichever tests ran before (alone, or
        # on another worker, it held no note and this failed).
        pid = patient_ids(sandbox)[8]
        client.create_appointment(booking("os-audit-1", pid, 105, OPTOMETRISTS[0]))
        client.add_note(PatientNote("os-audit-note", pid, NoteKind.CALL_ATTEMPT, datetime.now(UTC), "No answer"))
        log = sandbox.sql_log
        statements = [sql.split()[0].upper() for _, sql in log]
        assert not {"DELETE", "DROP", "TRUNCATE", "REPLACE"} & set(statements)
        assert not [sql for _, sql in log if " OR REPLACE " in sql.upper()]
        ours = {sql.split()[0].upper() for by, sql in log if by == "connector"}
        assert ours <= {"SELECT", "INSERT", "BEGIN", "COMMIT", "ROLLBACK", "PRAGMA"}  # NVC never even updates
        assert any(sql.startswith("INSERT INTO Diary") for by, sql in log if by == "connector")
        assert any(sql.startswith("INSERT INTO ContactLog") for by, sql in log if by == "connector")
        assert not any(secret in sql for secret in SECRETS for _, sql in log)  # values are never logged

    def test_the_relay_speaks_optisoft(self, sandbox) -> None:
        creds = {"username": USERNAME, "password": PASSWORD}

        def query(code: str, operation: str, params: dict[str, Any] | None = None, **extra: Any) -> httpx.Response:
            body = {"operation": operation, "params": params or {}, "credentials": creds, **extra}
            return http.post(f"/relay/v1/practices/{code}/query", json=body)

        def code_of(response: httpx.Response) -> tuple[int, str]:
            return response.status_code, response.json()["code"]

        with httpx.Client(base_url=sandbox.url) as http:
            page = query(PRACTICE, "patients.list", {"limit": 2}).json()
            assert set(page) == {"requestId", "operation", "data"} and set(page["data"]) == {"columns", "rows", "more"}
            assert page["data"]["columns"][0] == "PatientID" and len(page["data"]["rows"]) == 2
            assert code_of(query("OS-0000", "practice.info")) == (404, "PRACTICE_CODE_UNKNOWN")
            assert code_of(query(OFFLINE_PRACTICE, "practice.info")) == (503, "CONNECTOR_OFFLINE")
            assert code_of(http.post(f"/relay/v1/practices/{PRACTICE}/query", json=["x"])) == (400, "INVALID_REQUEST")
            # The connector runs only its own named statements: no SQL from outside, no deletes.
            assert code_of(query(PRACTICE, "sql.execute", {"sql": "DELETE FROM Patients"})) == (
                400,
                "UNKNOWN_OPERATION",
            )
            assert code_of(query(PRACTICE, "patients.list", {"limit": 5000})) == (400, "INVALID_PARAMS")
            # It also re-checks the clinician itself, whatever a caller sends.
            params = {
                "patientId": patient_ids(sandbox)[0],
                "start": "2030-01-02 10:00",
                "duration": 30,
                "apptType": "ST",
                "gocNumber": DISPENSING_OPTICIAN,
                "comment": "x [NVC:os-raw-1]",
                "marker": "[NVC:os-raw-1]",
            }
            assert code_of(query(PRACTICE, "diary.book", params)) == (422, "CLINICIAN_NOT_OPTOMETRIST")
            # The connector's side needs the practice's connector token.
            assert code_of(http.get(f"/relay/v1/connector/{PRACTICE}/next")) == (401, "CONNECTOR_UNAUTHORISED")
            sandbox.faults.rate_500 = 1.0
            try:
                assert code_of(query(PRACTICE, "practice.info")) == (500, "RELAY_ERROR")
            finally:
                sandbox.faults.rate_500 = 0


# --- without a sandbox ---------------------------------------------------------------------------------


def test_since_is_sent_as_uk_local_time() -> None:
    assert since_param(datetime(2025, 1, 15, 12, 0, 0, 123456, tzinfo=UTC)) == "2025-01-15 12:00:00.123"
    assert since_param(datetime(2025, 7, 15, 12, 0, tzinfo=UTC)) == "2025-07-15 13:00:00.000"  # BST
    assert since_param(datetime(2025, 7, 15, 12, 0)) == "2025-07-15 13:00:00.000"  # naive is UTC
    # Clocks go back at 02:00 BST on 26 Oct 2025: 01:00-01:59 happens twice. From the first pass the
    # bound drops to 01:00 so nothing changed in the second pass is missed.
    assert since_param(datetime(2025, 10, 26, 0, 40, tzinfo=UTC)) == "2025-10-26 01:00:00.000"
    assert since_param(datetime(2025, 10, 26, 1, 40, tzinfo=UTC)) == "2025-10-26 01:40:00.000"


def test_settings_and_secrets_are_named() -> None:
    resource = OptisoftResource()
    assert resource.required_settings() == ("server_address", "practice_code")
    assert resource.optional_settings() == ("ca_bundle",)
    assert resource.required_secrets() == ("db_username", "db_password")
    secrets = {"db_username": USERNAME, "db_password": PASSWORD}
    cases = [
        ({"server_address": "https://relay.example", "practice_code": ""}, secrets, "missing_setting"),
        ({"practice_code": PRACTICE}, secrets, "missing_setting"),
        (
            {"server_address": "https://relay.example", "practice_code": PRACTICE},
            {"db_password": "x"},
            "missing_secret",
        ),
        (
            {"server_address": "https://relay.example", "practice_code": PRACTICE},
            {"db_username": "x"},
            "missing_secret",
        ),
    ]
    for settings, credentials, problem in cases:
        site = Practice("demo-optisoft", "Demo", PmsKind.OPTISOFT, settings, "connected")
        with pytest.raises(PmsConnectionFailed) as failure:
            resource.open(site, credentials)
        assert failure.value.problem == problem and failure.value.check


@pytest.mark.parametrize("url", ["http://relay.optisoft.example", "ftp://127.0.0.1/", "not a url"])
def test_unsafe_server_addresses_are_refused_before_any_request(url: str) -> None:
    with pytest.raises(PmsConnectionFailed) as failure:
        open_client(url)
    assert failure.value.problem == "unsafe_url"
    assert PASSWORD not in str(failure.value) and USERNAME not in str(failure.value)


# --- the dialect's translation, row by row -----------------------------------------------------------

DAY = date(2026, 6, 15)


def recall_category(kind: str = "ST", due: str | None = "2026-03-01", suppressed: Any = 0, **extra: Any) -> dict:
    bands = [{"band": n, "months": 24 + n - 1, "letter": f"Recall {n}", "sendMethod": "Letter"} for n in (1, 2, 3)]
    return {
        "recallType": kind,
        "category": "Spectacles 2 yearly",
        "startDate": "2024-03-01",
        "dueDate": due,
        "nextBand": 1,
        "nextLetterDate": due,
        "suppressedByAppointment": suppressed,
        "bands": bands,
        **extra,
    }


def patient_row(**columns: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "PatientID": 10001,
        "Forename": "Siân",
        "Surname": "O'Neill",
        "Mobile": "07700 900123",
        "DOB": "1961-03-12",
        "LastExamDate": "2024-03-01",
        "RecallDue": "2026-03-01",
        "Deceased": 0,
        "DeceasedDate": None,
        "GoneAway": 0,
        "Inactive": 0,
        "NoRecall": 0,
        "NoTelephoneRecall": 0,
        "EmailConsent": 0,
        "SMSConsent": 0,
        "ParentGuardian": None,
        "RecallTab": [recall_category()],
        "NextAppointment": None,
        "ModifiedDate": "2026-06-01 10:00:00.000",
    }
    row.update(columns)
    if isinstance(row["RecallTab"], list):
        row["RecallTab"] = json.dumps(row["RecallTab"])  # as the connector serves it
    return row


def translate(**columns: Any):
    return build_patient("demo-optisoft", optisoft_draft(patient_row(**columns), DAY), DAY, strict=False)


@pytest.mark.parametrize(
    ("columns", "status", "status_date"),
    [
        ({}, PatientStatus.ACTIVE, None),
        ({"Deceased": 1, "DeceasedDate": "2026-05-02"}, PatientStatus.DECEASED, date(2026, 5, 2)),
        ({"Deceased": -1}, PatientStatus.DECEASED, None),  # Access/VB's True, no date recorded
        ({"Deceased": "True", "DeceasedDate": "02/05/2026"}, PatientStatus.DECEASED, date(2026, 5, 2)),
        ({"Deceased": 0, "DeceasedDate": "2026-05-02"}, PatientStatus.DECEASED, date(2026, 5, 2)),  # a date says so
        ({"Deceased": 1, "DeceasedDate": "2027-01-01"}, PatientStatus.DECEASED, None),  # mistyped: tick stands
        ({"Deceased": 1, "DeceasedDate": "31/02/2026"}, PatientStatus.DECEASED, None),
        ({"GoneAway": 1}, PatientStatus.GONE_AWAY, None),
        ({"GoneAway": "Y"}, PatientStatus.GONE_AWAY, None),
        ({"Inactive": 1}, PatientStatus.INACTIVE, None),
        ({"Inactive": "archived?"}, PatientStatus.INACTIVE, None),  # unreadable: the tick that stops calls
        ({"Deceased": 1, "GoneAway": 1, "Inactive": 1}, PatientStatus.DECEASED, None),
        ({"GoneAway": 1, "Inactive": 1}, PatientStatus.GONE_AWAY, None),
        ({"Deceased": "0", "GoneAway": "no", "Inactive": "false"}, PatientStatus.ACTIVE, None),
    ],
)
def test_status_ticks_become_nvc_statuses(columns: dict, status: PatientStatus, status_date: date | None) -> None:
    patient = translate(**columns)
    assert (patient.status, patient.status_date) == (status, status_date)


def test_consent_ticks_and_recall_preferences() -> None:
    plain = translate().contact
    assert (plain.phone_recall, plain.no_recall, plain.channels) == (True, False, frozenset({Channel.PHONE}))
    assert plain.may_phone
    ticked = translate(SMSConsent=1, EmailConsent=-1).contact
    assert ticked.channels == {Channel.PHONE, Channel.SMS, Channel.EMAIL} and ticked.may_phone
    assert translate(SMSConsent="Yes", EmailConsent="No").contact.channels == {Channel.PHONE, Channel.SMS}
    assert translate(SMSConsent="?").contact.channels == {Channel.PHONE}  # unreadable consent: not given
    no_phone = translate(NoTelephoneRecall=1, SMSConsent=1).contact
    assert (no_phone.phone_recall, no_phone.channels, no_phone.may_phone) == (False, {Channel.SMS}, False)
    assert translate(NoTelephoneRecall="??").contact.phone_recall is False  # unreadable: not phoned
    no_recall = translate(NoRecall=1).contact
    assert (no_recall.no_recall, no_recall.phone_recall, no_recall.may_phone) == (True, True, False)
    # A connector that serves none of these columns: nothing recorded, nothing refused.
    bare = {
        k: v
        for k, v in patient_row().items()
        if k not in ("NoTelephoneRecall", "NoRecall", "SMSConsent", "EmailConsent")
    }
    old = build_patient("demo-optisoft", optisoft_draft(bare, DAY), DAY, strict=False).contact
    assert (old.phone_recall, old.no_recall, old.channels) == (True, False, None)


@pytest.mark.parametrize(
    ("guardian", "expected"),
    [("Mrs Jane  Smith", "Mrs Jane Smith"), ("Mr Seán O'Neill", "Mr Seán O'Neill"), ("", None), (None, None)],
)
def test_parent_or_guardian(guardian: str | None, expected: str | None) -> None:
    assert translate(ParentGuardian=guardian).guardian_name == expected


def test_the_recall_date_is_the_spectacles_category() -> None:
    assert translate().pms_recall_due_date == date(2026, 3, 1)
    lenses_and_plan = [recall_category("CL", "2026-01-01"), recall_category("SC", "2025-12-01")]
    assert translate(RecallTab=lenses_and_plan).pms_recall_due_date is None  # not eye tests
    both = [recall_category("CL", "2026-01-01"), recall_category("ST", "2026-04-30")]
    assert translate(RecallTab=both).pms_recall_due_date == date(2026, 4, 30)
    assert translate(RecallTab=[]).pms_recall_due_date is None  # no recall categories at all
    # Without a due date Optisoft counts band 1's months from the start date.
    assert translate(RecallTab=[recall_category(due=None)]).pms_recall_due_date == date(2026, 3, 1)
    leap = recall_category(due=None, startDate="2024-02-29", bands=[{"band": 1, "months": 12}])
    assert translate(RecallTab=[leap]).pms_recall_due_date == date(2025, 2, 28)
    # Without a readable Recall tab (an older connector, or a garbled one): the RecallDue column.
    assert translate(RecallTab=None, RecallDue="2026-02-01").pms_recall_due_date == date(2026, 2, 1)
    assert translate(RecallTab="{not json", RecallDue="2026-02-01").pms_recall_due_date == date(2026, 2, 1)
    # Two Spectacles categories cannot exist in Optisoft; should they arrive, the earlier counts.
    twice = [recall_category(due="2026-05-01"), recall_category(due="2026-03-01")]
    assert translate(RecallTab=twice).pms_recall_due_date == date(2026, 3, 1)
    assert recall_tab('[{"recallType": "XX"}, 5, {"recallType": "st", "dueDate": "2026-01-01"}]')["ST"].due_date


def test_a_category_has_at_most_seven_bands() -> None:
    raw = [{"band": n, "months": 10 + n, "sendMethod": "SMS"} for n in range(0, 10)]
    bands = recall_bands(raw)
    assert [b.band for b in bands] == list(range(1, MAX_BANDS + 1)) and MAX_BANDS == 7
    assert bands[0].months == 11 and bands[-1].months == 17
    messy = [
        {"band": 3, "months": 30},
        {"band": 2, "months": 27},
        {"band": 2, "months": 99},  # a repeated band number
        {"band": "4", "months": "36", "letter": "Final", "sendMethod": "Telephone"},
        {"band": 5, "months": 0},  # no months: not a band
        {"band": 6},
        {"band": True, "months": 12},
        "band 7",
    ]
    assert [(b.band, b.months) for b in recall_bands(messy)] == [(2, 27), (3, 30), (4, 36)]
    assert recall_bands(messy)[-1].send_method == "Telephone"
    assert recall_bands(None) == ()
    # With band 1 missing, the first band there is counts.
    start_only = recall_category(due=None, bands=messy)
    assert translate(RecallTab=[start_only]).pms_recall_due_date == date(2026, 6, 1)  # 2024-03-01 + 27 months


@pytest.mark.parametrize(
    ("due", "suppressed", "next_appointment", "expected"),
    [
        ("2026-03-01", 1, "2026-07-20 10:30", date(2026, 7, 20)),  # held until the visit
        ("2026-03-01", "True", "2026-06-15 09:00", date(2026, 6, 15)),  # a visit later today still holds it
        ("2026-09-01", 1, "2026-07-20 10:30", date(2026, 9, 1)),  # never moved earlier
        ("2026-03-01", 1, "2026-06-14 16:00", date(2026, 3, 1)),  # the visit has passed: a stale tick
        ("2026-03-01", 1, None, date(2026, 3, 1)),  # no appointment to hold it for
        ("2026-03-01", 1, "not a date", date(2026, 3, 1)),
        ("2026-03-01", 0, "2026-07-20 10:30", date(2026, 3, 1)),  # booked, not suppressed: the date stands
        (None, 1, "2026-07-20 10:30", date(2026, 7, 20)),  # start + band 1 (1 Mar), held like any due date
    ],
)
def test_suppressed_by_appointment(due: str | None, suppressed: Any, next_appointment: str | None, expected) -> None:
    columns = {"RecallTab": [recall_category(due=due, suppressed=suppressed)], "NextAppointment": next_appointment}
    patient = translate(**columns)
    assert patient.pms_recall_due_date == expected
    assert (patient.contact.no_recall, patient.contact.may_phone, patient.status) == (False, True, "active")


def test_suppressed_by_appointment_never_creates_a_recall_date() -> None:
    lenses = recall_category("CL", "2026-01-01", suppressed=1)
    held = translate(RecallTab=[lenses], NextAppointment="2026-07-20 10:30")
    assert held.pms_recall_due_date is None  # NVC computes from the last test, as for any patient without one
    undated = recall_category(due=None, suppressed=1, startDate=None)
    assert translate(RecallTab=[undated], NextAppointment="2026-07-20 10:30").pms_recall_due_date is None
