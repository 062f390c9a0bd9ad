"""The behaviour every PMS integration must show, run against each PMS's sandbox over real HTTP.

A PMS test module subclasses `PmsContract` and provides the fixtures named below. The sandbox
exposes the same inspection hooks for every dialect (see `sandboxes/base.py`), so
these checks are written once.

Fixtures a subclass provides:
- `sandbox`: a started sandbox (class or module scope) whose `request_log` is kept for the class
  (`test_nothing_is_ever_deleted` reads it, after a read and a write of its own).
- `client`: a `PmsClient` for the sandbox's default practice, with fast retries.
- `failure_cases`: a list of `(problem, open_client, secret)`: `open_client()` returns a client
  whose `test_connection()` must raise `PmsConnectionFailed` with that `problem`, and whose
  message must not contain `secret`.
Class attributes: `practice_ref` (the sandbox's practice identifier), `clinician_ref` (or None).

Every sandbox also offers `seed_records(practice_ref)`: PMS patient id -> the canonical `SeedPatient`
it renders, which the contact checks compare the client's translation against.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta

import pytest

from nvc_pipelines.model import (
    RISK_FLAGS,
    AppointmentStatus,
    BookingRequest,
    Channel,
    NoteKind,
    PatientNote,
    PatientStatus,
)
from resources.protocol import ClinicianSource, ConnectionInfo, PmsClient, PmsConnectionFailed, PmsError

TODAY = date.today()


def future_slot(i: int, days_ahead: int = 400) -> tuple[datetime, datetime]:
    """Distinct half-hour slots far enough ahead never to clash with seeded diary entries."""
    day = TODAY + timedelta(days=days_ahead + i // 14)
    start = datetime.combine(day, time(9, 0), tzinfo=UTC) + timedelta(minutes=30 * (i % 14))
    return start, start + timedelta(minutes=30)


class PmsContract:
    practice_ref: str
    clinician_ref: str | None = None
    records_date_of_death: bool = True  # False where the PMS keeps only a "deceased" tick

    def booking(self, patient_id: str, key: str, i: int) -> BookingRequest:
        start, end = future_slot(i)
        return BookingRequest(key, patient_id, start, end, "eye_test", self.clinician_ref, "Booked on an NVC call")

    # --- reads -------------------------------------------------------------------------------------

    def test_implements_the_protocol(self, client) -> None:
        assert isinstance(client, PmsClient)
        assert not any("delete" in name.lower() for name in dir(client))

    def test_connection_test_passes(self, client) -> None:
        assert isinstance(client.test_connection(), ConnectionInfo)

    def test_full_read_returns_every_patient_normalised(self, client, sandbox) -> None:
        result = client.read_patients(None, TODAY)
        assert result.rows_read == sandbox.patient_count(self.practice_ref)
        ids = [p.pms_patient_id for p in result.patients]
        assert len(ids) == len(set(ids))
        assert all(ph.e164.startswith("+44") for p in result.patients for ph in p.phones)
        assert all(set(p.risk_flags) <= RISK_FLAGS for p in result.patients)
        assert any(p.pms_recall_due_date for p in result.patients)
        assert any(p.risk_flags for p in result.patients)

    def test_clinicians_are_listed_with_the_goc_numbers_the_pms_holds(self, client) -> None:
        """Each PMS lists its clinicians in its own dialect: one reference each (what a booking names),
        the booking's clinician among them, optometrists (01-) and a dispensing optician (02-)."""
        assert isinstance(client, ClinicianSource)
        listed = client.read_clinicians()
        refs = [c.pms_clinician_ref for c in listed]
        assert refs and len(refs) == len(set(refs)) and all(r and r == r.strip() for r in refs)
        assert all(c.practice_id == client.practice.practice_id for c in listed)
        if self.clinician_ref:
            assert self.clinician_ref in refs
        numbers = [c.goc_number or "" for c in listed]
        assert any(n.startswith("01-") for n in numbers) and any(n.startswith("02-") for n in numbers)

    def test_status_contact_preferences_and_guardians(self, client, sandbox) -> None:
        """The PMS's own words for deceased, moved away, archived, "no phone recall", consent, a
        child's guardian and the memorandum's child conditions (squint, a child's prescription,
        progressing myopia) all arrive in NVC's words, patient by patient, as the practice recorded them."""
        truth = sandbox.seed_records(self.practice_ref)
        got = {p.pms_patient_id: p for p in client.read_patients(None, TODAY).patients}
        compared: Counter[str] = Counter()
        for pid, seed in truth.items():
            patient = got.get(pid)
            if patient is None:  # rejected by normalisation (e.g. no name): covered elsewhere
                continue
            compared["patients"] += 1
            assert patient.status == PatientStatus(seed.status), pid
            if seed.status == "deceased" and seed.status_date and self.records_date_of_death:
                assert patient.status_date == seed.status_date, pid
            assert patient.contact.phone_recall == seed.phone_recall, pid
            assert patient.contact.no_recall == seed.no_recall, pid
            assert patient.guardian_name == seed.guardian_name, pid
            channels = patient.contact.channels
            if channels is not None and seed.sms_consent is not None:
                assert (Channel.SMS in channels) == seed.sms_consent, pid
            if channels is not None and seed.email_consent is not None:
                assert (Channel.EMAIL in channels) == seed.email_consent, pid
            child_flags = {"binocular_vision_anomaly", "corrected_refractive_error", "progressive_myopia"}
            assert child_flags & set(seed.flags) <= set(patient.risk_flags), (pid, seed.flags, patient.risk_flags)
            compared["child_condition"] += bool(child_flags & set(patient.risk_flags))
            compared[str(patient.status)] += 1
            compared["no_phone_recall"] += not patient.contact.phone_recall
            compared["guardian"] += patient.guardian_name is not None
            compared["channels_recorded"] += channels is not None
        assert compared["patients"] >= len(truth) * 0.9
        cases = (
            "deceased",
            "gone_away",
            "inactive",
            "no_phone_recall",
            "guardian",
            "channels_recorded",
            "child_condition",
        )
        for case in cases:
            assert compared[case] > 0, f"no {case} patient arrived: {dict(compared)}"

    def test_incremental_read_returns_only_what_changed(self, client, sandbox) -> None:
        since = datetime.now(UTC) - timedelta(seconds=1)
        touched = sandbox.touch(self.practice_ref, 3)
        result = client.read_patients(since, TODAY)
        got = {p.pms_patient_id for p in result.patients} | {r.row_ref for r in result.rejected}
        assert set(touched) <= {p.pms_patient_id for p in result.patients}
        assert len(got) == len(touched)

    def test_appointments_and_clinical_records(self, client) -> None:
        appointments = client.read_appointments(None)
        assert appointments.records
        assert {a.status for a in appointments.records} >= {AppointmentStatus.COMPLETED, AppointmentStatus.BOOKED}
        assert all(a.starts_at.tzinfo is not None and a.ends_at > a.starts_at for a in appointments.records)
        clinical = client.read_clinical_records(None)
        assert clinical.records
        assert any(r.flags for r in clinical.records)
        assert all(set(r.flags) <= RISK_FLAGS for r in clinical.records)

    # --- writes ------------------------------------------------------------------------------------

    def test_bookings_land_exactly_once_despite_lost_responses(self, client, sandbox) -> None:
        patient_ids = sorted({p.pms_patient_id for p in client.read_patients(None, TODAY).patients})[:10]
        sandbox.faults.lost_response_after_write_rate = 0.4
        sandbox.faults.rate_500 = 0.1
        try:
            for i, pid in enumerate(patient_ids):
                booking = self.booking(pid, f"contract-bk-{i}", i)
                for _ in range(6):  # what the outbox does: retry the same booking until it is confirmed
                    try:
                        client.create_appointment(booking)
                        break
                    except PmsError as exc:
                        assert exc.problem in ("pms_error", "unreachable", "rate_limited", "lost_response")
        finally:
            sandbox.faults.lost_response_after_write_rate = 0
            sandbox.faults.rate_500 = 0
        made = [a["nvc_reference"] for a in sandbox.nvc_appointments(self.practice_ref)]
        expected = {f"contract-bk-{i}" for i in range(len(patient_ids))}
        assert sorted(k for k in made if k in expected) == sorted(expected)  # each once, none twice
        again = client.create_appointment(self.booking(patient_ids[0], "contract-bk-0", 0))
        assert again.created is False
        stored = {a.nvc_reference: a.pms_appointment_id for a in client.read_appointments(None).records}
        assert again.pms_appointment_id == stored["contract-bk-0"]  # the id names the PMS record
        synced = {a.nvc_reference for a in client.read_appointments(None).records if a.nvc_reference}
        assert expected <= synced  # the next sync links them back

    def test_taken_slot_is_a_clear_failure(self, client) -> None:
        patient_ids = sorted({p.pms_patient_id for p in client.read_patients(None, TODAY).patients})
        first = self.booking(patient_ids[0], "contract-slot-a", 200)
        client.create_appointment(first)
        clash = BookingRequest(
            "contract-slot-b", patient_ids[1], first.starts_at, first.ends_at, "eye_test", self.clinician_ref
        )
        with pytest.raises(PmsError) as info:
            client.create_appointment(clash)
        assert info.value.problem == "slot_taken"

    def test_unknown_patient_is_a_clear_failure(self, client) -> None:
        with pytest.raises(PmsError) as info:
            client.create_appointment(self.booking("NO-SUCH-PATIENT-99", "contract-ghost", 300))
        assert info.value.problem == "patient_not_found"

    def test_notes_and_call_attempts_land_exactly_once(self, client, sandbox) -> None:
        pid = sorted({p.pms_patient_id for p in client.read_patients(None, TODAY).patients})[0]
        now = datetime.now(UTC).replace(microsecond=0)
        notes = [
            PatientNote("contract-note-1", pid, NoteKind.CALL_ATTEMPT, now, "No answer", "no_answer"),
            PatientNote("contract-note-2", pid, NoteKind.CALL_OUTCOME, now, "Booked eye test for 1 Dec", "booked"),
        ]
        sandbox.faults.lost_response_after_write_rate = 0.5
        try:
            for note in notes:
                for _ in range(6):
                    try:
                        client.add_note(note)
                        break
                    except PmsError as exc:
                        assert exc.problem in ("pms_error", "unreachable", "rate_limited", "lost_response")
        finally:
            sandbox.faults.lost_response_after_write_rate = 0
        landed = [n["nvc_reference"] for n in sandbox.nvc_notes(self.practice_ref)]
        assert sorted(k for k in landed if k.startswith("contract-note")) == ["contract-note-1", "contract-note-2"]
        repeat = client.add_note(notes[0])
        assert repeat.created is False and repeat.pms_note_id not in ("", "None")

    # --- failures ----------------------------------------------------------------------------------

    def test_every_connection_failure_has_its_own_message(self, failure_cases) -> None:
        seen = set()
        for problem, open_client, secret in failure_cases:
            with pytest.raises(PmsConnectionFailed) as info:
                c = open_client()
                try:
                    c.test_connection()
                finally:
                    c.close()
            assert info.value.problem == problem, str(info.value)
            assert "Check:" in str(info.value)
            if secret:
                assert secret not in str(info.value)
            seen.add(problem)
        assert "unreachable" in seen

    def test_nothing_is_ever_deleted(self, client, sandbox) -> None:
        # Runs last in the class, so the log normally holds every read and write above. It also reads
        # and writes once itself: a fresh-clone CI run once found the log empty here, and the check
        # must never pass (or fail) on a log with nothing in it.
        pid = sorted({p.pms_patient_id for p in client.read_patients(None, TODAY).patients})[0]
        now = datetime.now(UTC).replace(microsecond=0)
        client.add_note(PatientNote("contract-delete-check", pid, NoteKind.CALL_ATTEMPT, now, "No answer", "no_answer"))
        assert "contract-delete-check" in {n["nvc_reference"] for n in sandbox.nvc_notes(self.practice_ref)}
        assert sandbox.request_log, "the sandbox saw no requests"
        assert not [r for r in sandbox.request_log if r[0] == "DELETE"]
