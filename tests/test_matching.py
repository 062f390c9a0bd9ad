"""Matching by phone plus name or date of birth, duplicates, and undoable merges."""

from __future__ import annotations

from datetime import date

from hypothesis import given, settings
from hypothesis import strategies as st

from nvc_pipelines.matching import find_duplicates, match_reason, resolve_derived_identities
from nvc_pipelines.model import Patient, Phone, PhoneType, PmsKind, ReadResult
from nvc_pipelines.normalise import derived_patient_key
from nvc_pipelines.store import Store

LANDLINE = Phone("+441614960123", PhoneType.LANDLINE)


def person(pid: str, first: str, last: str, phones: list[Phone], dob: date | None = None) -> Patient:
    return Patient("p", pid, first, last, phones, date_of_birth=dob, last_eye_test_date=date(2024, 1, 1))


def test_family_sharing_a_landline_stays_separate() -> None:
    mum = person("1", "Ann", "Lee", [LANDLINE], date(1970, 1, 1))
    son = person("2", "Tom", "Lee", [LANDLINE], date(2005, 5, 5))
    twin = person("3", "Tim", "Lee", [LANDLINE], date(2005, 5, 5))
    assert match_reason(mum, son) is None
    assert match_reason(son, twin) is None  # same phone and birthday, different first names
    assert find_duplicates([mum, son, twin]) == []


def test_same_person_twice_is_listed_once() -> None:
    a = person("10", "Siân", "O'Neill", [LANDLINE])
    b = person("11", "SIÂN", "ONeill", [Phone("+447700900123", PhoneType.MOBILE), LANDLINE])
    pairs = find_duplicates([a, b, person("12", "Bob", "Kay", [LANDLINE])])
    assert [(d.keep, d.other, d.reason) for d in pairs] == [("10", "11", "same phone and name")]


def test_reimport_with_reordered_phones_matches_the_stored_patient() -> None:
    stored = person(derived_patient_key("Ann", "Lee", "+441614960123"), "Ann", "Lee", [LANDLINE])
    mobile = Phone("+447700900555", PhoneType.MOBILE)
    again = person(derived_patient_key("Ann", "Lee", mobile.e164), "Ann", "Lee", [mobile, LANDLINE])
    assert resolve_derived_identities([again], [stored]) == {again.pms_patient_id: stored.pms_patient_id}


names = st.sampled_from(["Ann", "Tom", "Tim", "Zoë"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(names, st.sampled_from(["Lee", "Kay"]), st.integers(0, 3), st.sampled_from([None, 1970, 2005])),
        max_size=12,
    )
)
def test_matching_never_loses_or_duplicates_anyone(rows) -> None:
    """Re-importing the same people (ids derived from each row) maps every row to at most one stored
    patient, and distinct people never collapse into one."""
    phones = [Phone(f"+44770090{i:04d}", PhoneType.MOBILE) for i in range(4)]
    people = [
        person(derived_patient_key(f, ln, phones[ph].e164), f, ln, [phones[ph]], date(y, 1, 1) if y else None)
        for f, ln, ph, y in rows
    ]
    mapping = resolve_derived_identities(people, people)
    for source, target in mapping.items():
        a = next(p for p in people if p.pms_patient_id == source)
        b = next(p for p in people if p.pms_patient_id == target)
        assert match_reason(a, b) is not None
        assert (a.first_name.casefold(), a.last_name.casefold()) == (
            b.first_name.casefold(),
            b.last_name.casefold(),
        ) or (a.date_of_birth == b.date_of_birth and a.first_name.casefold() == b.first_name.casefold())


def test_merge_keeps_phones_and_history_and_is_undoable(store: Store) -> None:
    store.add_practice("m1", "Merge practice", PmsKind.CSV, {}, {})
    mobile = Phone("+447700900777", PhoneType.MOBILE)
    a = Patient("m1", "A1", "Ann", "Lee", [], last_eye_test_date=date(2020, 1, 1))
    b = Patient("m1", "A2", "Ann", "Lee", [mobile], last_eye_test_date=date(2020, 1, 1))
    store.write_patients("m1", "csv", ReadResult([a, b]), None, full=True)
    merge_id = store.merge_patients("m1", "A1", "A2", actor="ops:test")
    assert [p.pms_patient_id for p in store.load_patients("m1")] == ["A1"]

    from nvc_pipelines.recall import RecallRules, compute_recall

    store.write_recalls("m1", [compute_recall(p, RecallRules.from_settings({})) for p in store.load_patients("m1")])
    store.rebuild_call_list("m1", date(2026, 11, 25))
    assert [(c["pms_patient_id"], c["phone"]) for c in store.call_list("m1")] == [("A1", "+447700900777")]

    # The PMS sends both again: the merged record stays merged.
    store.write_patients("m1", "csv", ReadResult([a, b]), None, full=True)
    assert [p.pms_patient_id for p in store.load_patients("m1")] == ["A1"]

    store.undo_merge("m1", merge_id, actor="ops:test")
    assert [p.pms_patient_id for p in store.load_patients("m1")] == ["A1", "A2"]
    actions = [e["action"] for e in store.audit_entries("m1")]
    assert [a for a in actions if a in ("merge", "unmerge")] == ["unmerge", "merge"]


def test_id_less_rows_are_matched_a_page_at_a_time_and_a_repeat_across_pages_is_rejected(store: Store) -> None:
    """A paged read matches each page's id-less rows against the stored patients on that page's
    numbers only. Two records ending on one identity across pages (a row matched onto a patient the
    read has under its own id, either way round) are a duplicate: the later is rejected. One record
    read again on a later page (edited while the PMS paged), matched or with its own id, is not."""
    store.add_practice("m2", "Paged matching", PmsKind.CSV, {}, {})
    mobile = Phone("+447700900555", PhoneType.MOBILE)
    ann = person(derived_patient_key("Ann", "Lee", LANDLINE.e164), "Ann", "Lee", [LANDLINE])
    ann.practice_id = "m2"
    bob = Patient("m2", "B7", "Bob", "Kay", [Phone("+447700900666", PhoneType.MOBILE)],
                  last_eye_test_date=date(2024, 1, 1))  # fmt: skip
    store.write_patients("m2", "csv", ReadResult([ann, bob]), None, full=True)

    def again() -> Patient:  # Ann with a new mobile first: a new derived id, matched to the stored Ann
        return Patient("m2", derived_patient_key("Ann", "Lee", mobile.e164), "Ann", "Lee", [mobile, LANDLINE],
                       last_eye_test_date=date(2024, 1, 1))  # fmt: skip

    with store.derived_identities("m2") as remap:
        first = ReadResult([again(), bob])
        assert remap(first) == 1
        assert [p.pms_patient_id for p in first.patients] == [ann.pms_patient_id, "B7"]
        second = ReadResult([again(), bob])  # both read again on a later page: each its later copy
        assert remap(second) == 1 and not second.rejected
        assert [p.pms_patient_id for p in second.patients] == [ann.pms_patient_id, "B7"]
        third = ReadResult([person(ann.pms_patient_id, "Ann", "Lee", [LANDLINE])])  # Ann's own id, now matched
        assert remap(third) == 0 and third.patients == []
        assert [(r.row_ref, r.reason) for r in third.rejected] == [
            (ann.pms_patient_id, "duplicate of another row (same patient)")
        ]

    with store.derived_identities("m2") as remap:  # two id-less rows of a file, both Ann: each keeps its row
        rows = [("export.csv:line 2", {"first_name": "Ann", "phone_number": mobile.e164}),
                ("export.csv:line 9", {"first_name": "ann", "phone_number": LANDLINE.e164})]  # fmt: skip
        first = ReadResult([again()], origins={again().pms_patient_id: rows[0]})
        second = ReadResult(
            [person(ann.pms_patient_id, "Ann", "Lee", [LANDLINE])], origins={ann.pms_patient_id: rows[1]}
        )
        assert remap(first) == 1 and remap(second) == 0 and second.patients == []
        (rejected,) = second.rejected
        assert (rejected.row_ref, rejected.reason, rejected.raw) == (
            "export.csv:line 9", "duplicate of export.csv:line 2 (same patient)", rows[1][1]
        )  # fmt: skip

    # A PMS read (not one snapshot) with her under her id on one page and an id-less row matched onto
    # her on a later page: the row is rejected, and she stays (a rejection naming her id would have
    # counted as her later copy, unstaged her and let the full read deactivate her).
    from nvc_pipelines.store.streams import PATIENTS

    with store.derived_identities("m2") as remap:

        def pages():
            for page in (
                ReadResult([person(ann.pms_patient_id, "Ann", "Lee", [LANDLINE]), bob]),
                ReadResult([again()], origins={again().pms_patient_id: ("row-without-id-1", {"first_name": "Ann"})}),
            ):
                remap(page)
                yield page.patients, page.rejected

        counts = store.write_stream_pages("m2", PATIENTS, pages(), source="optix", run_id=None, full=True)
    assert (counts.rejected, counts.deactivated) == (1, 0)
    assert {p.pms_patient_id for p in store.load_patients("m2")} == {ann.pms_patient_id, "B7"}

    with store.derived_identities("m2") as remap:  # the other way round: her own id first, then a match
        first = ReadResult([person(ann.pms_patient_id, "Ann", "Lee", [LANDLINE])])
        assert remap(first) == 0 and len(first.patients) == 1
        second = ReadResult([again()])
        assert remap(second) == 1 and second.patients == [] and len(second.rejected) == 1
