"""The call list is safe to dial: the placing rules on their own, then through the real store, where a
call outcome changes the list in the transaction that records it, and survives syncs and merges."""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import UTC, date, datetime, timedelta

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from nvc_pipelines import writeback
from nvc_pipelines.application.cli import main
from nvc_pipelines.calling import (
    UK_TZ,
    CallEvent,
    CallSettings,
    CallSettingsError,
    DuePerson,
    ask_for,
    entry_ask_for,
    place,
)
from nvc_pipelines.model import (
    CallOutcome,
    Channel,
    ContactPreferences,
    Patient,
    PatientStatus,
    Phone,
    PhoneType,
    PmsKind,
    ReadResult,
)
from nvc_pipelines.recall import RecallRules, compute_recall
from nvc_pipelines.store import Store, calls

SETTINGS = CallSettings()
# A Monday in term time, 10:00 UK (GMT).
MONDAY = datetime(2026, 11, 23, 10, 0, tzinfo=UK_TZ)


def uk(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=UK_TZ)


# --- calling hours and bank holidays ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (uk(2026, 11, 23, 10, 0), uk(2026, 11, 23, 10, 0)),  # open now
        (uk(2026, 11, 23, 7, 30), uk(2026, 11, 23, 9, 0)),  # before opening
        (uk(2026, 11, 23, 18, 0), uk(2026, 11, 24, 9, 0)),  # closing time is closed
        (uk(2026, 11, 27, 18, 30), uk(2026, 11, 30, 9, 0)),  # Friday evening -> Monday
        (uk(2026, 11, 28, 12, 0), uk(2026, 11, 30, 9, 0)),  # Saturday
        (uk(2026, 12, 24, 18, 5), uk(2026, 12, 29, 9, 0)),  # Christmas, Boxing Day observed on Monday 28th
        (uk(2027, 3, 25, 19, 0), uk(2027, 3, 30, 9, 0)),  # Good Friday and Easter Monday
        (uk(2027, 7, 1, 8, 0), uk(2027, 7, 1, 9, 0)),  # summer time: 09:00 BST
    ],
)
def test_next_open_keeps_to_hours_weekdays_and_bank_holidays(at: datetime, expected: datetime) -> None:
    got = SETTINGS.next_open(at)
    assert got == expected and got.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (uk(2026, 11, 23, 10, 0), uk(2026, 11, 23, 9, 0)),  # open: the window's own opening
        (uk(2026, 11, 23, 17, 59), uk(2026, 11, 23, 9, 0)),
        (uk(2026, 11, 23, 7, 30), uk(2026, 11, 23, 9, 0)),  # before opening
        (uk(2026, 11, 23, 18, 0), uk(2026, 11, 24, 9, 0)),  # closed: the next window
        (uk(2026, 11, 28, 12, 0), uk(2026, 11, 30, 9, 0)),  # Saturday
        (uk(2026, 12, 25, 10, 0), uk(2026, 12, 29, 9, 0)),  # Christmas Day
    ],
)
def test_window_open_is_the_current_windows_opening_else_the_next(at: datetime, expected: datetime) -> None:
    assert SETTINGS.window_open(at) == expected


def test_nations_have_their_own_bank_holidays() -> None:
    st_andrews = uk(2026, 11, 30, 9, 30)  # a Scottish bank holiday, a working day in England
    assert SETTINGS.next_open(st_andrews) == st_andrews
    scotland = CallSettings.from_settings({"calling_nation": "Scotland"})
    assert scotland.next_open(st_andrews) == uk(2026, 12, 1, 9, 0)
    assert CallSettings.from_settings({"calling_nation": "northern_ireland"}).next_open(uk(2027, 3, 17, 10)) == uk(
        2027, 3, 18, 9
    )  # St Patrick's Day


def test_practice_settings_for_hours_days_and_limits() -> None:
    s = CallSettings.from_settings(
        {"calling_hours": "10:00-16:30", "calling_days": "tue-sat", "max_attempts": "5", "retry_after_days": "1"}
    )
    assert s.next_open(uk(2026, 11, 23, 11)) == uk(2026, 11, 24, 10)  # Monday is not a calling day
    assert s.next_open(uk(2026, 11, 28, 16, 29)) == uk(2026, 11, 28, 16, 29)  # Saturday is
    assert s.max_attempts == 5 and s.retry_after == timedelta(days=1)
    assert CallSettings.from_settings({"calling_days": "mon,wed,fri"}).days == frozenset({0, 2, 4})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"calling_hours": "9-5"}, "calling_hours '9-5' is not HH:MM-HH:MM"),
        ({"calling_hours": "18:00-09:00"}, "close before they open"),
        ({"calling_days": "weekdays"}, "calling_days 'weekdays' is not like mon-fri"),
        ({"calling_nation": "france"}, "calling_nation 'france' is not known"),
        ({"max_attempts": "0"}, "max_attempts '0' must be between 1 and 20"),
        ({"snooze_declined_days": "soon"}, "snooze_declined_days 'soon' is not a number"),
    ],
)
def test_unusable_settings_are_refused_with_the_reason(settings: dict[str, str], message: str) -> None:
    with pytest.raises(CallSettingsError, match=message):
        CallSettings.from_settings(settings)


# --- the placing rules --------------------------------------------------------------------------------

DUE = date(2026, 10, 1)
MOB, HOME = "+447700900001", "+441134960001"


def person(pid: int = 1, **values) -> DuePerson:
    fields = {
        "patient_id": pid,
        "pms_patient_id": f"P{pid}",
        "first_name": "Ann",
        "last_name": "Lee",
        "date_of_birth": date(1970, 1, 1),
        "due_date": DUE,
        "reason": "routine sight test every 2 years",
        "phones": [MOB, HOME],
    }
    return DuePerson(**{**fields, **values})


def one(p: DuePerson, now: datetime = MONDAY, last_calls: dict | None = None):
    return place([p], last_calls or {}, SETTINGS, now)[0]


def call(outcome: CallOutcome, at: datetime, phone: str | None = MOB, due: date | None = DUE) -> CallEvent:
    return CallEvent(outcome, at, phone, due)


@pytest.mark.parametrize(
    ("values", "code"),
    [
        ({"status": "deceased", "status_date": date(2026, 9, 1)}, "deceased"),
        ({"suppressed": "deceased"}, "deceased"),
        ({"status": "gone_away"}, "gone_away"),
        ({"status": "inactive"}, "inactive"),
        ({"suppressed": "asked_not_to_be_called"}, "asked_not_to_be_called"),
        ({"phone_recall": False}, "do_not_call"),
        ({"no_recall": True}, "do_not_call"),
        ({"channels": ["sms", "email"]}, "do_not_call"),
        ({"booked": True}, "booked"),
        ({"phones": []}, "no_callable_number"),
        # The gravest reason wins: a deceased patient who also opted out is reported deceased.
        ({"status": "deceased", "phone_recall": False, "booked": True}, "deceased"),
    ],
)
def test_who_is_kept_off_the_list_and_why(values: dict, code: str) -> None:
    placed = one(person(**values))
    assert not placed.listed and placed.reason_code == code and placed.detail


def test_consent_recorded_with_phone_allows_a_call() -> None:
    assert one(person(channels=["phone", "sms"])).listed


def test_wrong_number_moves_to_the_next_number_then_none() -> None:
    first = person(events=[call(CallOutcome.WRONG_NUMBER, MONDAY - timedelta(hours=1))])
    placed = one(first)
    assert placed.listed and placed.phone == HOME
    both = person(
        events=[
            call(CallOutcome.WRONG_NUMBER, MONDAY - timedelta(days=3)),
            call(CallOutcome.WRONG_NUMBER, MONDAY - timedelta(hours=1), HOME),
        ]
    )
    placed = one(both)
    assert placed.reason_code == "no_callable_number" and "wrong number" in placed.detail


def test_unanswered_calls_are_spaced_and_capped_per_recall_cycle() -> None:
    yesterday = MONDAY - timedelta(days=1)
    placed = one(person(events=[call(CallOutcome.NO_ANSWER, yesterday)]))
    assert placed.listed and placed.earliest_call_at == yesterday + timedelta(days=2)  # Tuesday 10:00
    three = [call(o, MONDAY - timedelta(days=d)) for o, d in ((CallOutcome.NO_ANSWER, 9), (CallOutcome.VOICEMAIL, 6),
                                                               (CallOutcome.BUSY, 3))]  # fmt: skip
    assert one(person(events=three)).reason_code == "attempts_exhausted"
    # Attempts made for an earlier recall do not count against this one.
    older = [CallEvent(e.outcome, e.occurred_at, e.phone, date(2024, 10, 1)) for e in three]
    assert one(person(events=older)).listed
    assert (
        CallSettings.from_settings({"max_attempts": "4"})
        and place([person(events=three)], {}, CallSettings.from_settings({"max_attempts": "4"}), MONDAY)[0].listed
    )


def test_declined_and_call_back_later_snooze() -> None:
    declined = person(events=[call(CallOutcome.DECLINED, MONDAY - timedelta(days=29))])
    assert one(declined).reason_code == "snoozed"
    assert one(declined, now=MONDAY + timedelta(days=2)).listed  # 30 days on
    later = person(events=[call(CallOutcome.CALL_BACK_LATER, MONDAY - timedelta(days=1))])
    assert one(later).reason_code == "snoozed"
    placed = one(later, now=MONDAY + timedelta(days=1))  # the snooze is over: since the window opened
    assert placed.listed and placed.earliest_call_at == uk(2026, 11, 24, 9, 0)


def test_booked_on_a_call_holds_until_the_booking_shows() -> None:
    booked = person(events=[call(CallOutcome.BOOKED, MONDAY - timedelta(days=3))])
    assert one(booked).reason_code == "booked"
    assert one(booked, now=MONDAY + timedelta(days=12)).listed  # held 14 days at most


def test_at_most_one_call_per_number_per_day() -> None:
    called_this_morning = {MOB: MONDAY - timedelta(hours=1)}  # about someone else on the same number
    placed = one(person(), last_calls=called_this_morning)
    assert placed.earliest_call_at == uk(2026, 11, 24, 9, 0)
    friday_evening = uk(2026, 11, 27, 17, 0)
    assert one(person(), now=friday_evening, last_calls={MOB: friday_evening}).earliest_call_at == uk(2026, 11, 30, 9)


def test_children_are_called_through_their_guardian() -> None:
    child = person(first_name="Alfie", last_name="Kay", date_of_birth=date(2017, 5, 20), guardian_name="Mrs Jo Kay")
    assert ask_for(child, MONDAY.date()) == "Mrs Jo Kay"
    orphan_record = person(first_name="Alfie", date_of_birth=date(2017, 5, 20))
    assert ask_for(orphan_record, MONDAY.date()) == "parent or guardian of Alfie"
    sixteen_today = person(date_of_birth=date(2010, 11, 23))
    assert ask_for(sixteen_today, MONDAY.date()) == "Ann Lee"
    household = [{"ask_for": "Jo Kay"}, {"ask_for": "Mrs Jo Kay"}, {"ask_for": "Sam Kay"}]
    assert entry_ask_for(household) == "Jo Kay or Sam Kay"


# --- through the store ---------------------------------------------------------------------------------

TODAY = date.today()


def _patient(practice_id: str, pid: str, first: str, last: str, phones: list[str], **extra) -> Patient:
    kinds = [PhoneType.MOBILE if p.startswith("+447") else PhoneType.LANDLINE for p in phones]
    return Patient(
        practice_id,
        pid,
        first,
        last,
        [Phone(p, k) for p, k in zip(phones, kinds, strict=True)],
        last_eye_test_date=extra.pop("last_test", TODAY - timedelta(days=900)),
        **extra,
    )


def _sync(store: Store, practice_id: str, people: list[Patient], *, full: bool = True) -> None:
    store.write_patients(practice_id, "csv", ReadResult(people), None, full=full)
    rules = RecallRules.from_settings({})
    recalls = [r for r in (compute_recall(p, rules) for p in store.load_patients(practice_id)) if r is not None]
    store.write_recalls(practice_id, recalls)
    store.rebuild_call_list(practice_id)


def _family(practice_id: str) -> list[Patient]:
    return [
        _patient(practice_id, "H1", "Helen", "Skinner", ["+441134960500"]),
        _patient(practice_id, "H2", "Gavin", "Skinner", ["+441134960500"], date_of_birth=TODAY - timedelta(days=3300),
                 guardian_name="Mrs Helen Skinner", last_test=TODAY - timedelta(days=400)),
        _patient(practice_id, "S1", "Sam", "Okafor", ["+447700900610", "+441134960610"]),
        _patient(practice_id, "D1", "Dora", "Hale", ["+447700900620"], status=PatientStatus.DECEASED,
                 status_date=TODAY - timedelta(days=20)),
        _patient(practice_id, "N1", "Nat", "Ives", ["+447700900630"], contact=ContactPreferences(phone_recall=False)),
        _patient(practice_id, "E1", "Emma", "Ng", ["+447700900640"],
                 contact=ContactPreferences(channels=frozenset({Channel.EMAIL}))),
    ]  # fmt: skip


@pytest.fixture
def family(store: Store) -> str:
    store.add_practice("fam", "Family practice", PmsKind.CSV, {}, {})
    _sync(store, "fam", _family("fam"))
    return "fam"


def _view(store: Store, practice_id: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    view = store.call_list_view(practice_id)
    entries = {e["phone"]: [p["pms_patient_id"] for p in e["people"]] for e in view["entries"]}
    return entries, {n["pms_patient_id"]: n["reason_code"] for n in view["not_listed"]}


def test_households_children_and_every_due_patient_accounted_for(store: Store, family: str) -> None:
    view = store.call_list_view(family)
    entries, not_listed = _view(store, family)
    assert entries == {"+441134960500": ["H1", "H2"], "+447700900610": ["S1"]}
    home = next(e for e in view["entries"] if e["phone"] == "+441134960500")
    assert home["ask_for"] == "Helen Skinner"  # the mother is named; her son's guardian is the same person
    assert home["earliest_call_at"] == CallSettings().next_open(home["earliest_call_at"])
    assert not_listed == {"D1": "deceased", "N1": "do_not_call", "E1": "do_not_call"}
    due = {p.pms_patient_id for p in store.load_patients(family)}
    assert {pid for pids in entries.values() for pid in pids} | set(not_listed) == due


def test_an_objection_applies_at_once_and_survives_syncs_and_merges(store: Store, family: str) -> None:
    writeback.add_call_event(
        store, family, "call_outcome", "obj-1", "S1", "Please don't ring again", "asked_not_to_be_called"
    )
    # No rebuild: the outcome's own transaction took Sam off the list.
    entries, not_listed = _view(store, family)
    assert "+447700900610" not in entries and not_listed["S1"] == "asked_not_to_be_called"
    note = writeback.outbox_rows(store, family)[-1]
    assert note["kind"] == "call_outcome" and note["status"] == "pending"  # staff still see it in the PMS
    _sync(store, family, _family(family), full=True)  # a full reconcile
    assert _view(store, family)[1]["S1"] == "asked_not_to_be_called"
    # A duplicate record of Sam arrives and is merged into the objecting one, or the other way round:
    # the objection holds for the person, whichever record is kept.
    twin = _patient(family, "S2", "Samuel", "Okafor", ["+447700900611"])
    _sync(store, family, [*_family(family), twin])
    store.merge_patients(family, "S2", "S1", "ops")
    store.rebuild_call_list(family)
    entries, not_listed = _view(store, family)
    assert not_listed.get("S2") == "asked_not_to_be_called" and "+447700900611" not in entries


def test_lifting_an_objection_is_audited_and_applies_at_once(store: Store, family: str) -> None:
    runner = CliRunner()
    recorded = runner.invoke(
        main, ["call-outcome", "add", family, "--patient", "S1", "--outcome", "asked_not_to_be_called", "--text", "x"]
    )
    assert recorded.exit_code == 0, recorded.output
    assert _view(store, family)[1]["S1"] == "asked_not_to_be_called"
    lifted = runner.invoke(
        main, ["contact", "allow", family, "S1", "--why", "patient rang the practice to opt back in"]
    )
    assert lifted.exit_code == 0 and "Lifted asked_not_to_be_called for S1" in lifted.output
    assert "S1" in _view(store, family)[0]["+447700900610"]
    audit = store.audit_entries(family)
    assert any(
        a["action"] == "lift_contact_suppression" and a["detail"]["why"].startswith("patient rang") for a in audit
    )
    again = runner.invoke(main, ["contact", "allow", family, "S1"])
    assert again.exit_code == 1 and "no call suppression to lift" in again.output


def test_deceased_on_a_call_and_wrong_numbers(store: Store, family: str) -> None:
    writeback.add_call_event(store, family, "call_outcome", "dec-1", "H1", "Son says she died", "deceased")
    entries, not_listed = _view(store, family)
    assert not_listed["H1"] == "deceased" and entries["+441134960500"] == ["H2"]  # the boy is still due
    text_ = writeback.outbox_rows(store, family)[-1]
    assert text_["kind"] == "call_outcome"
    with store.begin(family) as conn:
        note = conn.execute(text("SELECT payload->>'text' FROM outbox WHERE idempotency_key = 'dec-1'")).scalar_one()
    assert "Please check and update the patient's record" in note
    writeback.add_call_event(store, family, "call_attempt", "wn-1", "S1", "Not Sam", "wrong_number")
    entries, _ = _view(store, family)
    assert entries.get("+441134960610") == ["S1"] and "+447700900610" not in entries  # his landline now
    writeback.add_call_event(
        store, family, "call_attempt", "wn-2", "S1", "Not Sam", "wrong_number", phone="0113 496 0610"
    )
    assert _view(store, family)[1]["S1"] == "no_callable_number"


def test_unanswered_calls_exhaust_and_snoozes_hold(store: Store, family: str) -> None:
    start = datetime.now(UTC) - timedelta(days=10)
    for i, outcome in enumerate(("no_answer", "voicemail")):
        writeback.add_call_event(
            store, family, "call_attempt", f"na-{i}", "S1", "-", outcome, start + timedelta(days=3 * i)
        )
    why = store.call_list_why(family, "S1")
    assert why["listed"] and why["earliest_call_at"] >= start + timedelta(days=5)
    writeback.add_call_event(store, family, "call_attempt", "na-2", "S1", "-", "busy", start + timedelta(days=6))
    why = store.call_list_why(family, "S1")
    assert why["reason_code"] == "attempts_exhausted" and "3 unanswered calls" in why["detail"]
    writeback.add_call_event(store, family, "call_outcome", "dcl", "H1", "Not now", "declined")
    assert _view(store, family)[1]["H1"] == "snoozed"
    assert _view(store, family)[0]["+441134960500"] == ["H2"]


def test_cli_table_json_why_and_refusals(store: Store, family: str) -> None:
    runner = CliRunner()
    table = runner.invoke(main, ["call-list", family])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0] == "2 number(s) to call for 3 due patient(s); 3 due patient(s) not listed"
    assert lines[1].split() == ["PHONE", "ASK", "FOR", "PEOPLE", "DUE", "REASON", "EARLIEST", "CALL"]
    assert "Gavin Skinner (H2)" in table.output and "Not listed:" in table.output and "Dora Hale (D1)" in table.output
    data = json.loads(runner.invoke(main, ["call-list", family, "--format", "json"]).output)
    assert set(data) == {"entries", "not_listed"}
    entry = next(e for e in data["entries"] if len(e["people"]) == 2)
    assert set(entry) == {"phone", "ask_for", "earliest_call_at", "people"}
    assert set(entry["people"][0]) == {"pms_patient_id", "first_name", "last_name", "due_date", "reason"}
    assert datetime.fromisoformat(entry["earliest_call_at"]).utcoffset() is not None
    assert {n["reason_code"] for n in data["not_listed"]} == {"deceased", "do_not_call"}
    assert all(n["detail"] for n in data["not_listed"])
    why = runner.invoke(main, ["call-list", family, "--why", "H2"])
    assert "is on the call list: +441134960500, ask for Helen Skinner" in why.output and "same call as H1" in why.output
    why = runner.invoke(main, ["call-list", family, "--why", "D1"])
    assert "is not on the call list: deceased" in why.output
    bad = runner.invoke(
        main, ["call-outcome", "add", family, "--patient", "S1", "--outcome", "moved_away", "--text", "x"]
    )
    assert bad.exit_code == 2 and "'moved_away' is not one of" in bad.output
    with pytest.raises(writeback.OutboxError, match="call outcome 'answered' is not known; use one of: booked"):
        writeback.add_call_event(store, family, "call_attempt", "k", "S1", "x", "answered")
    missing = runner.invoke(main, ["call-list", family, "--why", "NOPE"])
    assert missing.exit_code == 1 and "has no patient 'NOPE'" in missing.output


def test_the_check_finds_a_listed_patient_who_must_not_be_called(store: Store, family: str) -> None:
    assert store.call_list_violations(family) == []
    with store.begin(family) as conn:  # the PMS changed under a list not yet rebuilt
        conn.execute(text("UPDATE patients SET pms_status = 'deceased' WHERE pms_patient_id = 'S1'"))
    assert [v["pms_patient_id"] for v in store.call_list_violations(family)] == ["S1"]
    store.rebuild_call_list(family)
    assert store.call_list_violations(family) == []
    with store.begin_owner() as conn:  # each other rule, behind the list's back
        conn.execute(text("UPDATE patients SET phone_recall = false WHERE practice_id = :p AND pms_patient_id = 'H2'"),
                     {"p": family})  # fmt: skip
        conn.execute(
            text(
                "INSERT INTO patients (practice_id, pms_patient_id, first_name, last_name, active, merged_into) "
                "SELECT :p, 'H1-old', 'Helen', 'Skinner', false, patient_id FROM patients "
                "WHERE practice_id = :p AND pms_patient_id = 'H1'"
            ),
            {"p": family},
        )
        conn.execute(
            text(
                "INSERT INTO contact_suppressions (practice_id, pms_patient_id, reason) VALUES "
                "(:p, 'H1-old', 'asked_not_to_be_called'), (:p, 'H1', 'deceased'), (:p, 'nobody', 'deceased')"
            ),
            {"p": family},
        )
    found = {v["pms_patient_id"]: v for v in store.call_list_violations(family)}
    assert set(found) == {"H1", "H2"}
    assert found["H1"]["suppressed"] == "asked_not_to_be_called,deceased" and found["H2"]["phone_recall"] is False


# --- property: over any sequence of syncs and call outcomes ---------------------------------------------

_PHONES = ["+447700900701", "+447700900702", "+441134960703", "+441134960704"]
_counter = iter(range(10**6))

contact_patient_st = st.builds(
    lambda i, phones, status, recall, child, due: (i, phones, status, recall, child, due),
    i=st.integers(0, 5),
    phones=st.lists(st.sampled_from(_PHONES), max_size=2, unique=True),
    status=st.sampled_from(["active", "active", "active", "deceased", "gone_away", "inactive"]),
    recall=st.sampled_from(["yes", "yes", "no_phone", "no_recall"]),
    child=st.booleans(),
    due=st.booleans(),
)
op_st = st.one_of(
    st.tuples(st.just("sync"), st.lists(contact_patient_st, max_size=6, unique_by=lambda t: t[0]), st.booleans()),
    st.tuples(st.just("call"), st.integers(0, 5), st.sampled_from([str(o) for o in CallOutcome]),
              st.sampled_from([None, *_PHONES])),
    st.tuples(st.just("lift"), st.integers(0, 5)),
)  # fmt: skip


def _build(practice_id: str, spec: tuple) -> Patient:
    i, phones, status, recall, child, due = spec
    return _patient(
        practice_id,
        f"Q{i}",
        f"First{i}",
        "Prop",
        list(phones),
        status=PatientStatus(status),
        contact=ContactPreferences(phone_recall=recall != "no_phone", no_recall=recall == "no_recall"),
        date_of_birth=TODAY - timedelta(days=3000 if child else 15000),
        guardian_name="Pat Prop" if child else None,
        last_test=TODAY - timedelta(days=900 if due else 30),
    )


def _check_invariants(store: Store, practice_id: str, settings: CallSettings) -> None:
    now = datetime.now(UTC)
    with store.begin(practice_id) as conn:
        due = set(
            conn.execute(
                text(
                    "SELECT pt.pms_patient_id FROM recalls r JOIN patients pt USING (patient_id) "
                    "WHERE pt.active AND r.due_date <= :today"
                ),
                {"today": now.astimezone(UK_TZ).date()},
            ).scalars()
        )
        rows = conn.execute(
            text(
                "SELECT pt.pms_patient_id, pt.pms_status, pt.phone_recall, pt.no_recall, c.listed, c.phone, "
                "r.due_date FROM call_list c JOIN patients pt USING (patient_id) JOIN recalls r USING (patient_id)"
            )
        ).all()
        suppressed = set(
            conn.execute(text("SELECT pms_patient_id FROM contact_suppressions WHERE lifted_at IS NULL")).scalars()
        )
        events = conn.execute(
            text(
                "SELECT pms_patient_id, outcome, occurred_at, phone, recall_due_date FROM call_events ORDER BY event_id"
            )
        ).all()
    seen = [r.pms_patient_id for r in rows]
    assert len(seen) == len(set(seen)) and set(seen) == due  # every due patient once: listed or with a reason
    for r in rows:
        if not r.listed:
            continue
        mine = [e for e in events if e.pms_patient_id == r.pms_patient_id]
        assert r.pms_status == "active" and r.phone_recall and not r.no_recall
        assert r.pms_patient_id not in suppressed
        unanswered = [
            e for e in mine if e.outcome in ("no_answer", "voicemail", "busy") and e.recall_due_date == r.due_date
        ]
        assert len(unanswered) < settings.max_attempts
        snoozes = [e for e in mine if e.outcome in ("declined", "call_back_later")]
        if snoozes:
            last = snoozes[-1]
            hold = settings.snooze_declined if last.outcome == "declined" else settings.snooze_call_back
            assert last.occurred_at + hold <= now
        assert r.phone not in {e.phone for e in mine if e.outcome == "wrong_number"}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, min_size=1, max_size=8))
def test_no_sequence_of_syncs_and_outcomes_lists_someone_it_must_not(store: Store, ops: list[tuple]) -> None:
    practice_id = f"cprop-{next(_counter)}"
    store.add_practice(practice_id, practice_id, PmsKind.CSV, {}, {})
    known: set[int] = set()
    for op in ops:
        if op[0] == "sync":
            people = [_build(practice_id, spec) for spec in op[1]]
            known = {spec[0] for spec in op[1]}
            _sync(store, practice_id, people, full=op[2])
        elif op[0] == "call" and op[1] in known:
            writeback.add_call_event(
                store, practice_id, "call_outcome", f"k{next(_counter)}", f"Q{op[1]}", "-", op[2], phone=op[3]
            )
        elif op[0] == "lift" and op[1] in known:
            with contextlib.suppress(ValueError):  # nothing to lift
                store.lift_contact_suppression(practice_id, f"Q{op[1]}", "ops", "test")
        _check_invariants(store, practice_id, SETTINGS)


def test_erasure_removes_calls_and_suppressions(store: Store, family: str) -> None:
    from nvc_pipelines.erasure import erase_patient

    writeback.add_call_event(store, family, "call_outcome", "er-1", "S1", "No thanks", "asked_not_to_be_called")
    removed = erase_patient(store, family, "S1", "ops")
    assert removed["call_events"] == 1 and removed["contact_suppressions"] == 1
    data = store.export_practice(family)
    assert not [e for e in data["call_events"] if e["pms_patient_id"] == "S1"] and data["contact_suppressions"] == []


# --- the nightly places only what changed -------------------------------------------------------------


def _rows(store: Store, practice_id: str, read_at: datetime | None = None) -> list[tuple]:
    """The stored list; with `read_at`, each listed row's `earliest_call_at` as a reader sees it then."""
    moment = SETTINGS.read_moment(read_at) if read_at else None
    with store.begin(practice_id) as conn:
        return [
            (*r[:6], moment.callable_from(r[6]) if moment and r[3] else r[6], *r[7:])
            for r in conn.execute(
                text(
                    "SELECT patient_id, due_date, reason, listed, phone, ask_for, earliest_call_at, reason_code, detail "
                    "FROM call_list WHERE practice_id = :p ORDER BY patient_id"
                ),
                {"p": practice_id},
            )
        ]


def test_a_nightly_placing_only_what_changed_gives_the_list_a_full_build_gives(store: Store, family: str) -> None:
    """Changed rows, a booking that has started, a snooze that ran out and the clock moving on: the
    changed-only nightly ends with exactly the list a whole rebuild makes at the same moment."""
    start = datetime.now(UTC)
    assert store.update_call_list(family, settings=SETTINGS, now=start)["mode"] == "full"  # no mark yet
    writeback.add_call_event(store, family, "call_outcome", "nt-1", "S1", "-", "call_back_later")
    people = _family(family)
    people[0] = _patient(family, "H1", "Helen", "Skinner", ["+441134960500", "+447700900501"])  # a new mobile
    people[5] = _patient(family, "E1", "Emma", "Ng", ["+447700900640"])  # consents to calls now
    people.append(_patient(family, "B1", "Bea", "Ball", ["+447700900650"]))  # due, and booked in the PMS
    store.write_patients(family, "csv", ReadResult(people), None, full=True)
    rules = RecallRules.from_settings({})
    store.write_recalls(family, [r for p in store.load_patients(family) if (r := compute_recall(p, rules))])
    with store.begin_owner() as conn:
        conn.execute(
            text(
                "INSERT INTO appointments (practice_id, pms_appointment_id, pms_patient_id, starts_at, ends_at, status, "
                "appointment_type) VALUES (:p, 'A1', 'B1', :at, :end, 'booked', 'sight_test')"
            ),
            {"p": family, "at": start + timedelta(hours=1), "end": start + timedelta(hours=2)},
        )
    later = start + timedelta(days=3)  # the call-back snooze (2 days) ran out, Bea's appointment passed
    nightly = store.update_call_list(family, settings=SETTINGS, now=later)
    assert nightly["mode"] == "changed" and 0 < nightly["placed_again"] < nightly["due"] + 1
    changed_only = _rows(store, family, later)  # entries the nightly did not place keep their stored time
    whole = store.rebuild_call_list(family, now=later, settings=SETTINGS)
    assert _rows(store, family, later) == changed_only
    assert {k: v for k, v in nightly.items() if k not in ("mode", "placed_again")} == whole
    assert store.call_list_violations(family) == []


def test_a_nightly_places_again_a_child_who_turned_16_since_and_nothing_else(store: Store, family: str) -> None:
    """Nothing of the family changed since the last build but a birthday: Gavin turned 16 on the
    nightly's day, so his household is placed again and he is asked for by name."""
    with store.begin_owner() as conn:  # everything written a day ago: only the calendar moves
        conn.execute(text("UPDATE patients SET updated_at = updated_at - interval '1 day' WHERE practice_id = :p"),
                     {"p": family})  # fmt: skip
        conn.execute(text("UPDATE recalls SET computed_at = computed_at - interval '1 day' WHERE practice_id = :p"),
                     {"p": family})  # fmt: skip
    start = datetime.now(UTC)
    assert store.update_call_list(family, settings=SETTINGS, now=start)["mode"] == "full"
    later = start + timedelta(days=3)
    birthday = later.astimezone(UK_TZ).date()
    with store.begin_owner() as conn:
        conn.execute(
            text(
                "UPDATE patients SET date_of_birth = :dob, updated_at = now() - interval '1 day' "
                "WHERE practice_id = :p AND pms_patient_id = 'H2'"
            ),
            {"p": family, "dob": birthday.replace(year=birthday.year - 16)},
        )
    nightly = store.update_call_list(family, settings=SETTINGS, now=later)
    assert (nightly["mode"], nightly["placed_again"]) == ("changed", 2)  # Helen and Gavin, on one number
    home = next(e for e in store.call_list_view(family)["entries"] if e["phone"] == "+441134960500")
    assert home["ask_for"] == "Helen Skinner or Gavin Skinner"
    changed_only = _rows(store, family, later)
    store.rebuild_call_list(family, now=later, settings=SETTINGS)
    assert _rows(store, family, later) == changed_only


def test_a_nightly_after_a_merge_is_undone_places_the_kept_patient_again(store: Store, family: str) -> None:
    """Kim was entered twice (K1, K2 on one mobile); K2 has a sight test booked, so after the merge
    Kim is not listed (booked). Undoing the merge takes the booking off K1's record: the changed-only
    nightly lists K1 again, as a whole rebuild does, and keeps K2 off (booked)."""
    start = datetime.now(UTC)
    kim = [
        _patient(family, "K1", "Kim", "Lowe", ["+447700900700"]),
        _patient(family, "K2", "Kim", "Lowe", ["+447700900700"]),
    ]
    _sync(store, family, [*_family(family), *kim])
    with store.begin_owner() as conn:
        conn.execute(
            text(
                "INSERT INTO appointments (practice_id, pms_appointment_id, pms_patient_id, starts_at, ends_at, status, "
                "appointment_type) VALUES (:p, 'A9', 'K2', :at, :end, 'booked', 'sight_test')"
            ),
            {"p": family, "at": start + timedelta(days=10), "end": start + timedelta(days=10, hours=1)},
        )
    merge_id = store.merge_patients(family, "K1", "K2", actor="ops:test")
    assert store.update_call_list(family, settings=SETTINGS, now=start, full=True)["mode"] == "full"
    assert _view(store, family)[1]["K1"] == "booked"

    store.undo_merge(family, merge_id, actor="ops:test")
    later = start + timedelta(hours=1)
    nightly = store.update_call_list(family, settings=SETTINGS, now=later)
    assert nightly["mode"] == "changed"
    entries, not_listed = _view(store, family)
    assert entries["+447700900700"] == ["K1"] and not_listed["K2"] == "booked"
    changed_only = _rows(store, family, later)
    store.rebuild_call_list(family, now=later, settings=SETTINGS)
    assert _rows(store, family, later) == changed_only


def test_a_passed_call_time_is_read_as_the_next_opening_without_rewriting_the_list(store: Store, family: str) -> None:
    """The nightly no longer moves every passed `earliest_call_at` on: the stored time stays, and every
    reader (the caller's list, the dial check, `--why`) sees the next opening from the moment it reads."""
    friday_evening = uk(2026, 11, 27, 19, 0)  # after hours: placed for Monday 09:00
    store.rebuild_call_list(family, now=friday_evening, settings=SETTINGS)
    stored = {r[4]: r[6] for r in _rows(store, family) if r[3]}
    assert set(stored.values()) == {uk(2026, 11, 30, 9)}
    tuesday = uk(2026, 12, 1, 11, 30)  # open: callable since the window opened, the same all morning
    entry = store.call_list_entry(family, "+441134960500", now=tuesday)
    assert [p["earliest_call_at"] for p in entry["listed"]] == [uk(2026, 12, 1, 9)] * 2
    assert store.call_list_entry(family, "+441134960500", now=tuesday + timedelta(hours=6))["listed"] == entry["listed"]
    tuesday_night = uk(2026, 12, 1, 20, 0)  # closed: the next morning
    entry = store.call_list_entry(family, "+447700900610", now=tuesday_night)
    assert [p["earliest_call_at"] for p in entry["listed"]] == [uk(2026, 12, 2, 9)]
    sunday_before = uk(2026, 11, 29, 12, 0)  # not yet passed: the stored time
    entry = store.call_list_entry(family, "+447700900610", now=sunday_before)
    assert [p["earliest_call_at"] for p in entry["listed"]] == [uk(2026, 11, 30, 9)]
    assert {r[4]: r[6] for r in _rows(store, family) if r[3]} == stored  # reading rewrote nothing
    opened = SETTINGS.window_open(datetime.now(UTC))  # the other readers, at this moment
    view = store.call_list_view(family)
    assert [e["earliest_call_at"] for e in view["entries"]] == [opened] * 2
    assert store.call_list_why(family, "S1")["earliest_call_at"] == opened
    assert [r["earliest_call_at"] for r in store.call_list(family)] == [opened] * 3


def test_a_list_placed_a_few_people_at_a_time_is_the_list_placed_at_once(
    store: Store, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuild reads and places due people in batches (never a whole practice in memory): with
    two people a batch, a household split across batches, calls on record and a snooze, the list
    and its counts are the ones a single batch gives."""
    from nvc_pipelines.store import calls

    writeback.add_call_event(store, family, "call_outcome", "bt-1", "S1", "-", "no_answer")
    writeback.add_call_event(store, family, "call_outcome", "bt-2", "H2", "-", "call_back_later")
    now = datetime.now(UTC)
    at_once = store.rebuild_call_list(family, now=now, settings=SETTINGS)
    whole = _rows(store, family)
    monkeypatch.setattr(calls, "GATHER_BATCH", 2)
    assert store.rebuild_call_list(family, now=now, settings=SETTINGS) == at_once
    assert _rows(store, family) == whole
    assert sum(1 for row in whole if row[3]) >= 2 and store.call_list_violations(family) == []


def test_an_intraday_write_takes_the_lists_lock_before_it_writes_a_patient(store: Store, family: str) -> None:
    """An intraday read writes its patients and places their households in one transaction. It takes
    the call list's lock first, as erasure does (before it locks the patient): taken after the write,
    an erasure holding the lock and waiting for the written patient's row would deadlock with it."""
    from dataclasses import replace

    from nvc_pipelines.store.streams import PATIENTS

    sam = next(p for p in store.load_patients(family) if p.pms_patient_id == "S1")
    changed = replace(sam, last_eye_test_date=date(2024, 2, 2))
    written: dict[str, object] = {}

    def intraday_write() -> None:
        written["counts"] = store.write_stream(
            family, PATIENTS, [changed], [], source="csv", run_id=None, full=False, place_calls_at=datetime.now(UTC)
        )

    with store.begin(family) as conn:  # holding the list's lock, as an erasure does first
        calls.lock_list(conn, family)
        worker = threading.Thread(target=intraday_write, daemon=True)
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive(), "the intraday write did not wait for the list's lock"
        locked = conn.execute(  # her row is free: the write waits before touching it
            text(
                "SELECT pms_patient_id FROM patients WHERE practice_id = :p AND pms_patient_id = 'S1' FOR UPDATE NOWAIT"
            ),
            {"p": family},
        ).scalar_one()
        assert locked == "S1"
    worker.join(timeout=60)
    assert not worker.is_alive() and written["counts"].updated == 1


def test_two_builds_of_one_practices_list_at_once_both_land(store: Store, family: str) -> None:
    """A Sync Now that overlaps the nightly (or an intraday refresh) builds the list while another
    build of the same practice has not committed: the second waits for the first, then replaces the
    list whole, instead of failing on the list's key with rows the first inserted after it began."""
    before = _view(store, family)
    now = datetime.now(UTC)
    second: dict[str, object] = {}
    with store.begin(family) as conn:  # the first build, held open
        calls.rebuild(conn, family, today=TODAY, now=now, settings=SETTINGS)
        worker = threading.Thread(
            target=lambda: second.update(counts=store.rebuild_call_list(family, now=now)), daemon=True
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive(), "the second build did not wait for the first"
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert second["counts"]["people_listed"] == 3  # it landed, after the first: Helen and Gavin at home, Sam
    assert _view(store, family) == before


def test_erasing_a_patient_while_the_list_is_built_waits_for_the_build(store: Store, family: str) -> None:
    """Erasure takes the list's lock before it locks the patient, as a build takes it first: the two
    take turns (no deadlock), and the entry a build wrote for the patient is erased after the build
    commits (the list checks no key since migration 0022, so nothing else would remove it)."""
    from nvc_pipelines.erasure import erase_patient

    now = datetime.now(UTC)
    erased: dict[str, object] = {}

    def erase() -> None:
        try:
            erased["rows"] = erase_patient(store, family, "S1", "test")
        except Exception as exc:  # noqa: BLE001 - the test reports what went wrong
            erased["error"] = exc

    with store.begin(family) as conn:  # a build, as `calls.rebuild` goes: the list's rows first
        calls.lock_list(conn, family)
        conn.execute(text("DELETE FROM call_list WHERE practice_id = :p"), {"p": family})
        worker = threading.Thread(target=erase, daemon=True)
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive(), "erasure did not wait for the build"
        calls.rebuild(conn, family, today=TODAY, now=now, settings=SETTINGS)  # inserts Sam's entry again
    worker.join(timeout=60)
    assert "error" not in erased, erased.get("error")
    assert erased["rows"]["call_list"] == 1  # the build's entry for Sam, erased after it committed
    entries, not_listed = _view(store, family)
    assert entries == {"+441134960500": ["H1", "H2"]} and "S1" not in not_listed
