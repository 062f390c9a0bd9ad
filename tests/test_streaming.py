"""The sync streams: a read written page by page leaves exactly what the whole read leaves, a record
read twice while paging counts once (its later copy), a failure mid-read writes nothing, recalls
computed in batches equal recalls computed at once, and the Optix client's pages add up to its read.

Memory independence is the benchmarks' business (bench/full_sync.py); nothing here is timed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from nvc_pipelines.model import (
    ClinicalRecord,
    Patient,
    Phone,
    PhoneType,
    PmsKind,
    Practice,
    ReadResult,
    RejectedRow,
    RowIdentity,
)
from nvc_pipelines.recall import RecallRules, recall_with_clinical
from nvc_pipelines.store import Store
from nvc_pipelines.store.streams import CLINICAL_RECORDS, PATIENTS, VolumeDropRefused
from nvc_pipelines.sync import prefetch
from resources.optix import OptixResource
from sandboxes.optix import OptixSandbox

STAMP = datetime(2026, 3, 1, tzinfo=UTC)


def _patient(practice_id: str, n: int, **kw) -> Patient:
    base = dict(
        practice_id=practice_id,
        pms_patient_id=f"P{n:04d}",
        first_name="Ann",
        last_name=f"Lee{n % 7}",
        phones=[Phone(f"+4477009{n:05d}", PhoneType.MOBILE)],
        last_eye_test_date=date(2022, 1, 1) + timedelta(days=n),
        risk_flags=["diabetic"] if n % 5 == 0 else [],
        source_updated_at=STAMP + timedelta(minutes=n),
    )
    return Patient(**{**base, **kw})


def _pages(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _practice(store: Store, practice_id: str) -> str:
    store.add_practice(practice_id, practice_id, PmsKind.CSV, {}, {})
    return practice_id


def _rows(store: Store, sql: str, practice_id: str) -> set[tuple]:
    """The practice's rows of `sql` (as the owner, arrays as tuples), to compare as sets."""
    with store.begin_owner() as conn:
        rows = conn.execute(text(sql), {"p": practice_id})
        return {tuple(tuple(v) if isinstance(v, list) else v for v in r) for r in rows}


def _snapshot(store: Store, practice_id: str) -> set[tuple]:
    return _rows(
        store,
        "SELECT pms_patient_id, first_name, last_name, phones, last_eye_test_date, risk_flags, active, change_seq, "
        "EXISTS (SELECT 1 FROM recall_due q WHERE q.practice_id = pt.practice_id AND q.pms_patient_id = pt.pms_patient_id) "
        "FROM patients pt WHERE practice_id = :p",
        practice_id,
    )


def _rejected(store: Store, practice_id: str) -> set[tuple]:
    with store.begin_owner() as conn:
        rows = conn.execute(
            text("SELECT row_ref, reason FROM rejected_rows WHERE practice_id = :p"), {"p": practice_id}
        )
        return {tuple(r) for r in rows}


def _write_pages(store: Store, practice_id: str, pages, *, full: bool = True, **kw):
    return store.write_stream_pages(
        practice_id, PATIENTS, pages, source="csv", source_ref="test", run_id=None, full=full, **kw
    )


def test_a_read_written_page_by_page_leaves_what_the_whole_read_leaves(store: Store) -> None:
    whole, paged = _practice(store, "whole"), _practice(store, "paged")
    for run, changes in enumerate(({}, {3: "Kay", 11: "Smith"}, {3: "Kay", 11: "Smith"})):
        for practice_id in (whole, paged):
            # a second run changes two patients and drops one (a reconcile); a third changes nothing
            patients = [
                _patient(practice_id, n, **({"last_name": changes[n]} if n in changes else {}))
                for n in range(23)
                if not (run and n == 17)
            ]
            rejected = [RejectedRow(f"row-{min(run, 1)}", "phone number is missing", {"x": min(run, 1)})]
            if practice_id == whole:
                counts = store.write_patients(
                    practice_id,
                    "csv",
                    ReadResult(patients, rejected, "test"),
                    None,
                    full=True,
                    cursor_at=max(p.source_updated_at for p in patients),
                )
            else:
                pages = [(page, rejected if i == 1 else []) for i, page in enumerate(_pages(patients, 5))]
                counts = _write_pages(store, practice_id, pages)
            if practice_id == whole:
                expected = counts
            else:
                assert counts == expected
    assert _snapshot(store, whole) == _snapshot(store, paged)
    assert _rejected(store, whole) == _rejected(store, paged)
    assert store.stream_state(whole, "patients").cursor_at == store.stream_state(paged, "patients").cursor_at
    assert expected.unchanged == 22 and expected.updated == 0  # the third run wrote nothing


def test_a_record_read_again_on_a_later_page_counts_once_as_its_later_copy(store: Store) -> None:
    practice_id = _practice(store, "moved")
    first = [_patient(practice_id, n) for n in range(4)]
    edited = _patient(practice_id, 1, last_name="Edited", source_updated_at=STAMP + timedelta(days=1))
    counts = _write_pages(store, practice_id, [(first, []), ([_patient(practice_id, 9), edited], [])])
    assert (counts.inserted, counts.updated, counts.unchanged) == (5, 0, 0)
    names = {p.pms_patient_id: p.last_name for p in store.load_patients(practice_id)}
    assert names["P0001"] == "Edited" and len(names) == 5
    assert store.stream_state(practice_id, "patients").cursor_at == STAMP + timedelta(days=1)


def test_a_patient_valid_then_rejected_while_paging_ends_rejected_and_the_reverse_ends_valid(store: Store) -> None:
    practice_id = _practice(store, "crossed")
    p1, p2 = _patient(practice_id, 1), _patient(practice_id, 2)

    def bad(pid: str) -> RejectedRow:
        return RejectedRow(f"optix:{pid}", "date of birth is in the future", {"patientId": pid}, RowIdentity(pid))

    # P0001: valid on page 0, rejected on page 1 (the later copy); P0002: rejected then valid.
    pages = [([p1], [bad("P0002")]), ([p2], [bad("P0001")])]
    counts = _write_pages(store, practice_id, pages, full=False)
    assert {p.pms_patient_id for p in store.load_patients(practice_id)} == {"P0002"}
    assert _rejected(store, practice_id) == {("optix:P0001", "date of birth is in the future")}
    assert (counts.inserted, counts.rejected) == (1, 1)


def test_a_failure_while_paging_writes_nothing_and_keeps_the_cursor(store: Store) -> None:
    practice_id = _practice(store, "failing")
    patients = [_patient(practice_id, n) for n in range(6)]
    _write_pages(store, practice_id, [(patients, [])])
    before = _snapshot(store, practice_id), store.stream_state(practice_id, "patients")

    def pages() -> Iterator[tuple[list, list]]:
        yield [_patient(practice_id, 1, last_name="Changed", source_updated_at=STAMP + timedelta(days=9))], []
        raise ConnectionError("the PMS went away on page 2")

    with pytest.raises(ConnectionError):
        _write_pages(store, practice_id, prefetch(pages()), full=False)
    assert (_snapshot(store, practice_id), store.stream_state(practice_id, "patients")) == before


def test_the_volume_check_judges_the_whole_paged_read(store: Store) -> None:
    practice_id = _practice(store, "dropping")
    _write_pages(store, practice_id, [(page, []) for page in _pages([_patient(practice_id, n) for n in range(20)], 4)])
    with pytest.raises(VolumeDropRefused):
        _write_pages(store, practice_id, [([_patient(practice_id, 1)], []), ([_patient(practice_id, 2)], [])],
                     max_drop_share=0.2)  # fmt: skip
    assert len(store.load_patients(practice_id)) == 20


def _compute_in_batches(store: Store, practice_id: str, rules: RecallRules, *, everyone: bool, size: int) -> int:
    """The recalls asset's loop: returns how many patients its batches held."""
    held = 0
    for batch in store.recall_batches(practice_id, everyone=everyone, size=size):
        assert len(batch.seen) <= size
        assert batch.key_range is not None and batch.key_range[0] <= batch.key_range[1]
        held += len(batch.seen)
        found = [recall_with_clinical(p, batch.clinical.get(p.pms_patient_id, []), rules) for p in batch.patients]
        store.write_recalls(
            practice_id, [r for r in found if r], scope=batch.seen.keys(), seen=batch.seen, key_range=batch.key_range
        )
    store.finish_recalls(practice_id, fingerprint=rules.fingerprint(), full=everyone)
    return held


def _recalls(store: Store, practice_id: str) -> set[tuple]:
    return _rows(
        store,
        "SELECT p.pms_patient_id, r.due_date, r.rule, r.inferred_flags FROM recalls r "
        "JOIN patients p USING (patient_id) WHERE r.practice_id = :p",
        practice_id,
    )


def test_recalls_computed_in_batches_equal_recalls_computed_at_once(store: Store) -> None:
    """Batches of 3 from the store (patients and their clinical records, read by key range) give the
    recalls one batch gives; a later pass over the changed patients only (read by id) agrees too."""
    rules = RecallRules.from_settings({})
    recalls = {}
    for practice_id, size in (("at-once", 10_000), ("batched", 3)):
        _practice(store, practice_id)
        _write_pages(store, practice_id, [([_patient(practice_id, n) for n in range(17)], [])])
        exams = [  # glaucoma in a note shortens the interval; a later sight test moves the last test
            ClinicalRecord(practice_id, f"C{n}", f"P{n:04d}", date(2023, 6, 1) + timedelta(days=n),
                           notes="Glaucoma confirmed, on drops." if n % 3 == 0 else "Routine, no change.")
            for n in range(0, 17, 2)
        ]  # fmt: skip
        store.write_stream(practice_id, CLINICAL_RECORDS, exams, [], source="csv", run_id=None, full=True)
        assert _compute_in_batches(store, practice_id, rules, everyone=True, size=size) == 17
        assert not list(store.recall_batches(practice_id, everyone=False))  # all marked computed
        assert store.recall_state(practice_id).fingerprint == rules.fingerprint()
        recalls[practice_id] = _recalls(store, practice_id)
    assert recalls["at-once"] == recalls["batched"] and len(recalls["batched"]) == 17
    assert sum(1 for r in recalls["batched"] if r[2] == "glaucoma") == 3
    # Two patients change (one leaves the PMS): only they are read again, and the outcome still agrees.
    for practice_id in recalls:
        store.write_patients(practice_id, "csv", ReadResult([_patient(practice_id, 4, risk_flags=["glaucoma"])]), None)
        with store.begin(practice_id) as conn:
            conn.execute(
                text("UPDATE patients SET active = false, change_seq = change_seq + 1 WHERE pms_patient_id = 'P0012'")
            )
        assert _compute_in_batches(store, practice_id, rules, everyone=False, size=1) == 2
        recalls[practice_id] = _recalls(store, practice_id)
    assert recalls["at-once"] == recalls["batched"] and len(recalls["batched"]) == 16
    assert ("P0004", "glaucoma") in {(r[0], r[2]) for r in recalls["batched"]}


def test_a_clinical_record_changed_marks_only_its_patient_for_recomputation(store: Store) -> None:
    """The merge queues the patients of the clinical records it adds, changes or deactivates (in the
    database, in the same statement): those, and only those, are recomputed next."""
    rules = RecallRules.from_settings({})
    practice_id = _practice(store, "exams")
    _write_pages(store, practice_id, [([_patient(practice_id, n) for n in range(6)], [])])

    def exam(n: int, notes: str = "Routine, no change.") -> ClinicalRecord:
        return ClinicalRecord(practice_id, f"C{n}", f"P{n:04d}", date(2023, 6, 1), notes=notes)

    def write(exams: list[ClinicalRecord], *, full: bool) -> None:
        store.write_stream(practice_id, CLINICAL_RECORDS, exams, [], source="csv", run_id=None, full=full)

    def due() -> set[str]:
        return {pid for batch in store.recall_batches(practice_id, everyone=False) for pid in batch.seen}

    write([exam(1), exam(2), exam(3)], full=True)
    assert due() == {f"P{n:04d}" for n in range(6)}  # a first computation: everyone
    _compute_in_batches(store, practice_id, rules, everyone=True, size=10)
    assert due() == set()
    write([exam(1), exam(2), exam(3)], full=False)  # read again, unchanged
    assert due() == set()
    write([exam(2, "Glaucoma confirmed, on drops."), exam(4)], full=False)  # one edited, one new
    assert due() == {"P0002", "P0004"}
    _compute_in_batches(store, practice_id, rules, everyone=False, size=10)
    write([exam(2, "Glaucoma confirmed, on drops."), exam(3), exam(4)], full=True)  # C1 is gone
    assert due() == {"P0001"}
    assert ("P0002", "glaucoma") in {(r[0], r[2]) for r in _recalls(store, practice_id)}
    _compute_in_batches(store, practice_id, rules, everyone=False, size=10)
    # The practice finds C2 was filed against the wrong patient and moves it: both are due, the one
    # who had it (her glaucoma recall went with it) as well as the one who has it now.
    moved = ClinicalRecord(practice_id, "C2", "P0005", date(2023, 6, 1), notes="Glaucoma confirmed, on drops.")
    write([moved], full=False)
    assert due() == {"P0002", "P0005"}
    _compute_in_batches(store, practice_id, rules, everyone=False, size=10)
    rules_of = {r[0]: r[2] for r in _recalls(store, practice_id)}
    assert (rules_of["P0002"], rules_of["P0005"]) == ("default", "glaucoma")


def test_a_clinical_change_committed_while_recalls_are_computed_keeps_its_patient_queued(store: Store) -> None:
    """A clinical record's merge queues its patient with a new stamp: a change that lands after a
    recall batch read the patient (and before its recalls were written) is not taken off the queue
    with the batch, so the next pass computes it."""
    rules = RecallRules.from_settings({})
    practice_id = _practice(store, "exam-race")
    _write_pages(store, practice_id, [([_patient(practice_id, n) for n in range(3)], [])])

    def write(notes: str, *, full: bool = False) -> None:
        exam = ClinicalRecord(practice_id, "C1", "P0001", date(2023, 6, 1), notes=notes)
        store.write_stream(practice_id, CLINICAL_RECORDS, [exam], [], source="csv", run_id=None, full=full)

    def due() -> set[str]:
        return {pid for batch in store.recall_batches(practice_id, everyone=False) for pid in batch.seen}

    write("Routine, no change.", full=True)
    _compute_in_batches(store, practice_id, rules, everyone=True, size=10)
    assert due() == set()
    write("Glaucoma confirmed, on drops.")
    [batch] = list(store.recall_batches(practice_id, everyone=False))
    assert set(batch.seen) == {"P0001"}
    write("Glaucoma confirmed, on two drops.")  # after the batch read her
    found = [recall_with_clinical(p, batch.clinical.get(p.pms_patient_id, []), rules) for p in batch.patients]
    store.write_recalls(
        practice_id, [r for r in found if r], scope=batch.seen.keys(), seen=batch.seen, key_range=batch.key_range
    )
    assert due() == {"P0001"}
    _compute_in_batches(store, practice_id, rules, everyone=False, size=10)
    assert due() == set()


def test_the_queue_trigger_plans_its_join_for_each_statement(store: Store) -> None:
    """The update trigger that queues changed patients joins the statement's old and new rows. Its
    plan must be made for each statement (`EXECUTE`): PL/pgSQL keeps a statement's first plan, and
    one made when a statement changed nothing (any nightly) is a nested loop, which a full read
    changing every patient then ran over every pair (75 s at 20,000 patients in a probe; `bench/
    resync.py` measures it at 200,000). The embedded server has no `auto_explain` to show the
    trigger's plan, so this holds the function as it is planned (fails with migration 0021's), and
    that the statement it runs still sees the transition tables: after a statement that changed no
    one on the same connection, one changing everybody queues everybody."""
    practice_id = _practice(store, "queue-plan")
    _write_pages(store, practice_id, [([_patient(practice_id, n) for n in range(300)], [])])
    with store.begin_owner() as conn:
        body = conn.execute(text("SELECT pg_get_functiondef('queue_changed_patients'::regproc)")).scalar_one()
        assert "EXECUTE 'INSERT INTO recall_due" in body
        conn.execute(text("DELETE FROM recall_due WHERE practice_id = :p"), {"p": practice_id})
        conn.execute(text("UPDATE patients SET active = active WHERE practice_id = 'no-such-practice'"))
        conn.execute(text("UPDATE patients SET change_seq = change_seq + 1 WHERE practice_id = :p"), {"p": practice_id})
        count = conn.execute(text("SELECT count(*) FROM recall_due WHERE practice_id = :p"), {"p": practice_id})
        assert count.scalar_one() == 300


def test_a_recall_batch_reads_what_a_recall_needs_and_gives_the_whole_patients_recalls(store: Store) -> None:
    """A recall pass reads only what a recall reads of a patient (no names, phones or contact) and of
    a clinical record (no clinician, unknown flags or PMS timestamp): the recalls it gives are those
    of the whole stored rows, children, PMS dates, notes, flags, pressures and exam types included."""
    rules = RecallRules.from_settings({})
    practice_id = _practice(store, "inputs")
    people = [
        _patient(practice_id, n,
                 date_of_birth=date(2016, 5, 1) if n % 4 == 0 else date(1950 + n, 1, 1),
                 clinical_notes="Glaucoma suspect, review." if n % 3 == 0 else None,
                 pms_recall_due_date=date(2027, 1, 1) if n % 5 == 1 else None)
        for n in range(12)
    ]  # fmt: skip
    _write_pages(store, practice_id, [(people, [])])
    exams = [
        ClinicalRecord(practice_id, f"C{n}-{k}", f"P{n:04d}", date(2021 + k, 3, 1 + n),
                       record_type="sight_test" if k != 1 else "contact_lens_check",
                       flags=["glaucoma_family_history"] if n % 4 == 2 and k == 0 else [],
                       unknown_flags=["XYZ"] if n % 2 else [],
                       notes="IOP raised, refer." if n % 6 == 5 else "Routine.",
                       iop_right_mmhg=24.5 if n % 7 == 3 else 15.0, iop_left_mmhg=16.0 if k else None,
                       clinician="C01", source_updated_at=STAMP)
        for n in range(0, 12, 1) for k in range(n % 3 + 1)
        if n % 5 != 4  # some patients have no clinical record
    ]  # fmt: skip
    store.write_stream(practice_id, CLINICAL_RECORDS, exams, [], source="csv", run_id=None, full=True)
    whole = {p.pms_patient_id: p for p in store.load_patients(practice_id)}
    whole_records = store.load_clinical_records(practice_id)
    batches = list(store.recall_batches(practice_id, everyone=True, size=5))
    assert sum(len(b.patients) for b in batches) == 12
    assert sum(len(r) for b in batches for r in b.clinical.values()) == len(exams)
    for batch in batches:
        for p in batch.patients:
            records = batch.clinical.get(p.pms_patient_id, [])
            assert recall_with_clinical(p, records, rules) == recall_with_clinical(
                whole[p.pms_patient_id], whole_records.get(p.pms_patient_id, []), rules
            )
            assert p.first_name == "" and p.phones == []  # nothing else of the patient was read
            assert all(r.clinician is None and r.unknown_flags == [] for r in records)  # nor of its records


def test_recall_batches_of_scattered_ids_of_every_shape_keep_every_recall(store: Store) -> None:
    """Mixed case, hyphens and spaces, three a batch, in a full pass and a changed-only pass whose
    batch holds scattered ids: every patient keeps its recall and none is left stale. (The bounds a
    batch's writes use come from the database's order: under a natural-language collation, as on a
    managed server, Python's min and max are not its. The embedded build has no such collation.)"""
    rules = RecallRules.from_settings({})
    practice_id = _practice(store, "mixed-ids")
    ids = ["a1", "B2", "c-3", "D 4", "e5", "F6", "g-7", "H8"]
    _write_pages(store, practice_id, [([_patient(practice_id, n, pms_patient_id=i) for n, i in enumerate(ids)], [])])
    assert _compute_in_batches(store, practice_id, rules, everyone=True, size=3) == len(ids)
    assert {r[0] for r in _recalls(store, practice_id)} == set(ids)
    assert not list(store.recall_batches(practice_id, everyone=False))
    with store.begin(practice_id) as conn:  # three scattered patients change
        conn.execute(
            text("UPDATE patients SET change_seq = change_seq + 1 WHERE pms_patient_id IN ('a1', 'D 4', 'H8')")
        )
    assert _compute_in_batches(store, practice_id, rules, everyone=False, size=3) == 3
    assert {r[0] for r in _recalls(store, practice_id)} == set(ids)
    assert not list(store.recall_batches(practice_id, everyone=False))


def test_recomputing_unchanged_recalls_writes_nothing_and_a_changed_one_is_written(store: Store) -> None:
    rules = RecallRules.from_settings({})
    practice_id = _practice(store, "rewrite")
    _write_pages(store, practice_id, [([_patient(practice_id, n) for n in range(6)], [])])
    assert _compute_in_batches(store, practice_id, rules, everyone=True, size=10) == 6

    def computed() -> dict[str, object]:
        return {r[0]: r[1] for r in _rows(store, "SELECT p.pms_patient_id, r.computed_at FROM recalls r "
                                                 "JOIN patients p USING (patient_id) WHERE r.practice_id = :p", practice_id)}  # fmt: skip

    before = computed()
    patients = store.load_patients(practice_id)
    found = [recall_with_clinical(p, [], rules) for p in patients]
    assert store.write_recalls(practice_id, [r for r in found if r], scope=[p.pms_patient_id for p in patients]) == 0
    assert computed() == before  # not one recall row written
    patients[2].risk_flags = ["glaucoma"]
    found = [recall_with_clinical(p, [], rules) for p in patients]
    assert store.write_recalls(practice_id, [r for r in found if r], scope=[p.pms_patient_id for p in patients]) == 1
    after = computed()
    assert after["P0002"] != before["P0002"] and {k: v for k, v in after.items() if k != "P0002"} == {
        k: v for k, v in before.items() if k != "P0002"
    }


def test_a_full_read_puts_right_a_stored_row_that_no_longer_matches_its_source(store: Store) -> None:
    """Every compared column counts: a row changed behind the source's back is rewritten and its
    recall input bumped; the same instant written with another offset is no change."""
    practice_id = _practice(store, "drifted")
    patients = [_patient(practice_id, n) for n in range(3)]
    _write_pages(store, practice_id, [(patients, [])])
    with store.begin_owner() as conn:
        conn.execute(
            text(
                "UPDATE patients SET phones = ARRAY['+15551234567'], contact_channels = '{}' WHERE pms_patient_id = 'P0001'"
            )
        )
    seq = dict(_rows(store, "SELECT pms_patient_id, change_seq FROM patients WHERE practice_id = :p", practice_id))
    shifted = [
        _patient(
            practice_id, n, source_updated_at=(STAMP + timedelta(minutes=n)).astimezone(timezone(timedelta(hours=1)))
        )
        for n in range(3)
    ]  # the same instants, written as +01:00
    counts = _write_pages(store, practice_id, [(shifted, [])])
    assert (counts.updated, counts.unchanged) == (1, 2)
    after = dict(_rows(store, "SELECT pms_patient_id, change_seq FROM patients WHERE practice_id = :p", practice_id))
    assert after["P0001"] == seq["P0001"] + 1 and after["P0000"] == seq["P0000"]
    phones = _rows(store, "SELECT phones, contact_channels FROM patients WHERE pms_patient_id = 'P0001' AND practice_id = :p",
                   practice_id)  # fmt: skip
    assert phones == {(("+447700900001",), None)}


def test_prefetch_keeps_order_raises_in_order_and_stops_its_producer() -> None:
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("page 2")

    got: list[int] = []
    with pytest.raises(ValueError, match="page 2"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]

    produced: list[int] = []
    finished = threading.Event()

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                produced.append(n)
                yield n
                n += 1
        finally:
            finished.set()

    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    assert finished.wait(5) and len(produced) <= 3 + 2 + 2  # bounded: never far ahead of the consumer


def test_optix_pages_add_up_to_the_whole_read() -> None:
    server = OptixSandbox(practices={"OPX-4004": 40}, api_keys={"k-stream": "OPX-4004"})
    practice = Practice("demo-optix", "Demo", PmsKind.OPTIX, {"practice_id": "OPX-4004"}, "connected")
    with server:
        practice.settings["api_url"] = server.url
        resource = OptixResource(page_size=7, max_attempts=2, backoff_seconds=0.01)
        with resource.open(practice, {"api_key": "k-stream"}) as client:
            whole = client.read_patients(None, date.today())
            pages = list(client.iter_patients(None, date.today()))
            appointments = client.read_appointments(None)
            appointment_pages = list(client.iter_appointments(None))
            clinical = client.read_clinical_records(None)
            clinical_pages = list(client.iter_clinical_records(None))
    assert len(pages) == 6  # 40 patients, 7 a page
    assert [p for page in pages for p in page.patients] == whole.patients
    assert all(page.source_ref == whole.source_ref for page in pages)
    assert [a for page in appointment_pages for a in page.records] == appointments.records
    assert [c for page in clinical_pages for c in page.records] == clinical.records
    assert len(appointment_pages) > 1 and len(clinical_pages) > 1


def test_a_full_re_read_scans_its_stage_a_bounded_number_of_times(store: Store) -> None:
    """A full read is reconciled against what the store holds (the would-be drop, then the rows no
    longer read marked inactive) with the stage indexed and analysed: the stage is read a handful of
    times whatever the practice's size, never once per stored row (which made a 200,000-row CSV
    re-sync quadratic). Counted by PostgreSQL for this transaction, so nothing is timed."""
    from nvc_pipelines.store.db import driver
    from nvc_pipelines.store.streams import merge_staged, stage_pages

    practice_id = _practice(store, "stage-scans")
    stored = [_patient(practice_id, n) for n in range(3000)]
    store.write_patients(practice_id, "csv", ReadResult(stored), "r1", full=True)
    again = stored[:2990]  # ten no longer read: the drop is counted and they are marked inactive
    with store.begin(practice_id) as conn, driver(conn).cursor() as cur:
        staged = stage_pages(cur, PATIENTS, _pages(again, 500))
        counts = merge_staged(cur, PATIENTS, practice_id, staged, full=True, max_drop_share=0.5)
        cur.execute("SELECT seq_scan FROM pg_stat_xact_all_tables WHERE relid = 'stage_patients'::regclass")
        (scans,) = cur.fetchone()
    assert counts.deactivated == 10 and counts.unchanged == 2990
    assert scans < 20, f"the stage was scanned {scans} times for {len(stored)} stored rows"


def test_a_key_range_needs_the_batch_it_bounds(store: Store) -> None:
    """Bounds without the batch's ids would leave the practice's other recalls to the DELETE."""
    practice_id = _practice(store, "ranged")
    with pytest.raises(ValueError, match="give the batch's scope with it"):
        store.write_recalls(practice_id, [], key_range=("a", "b"))


def test_a_pms_is_read_ahead_in_a_thread_and_a_local_file_in_the_writers() -> None:
    """A PMS's pages are fetched and normalised a page or two ahead in a background thread (it hides
    the network's waits); a CSV file's are read in the writer's own thread (nothing to hide, and two
    threads would contend for the interpreter lock)."""
    from assets.sync import read_ahead
    from resources.csv_source import CsvClient

    def pages():
        for n in range(3):
            yield n, threading.current_thread().name

    csv_client = CsvClient(Practice("c", "CSV", PmsKind.CSV, {"path": "x.csv"}, "connected"))
    pms_client = SimpleNamespace(kind=PmsKind.OPTIX)
    assert {name for _n, name in read_ahead(csv_client, pages())} == {threading.current_thread().name}
    assert {name for _n, name in read_ahead(pms_client, pages())} == {"nvc-prefetch"}


def test_a_nightlys_check_reads_only_the_changed_rows_range_of_each_table(store: Store) -> None:
    """The checks read the rows written since they last passed through each table's (practice, time)
    index, not a scan of the practice (at 200,000 patients a scan was 30-110 ms a table, each night).
    Counted by PostgreSQL for this transaction, as the application under row-level security."""
    from nvc_pipelines.model import Appointment, AppointmentStatus
    from nvc_pipelines.store.checks import rows_sql
    from nvc_pipelines.store.streams import APPOINTMENTS

    practice_id = _practice(store, "changed-reads")
    people = [_patient(practice_id, n) for n in range(3000)]
    store.write_patients(practice_id, "csv", ReadResult(people), "r1", full=True)
    at = datetime(2026, 1, 5, 9, tzinfo=UTC)
    visits = [
        Appointment(practice_id, f"A{n}", f"P{n:04d}", at + timedelta(days=n), at + timedelta(days=n, minutes=30),
                    AppointmentStatus.COMPLETED)
        for n in range(3000)
    ]  # fmt: skip
    store.write_stream(practice_id, APPOINTMENTS, visits, [], source="csv", run_id=None, full=True)
    rules = RecallRules.from_settings({})
    store.write_recalls(
        practice_id, [r for p in store.load_patients(practice_id) if (r := recall_with_clinical(p, [], rules))]
    )
    with store.begin_owner() as conn:
        for table in ("patients", "appointments", "recalls"):
            conn.execute(text(f"ANALYZE {table}"))
        (since,) = conn.execute(text("SELECT now()")).one()
    with store.begin(practice_id) as conn:
        for kind in ("patients", "appointments", "recalls"):
            assert conn.execute(text(rows_sql(kind, changed=True)), {"p": practice_id, "since": since}).all() == []
        scans = {
            r.relname: (r.seq_scan, r.idx_scan)
            for r in conn.execute(
                text(
                    "SELECT relname, seq_scan, idx_scan FROM pg_stat_xact_all_tables "
                    "WHERE relname IN ('patients', 'appointments', 'recalls')"
                )
            )
        }
    assert {t: seq for t, (seq, _idx) in scans.items()} == {"patients": 0, "appointments": 0, "recalls": 0}, scans
    assert all(idx >= 1 for _seq, idx in scans.values()), scans
