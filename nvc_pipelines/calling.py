"""Who may be called, on which number, whom to ask for, and when: the call list's rules.

Plain Python over plain records (the store gathers them in one query and writes the result back in
the same transaction), so the rules are testable without a database and the same code places a
whole practice at 02:00 or one household the moment a call outcome arrives.

A due patient is placed on the list only if no rule below keeps them off; the first rule that
applies is the reason they are not listed (`REASON_CODES` order):

1. the PMS says deceased (or a call reported it), gone away, or inactive;
2. they asked the AI caller not to be called (until an operator lifts it), or the practice recorded
   "no phone recall" / "no recall" / no consent to phone;
3. they are booked (an appointment in the PMS diary, a booking made on a call still on its way to
   the PMS, or a call that ended `booked` in this recall cycle, for `booked_hold_days`);
4. they declined (snoozed `snooze_declined_days`) or asked to be called back (`snooze_call_back_days`);
5. `max_attempts` unanswered calls (no answer, voicemail, busy) in this recall cycle;
6. none of their numbers is left once numbers reported wrong for them are set aside.

Everyone placed is grouped by number: one entry per number, naming each person covered, so a
family sharing a landline gets one call. A child under 16 is asked for through the guardian the PMS
names, else "parent or guardian of <first name>". `earliest_call_at` is the first moment inside the
practice's calling hours (never on a bank holiday of its nation) that is also at least
`retry_after_days` after the person's last unanswered call and not on a day the number was already
called: at most one call per number per day. With nothing holding a person back it is the opening
of the current calling window; a passed time is read as the reader's window opening (`ReadMoment`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from nvc_pipelines.model import CallOutcome
from nvc_pipelines.recall import age_on

UK_TZ = ZoneInfo("Europe/London")
REASON_CODES: tuple[str, ...] = (
    "deceased",
    "gone_away",
    "inactive",
    "asked_not_to_be_called",
    "do_not_call",
    "booked",
    "snoozed",
    "attempts_exhausted",
    "no_callable_number",
    "not_due",
)
UNANSWERED = frozenset({CallOutcome.NO_ANSWER, CallOutcome.VOICEMAIL, CallOutcome.BUSY})
SUPPRESSING = frozenset({CallOutcome.ASKED_NOT_TO_BE_CALLED, CallOutcome.DECEASED})
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# The `holidays` library's subdivisions of the United Kingdom, by the names a practice setting uses.
NATIONS: dict[str, str] = {"england": "ENG", "wales": "WLS", "scotland": "SCT", "northern_ireland": "NIR"}
CHILD_AGE = 16
SETTING_NAMES = (
    "calling_hours",
    "calling_days",
    "calling_nation",
    "retry_after_days",
    "max_attempts",
    "snooze_declined_days",
    "snooze_call_back_days",
    "booked_hold_days",
)


class CallSettingsError(ValueError):
    """A practice's calling setting is not usable (the message names it and what is allowed)."""


@dataclass(frozen=True, slots=True)
class CallSettings:
    """When and how often a practice's patients may be called (per-practice settings, UK defaults)."""

    opens: time = time(9, 0)
    closes: time = time(18, 0)
    days: frozenset[int] = frozenset(range(5))  # Monday = 0
    nation: str = "england"
    retry_after: timedelta = timedelta(days=2)
    max_attempts: int = 3
    snooze_declined: timedelta = timedelta(days=30)
    snooze_call_back: timedelta = timedelta(days=2)
    booked_hold: timedelta = timedelta(days=14)

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> CallSettings:
        defaults = cls()
        values: dict[str, Any] = {}
        if "calling_hours" in settings:
            values["opens"], values["closes"] = _hours(settings["calling_hours"])
        if "calling_days" in settings:
            values["days"] = _days(settings["calling_days"])
        if "calling_nation" in settings:
            nation = settings["calling_nation"].strip().lower().replace(" ", "_")
            if nation not in NATIONS:
                raise CallSettingsError(
                    f"calling_nation {settings['calling_nation']!r} is not known; use one of {', '.join(NATIONS)}"
                )
            values["nation"] = nation
        for key, attr, low, high in (
            ("retry_after_days", "retry_after", 0, 60),
            ("snooze_declined_days", "snooze_declined", 0, 730),
            ("snooze_call_back_days", "snooze_call_back", 0, 60),
            ("booked_hold_days", "booked_hold", 0, 90),
        ):
            if key in settings:
                values[attr] = timedelta(days=number_setting(settings, key, low, high))
        if "max_attempts" in settings:
            values["max_attempts"] = int(number_setting(settings, "max_attempts", 1, 20))
        return replace(defaults, **values)

    def is_open_day(self, day: date) -> bool:
        return day.weekday() in self.days and day not in bank_holidays(self.nation, day.year)

    def next_open(self, at: datetime) -> datetime:
        """The first moment at or after `at` inside calling hours on a calling day (UK time, aware)."""
        local = at.astimezone(UK_TZ)
        day = local.date()
        for _ in range(400):
            if self.is_open_day(day):
                opens = datetime.combine(day, self.opens, UK_TZ)
                closes = datetime.combine(day, self.closes, UK_TZ)
                if local < closes:
                    return max(local, opens)
            day += timedelta(days=1)
            local = datetime.combine(day, time(0), UK_TZ)
        raise CallSettingsError("no calling day in the next 400 days: check calling_days")

    def window_open(self, at: datetime) -> datetime:
        """The opening of the calling window `at` falls in, else of the next one: from when a person
        with nothing holding them back may be rung, as of `at` (the same all through one window)."""
        opening = self.next_open(datetime.combine(at.astimezone(UK_TZ).date(), time(0), UK_TZ))
        if opening <= at < datetime.combine(opening.date(), self.closes, UK_TZ):
            return opening
        return self.next_open(at)

    def read_moment(self, at: datetime) -> ReadMoment:
        return ReadMoment(at, self.window_open(at))


@dataclass(frozen=True, slots=True)
class ReadMoment:
    """A moment the call list is read at, with its calling window's opening (`window_open`).

    A placement stores when a person may first be rung: a time still to come (retry spacing, one call
    a number a day, calling hours), or, with nothing holding them back, the opening of the window
    they were placed in. Once a stored time has passed, what placing them again would give is the
    opening of the reader's window, so the list is read through `callable_from` rather than the
    nightly rewriting every passed time (an `UPDATE` of 100,000 rows a night at 200,000 patients)."""

    at: datetime
    opened: datetime

    def callable_from(self, stored: datetime) -> datetime:
        """The stored time while it is still to come, else the opening of this moment's window."""
        return stored if stored > self.at else self.opened


def _hours(raw: str) -> tuple[time, time]:
    try:
        start, end = (time.fromisoformat(part.strip()) for part in raw.split("-"))
    except ValueError:
        raise CallSettingsError(f"calling_hours {raw!r} is not HH:MM-HH:MM (e.g. 09:00-18:00)") from None
    if end <= start:
        raise CallSettingsError(f"calling_hours {raw!r} close before they open")
    return start, end


def _days(raw: str) -> frozenset[int]:
    days: set[int] = set()
    for part in raw.lower().replace(" ", "").split(","):
        ends = part.split("-")
        if not part or len(ends) > 2 or any(e[:3] not in _DAYS for e in ends):
            raise CallSettingsError(f"calling_days {raw!r} is not like mon-fri or mon,wed,fri")
        first, last = _DAYS.index(ends[0][:3]), _DAYS.index(ends[-1][:3])
        days.update(range(first, last + 1) if first <= last else [*range(first, 7), *range(0, last + 1)])
    return frozenset(days)


def number_setting(settings: Mapping[str, str], key: str, low: float, high: float) -> float:
    """A practice's numeric setting, refused with a message naming it when it is not a number in range."""
    try:
        value = float(settings[key])
    except ValueError:
        raise CallSettingsError(f"{key} {settings[key]!r} is not a number") from None
    if not low <= value <= high:
        raise CallSettingsError(f"{key} {settings[key]!r} must be between {low:g} and {high:g}")
    return value


@cache
def bank_holidays(nation: str, year: int) -> frozenset[date]:
    """The nation's bank holidays (from the maintained `holidays` library, substitute days included)."""
    import holidays

    return frozenset(holidays.country_holidays("GB", subdiv=NATIONS[nation], years=year))


@dataclass(slots=True)
class CallEvent:
    """A call attempt or outcome the calling system reported, as the rules need it."""

    outcome: CallOutcome
    occurred_at: datetime
    phone: str | None = None
    recall_due_date: date | None = None  # the recall cycle the call was made for


@dataclass(slots=True)
class DuePerson:
    """A due patient with everything the rules read (the store gathers these in one query)."""

    patient_id: int
    pms_patient_id: str
    first_name: str
    last_name: str
    date_of_birth: date | None
    due_date: date
    reason: str  # why the recall is due (the recall's reason)
    phones: Sequence[str]  # E.164, mobiles first; numbers of records merged into this one follow
    status: str = "active"
    status_date: date | None = None
    phone_recall: bool = True
    no_recall: bool = False
    channels: Sequence[str] | None = None
    guardian_name: str | None = None
    booked: bool = False  # a future appointment in the PMS or a booking on its way there
    suppressed: str | None = None  # an open suppression from a call: asked_not_to_be_called / deceased
    events: list[CallEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one due person ends up: on the entry of `phone`, or not listed with a reason."""

    patient_id: int
    listed: bool
    phone: str | None = None
    ask_for: str | None = None
    earliest_call_at: datetime | None = None
    reason_code: str | None = None
    detail: str | None = None


def ask_for(person: DuePerson, today: date) -> str:
    """Whom the caller asks for: the person, or for a child under 16 their guardian."""
    if person.date_of_birth is not None and age_on(person.date_of_birth, today) < CHILD_AGE:
        return person.guardian_name or f"parent or guardian of {person.first_name}"
    return " ".join(part for part in (person.first_name, person.last_name) if part)


def _local_day(at: datetime) -> date:
    return at.astimezone(UK_TZ).date()


def _day(at: datetime) -> str:
    return at.astimezone(UK_TZ).strftime("%a %d %b %Y")


def _not_listed(person: DuePerson, settings: CallSettings, now: datetime) -> tuple[str, str] | None:
    """The first rule that keeps `person` off the list, as (reason code, detail); None if none does."""
    if person.status == "deceased" or person.suppressed == "deceased":
        when = f" (died {person.status_date.isoformat()})" if person.status_date else ""
        source = "a call reported it" if person.status != "deceased" else "the PMS record says so"
        return "deceased", f"deceased{when}: {source}"
    if person.status == "gone_away":
        return "gone_away", "the PMS marks them gone away (moved, post returned)"
    if person.status == "inactive":
        return "inactive", "the PMS marks the record inactive (archived or left the practice)"
    if person.suppressed == "asked_not_to_be_called":
        return "asked_not_to_be_called", "asked on a call not to be called; an operator can lift it (nvc contact allow)"
    if not person.phone_recall:
        return "do_not_call", "the practice recorded: no phone calls about recalls"
    if person.no_recall:
        return "do_not_call", "the practice recorded: no recall by any channel"
    if person.channels is not None and "phone" not in person.channels:
        consented = ", ".join(sorted(person.channels)) or "none"
        return "do_not_call", f"no consent to be phoned (consented: {consented})"
    cycle = [e for e in person.events if e.recall_due_date == person.due_date]
    if person.booked:
        return "booked", "has an appointment booked (in the PMS, or booked on a call and on its way to the PMS)"
    booked = [e for e in cycle if e.outcome == CallOutcome.BOOKED and e.occurred_at + settings.booked_hold > now]
    if booked:
        until = max(e.occurred_at for e in booked) + settings.booked_hold
        return "booked", f"booked on a call; held off until the booking shows in the PMS (at most until {_day(until)})"
    snoozes = [
        (
            e.occurred_at
            + (settings.snooze_declined if e.outcome == CallOutcome.DECLINED else settings.snooze_call_back),
            e,
        )
        for e in person.events
        if e.outcome in (CallOutcome.DECLINED, CallOutcome.CALL_BACK_LATER)
    ]
    if snoozes:
        until, event = max(snoozes, key=lambda s: s[1].occurred_at)
        if until > now:
            said = "declined" if event.outcome == CallOutcome.DECLINED else "asked to be called back later"
            return "snoozed", f"{said} on {_day(event.occurred_at)}; not called again before {_day(until)}"
    unanswered = [e for e in cycle if e.outcome in UNANSWERED]
    if len(unanswered) >= settings.max_attempts:
        return (
            "attempts_exhausted",
            f"{len(unanswered)} unanswered calls for this recall (the limit is {settings.max_attempts})",
        )
    if not (_callable_phones(person) if person.events else person.phones):
        if person.phones:
            return "no_callable_number", "every number on record was reported as a wrong number"
        return "no_callable_number", "no valid UK phone number on record"
    return None


def _callable_phones(person: DuePerson) -> list[str]:
    wrong = {e.phone for e in person.events if e.outcome == CallOutcome.WRONG_NUMBER and e.phone}
    return [p for p in dict.fromkeys(person.phones) if p not in wrong]


def place(
    people: Iterable[DuePerson],
    last_call_by_phone: Mapping[str, datetime],
    settings: CallSettings,
    now: datetime,
) -> list[Placement]:
    """Place each due person: listed on one number with whom to ask for and when, or not listed
    with the reason. A person's placement depends only on their own record, their calls and the
    last call on their number, so placing one household again gives what placing all would."""
    today = _local_day(now)
    out: list[Placement] = []
    opens: dict[datetime, datetime] = {}  # most people share one earliest moment: place it once
    for person in people:
        kept_off = _not_listed(person, settings, now)
        if kept_off is not None:
            out.append(Placement(person.patient_id, False, reason_code=kept_off[0], detail=kept_off[1]))
            continue
        phone = (_callable_phones(person) if person.events else person.phones)[0]
        earliest = now
        unanswered = [e.occurred_at for e in person.events if e.outcome in UNANSWERED]
        if unanswered:
            earliest = max(earliest, max(unanswered) + settings.retry_after)
        last_call = last_call_by_phone.get(phone)
        if last_call is not None and _local_day(last_call) >= _local_day(earliest):
            earliest = datetime.combine(_local_day(last_call) + timedelta(days=1), time(0), UK_TZ)
        out.append(
            Placement(
                person.patient_id,
                True,
                phone=phone,
                ask_for=ask_for(person, today),
                earliest_call_at=opens.get(earliest)
                or opens.setdefault(earliest, _first_call(settings, earliest, now)),
            )
        )
    return out


def _first_call(settings: CallSettings, earliest: datetime, now: datetime) -> datetime:
    """When a placed person may first be rung: nothing holding them back (`earliest` is `now`), the
    opening of the current calling window (the next one outside hours), as `ReadMoment` reads a
    passed time; else the first opening from `earliest`."""
    return settings.window_open(now) if earliest <= now else settings.next_open(earliest)


def entry_ask_for(people: Sequence[Mapping[str, Any]]) -> str:
    """Whom to ask for on one entry: each adult by name, then any child's guardian not already named."""
    names: list[str] = []
    for person in people:
        wanted = person["ask_for"]
        if wanted and not any(wanted.casefold() in n.casefold() or n.casefold() in wanted.casefold() for n in names):
            names.append(wanted)
    return " or ".join(names)
