"""Fresh before every call: what the practice changed today reaches the call list within minutes.

During a practice's calling hours a light read takes what changed in its PMS since the cursors the
nightly sync left (patients, for status and contact preferences, and the diary, for bookings made at
the desk or online): never a full read. Each stream is merged with its cursor, and the households of
the patients read are placed on the list again, in one transaction per stream. Just before dialling,
the calling system can ask `check_before_dial`: it re-reads the PMS when the last read is older
than a few minutes and answers `call` or `skip` with the reason; a PMS it cannot reach is a `skip`
(never call on stale data), counted as a miss.

The PMS client is passed in (anything with the `read_patients` / `read_appointments` of
`resources.protocol.PmsClient`), so this service knows no PMS and no orchestrator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from nvc_pipelines.calling import UK_TZ, CallSettings, number_setting
from nvc_pipelines.erasure import Suppressions, drop_erased, load_suppressions
from nvc_pipelines.model import PmsKind, Practice, RejectedRow
from nvc_pipelines.normalise import InvalidValue, normalise_phone
from nvc_pipelines.store.streams import APPOINTMENTS, PATIENTS, StreamSpec
from nvc_pipelines.sync import CURSOR_OVERLAP

if TYPE_CHECKING:
    from nvc_pipelines.store import Store, WriteCounts

DEFAULT_EVERY = timedelta(minutes=15)
DEFAULT_CHECK_MAX_AGE = timedelta(minutes=5)
SETTING_NAMES = ("intraday_every_minutes", "check_max_age_minutes")


class NotYetSynced(RuntimeError):
    """The practice has had no full sync yet: there is no cursor to read from, and an intraday read
    never reads everything."""


class Reader(Protocol):
    def read_patients(self, since: datetime | None, today: Any) -> Any: ...

    def read_appointments(self, since: datetime | None) -> Any: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Refresh:
    """What one intraday read did."""

    practice_id: str
    read: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    since: dict[str, datetime] = field(default_factory=dict)
    at: datetime | None = None


def every(settings: Mapping[str, str]) -> timedelta:
    """`intraday_every_minutes` (default 15, 5-240): how often a practice's list is brought up to date."""
    return timedelta(minutes=_minutes(settings, "intraday_every_minutes", DEFAULT_EVERY, 5, 240))


def check_max_age(settings: Mapping[str, str]) -> timedelta:
    """`check_max_age_minutes` (default 5, 1-60): how old a read may be when the caller checks a number."""
    return timedelta(minutes=_minutes(settings, "check_max_age_minutes", DEFAULT_CHECK_MAX_AGE, 1, 60))


def _minutes(settings: Mapping[str, str], key: str, default: timedelta, low: float, high: float) -> float:
    if key not in settings:
        return default.total_seconds() / 60
    return number_setting(settings, key, low, high)


def supports_intraday(practice: Practice) -> bool:
    """A CSV drop has no change feed to poll: it is read in full (a page at a time) when a new file arrives."""
    return practice.pms_kind != PmsKind.CSV and practice.status == "connected"


def due(practice: Practice, state: Mapping[str, Any], now: datetime) -> bool:
    """Whether the practice's list should be refreshed now: inside its calling hours, and its last
    intraday attempt older than its interval (a failed one is retried at the same pace)."""
    if not supports_intraday(practice):
        return False
    if CallSettings.from_settings(practice.settings).next_open(now) != now.astimezone(UK_TZ):
        return False  # outside calling hours: nobody is being called
    last = state.get("attempted_at")
    return last is None or now - last >= every(practice.settings) - timedelta(seconds=30)


def refresh(
    store: Store, practice: Practice, client: Reader, *, now: datetime | None = None, run_id: str | None = None
) -> Refresh:
    """Read what changed since the cursors (patients and appointments) and write it, placing the
    households read on the call list again in the same transactions. Raises `NotYetSynced` before
    the first full sync; a PMS failure propagates (the caller marks the list stale)."""
    now = now or datetime.now(UTC)
    practice_id = practice.practice_id
    result = Refresh(practice_id, at=now)
    for spec in (PATIENTS, APPOINTMENTS):
        state = store.stream_state(practice_id, spec.name)
        if state.cursor_at is None or state.last_full_sync_at is None:
            raise NotYetSynced(
                f"practice {practice_id} has not had its first full sync of {spec.name}; the intraday read only "
                "reads changes (run `nvc sync` first)"
            )
        since = state.cursor_at - CURSOR_OVERLAP
        if spec is PATIENTS:
            read = client.read_patients(since, now.astimezone(UK_TZ).date())
            records, rejected = list(read.patients), list(read.rejected)
        else:
            batch = client.read_appointments(since)
            records, rejected = list(batch.records), list(batch.rejected)
        records, rejected, counts = _write_changes(store, practice, spec, records, rejected, since, now, run_id)
        result.read[spec.name] = len(records) + len(rejected)
        result.changed[spec.name] = counts.inserted + counts.updated
        result.since[spec.name] = since
    store.mark_call_list_refreshed(practice_id, now, ok=True)
    return result


def _write_changes(
    store: Store,
    practice: Practice,
    spec: StreamSpec,
    records: list[Any],
    rejected: list[RejectedRow],
    since: datetime,
    now: datetime,
    run_id: str | None,
) -> tuple[list[Any], list[RejectedRow], WriteCounts]:
    """Leave the erased out of one intraday read and write it, placing its households; returns what
    was written. Who is erased is looked up once the write holds its lock on erasures
    (`Store.write_stream_pages` asks for the page inside its transaction), so no erasure can land
    between the look and the commit."""
    practice_id = practice.practice_id
    looked: list[Suppressions] = []
    written: list[Any] = [records, rejected]

    def page() -> Iterator[tuple[list[Any], list[RejectedRow]]]:
        suppressions = load_suppressions(store, practice_id)
        looked.append(suppressions)
        kept_rejected = list(rejected)
        kept, _ = drop_erased(
            store, practice_id, records, patients=spec is PATIENTS, rejected=kept_rejected, suppressions=suppressions
        )
        written[:] = [kept, kept_rejected]
        yield kept, kept_rejected

    counts = store.write_stream_pages(
        practice_id,
        spec,
        page(),
        source=f"{practice.pms_kind}:intraday",
        source_ref=f"changes since {since.isoformat()}",
        run_id=run_id,
        full=False,
        left_out=lambda: looked[0].hashes,
        place_calls=({r.pms_patient_id for r in records}, now),
    )
    return written[0], written[1], counts


@dataclass(frozen=True, slots=True)
class DialCheck:
    """The answer to "may I dial this number now?"."""

    answer: str  # "call" or "skip"
    reason: str
    phone: str
    people: tuple[str, ...] = ()  # PMS ids of those the call is about
    refreshed_at: datetime | None = None
    stale: bool = False


def check_before_dial(
    store: Store,
    practice: Practice,
    phone: str,
    open_client: Callable[[], Reader],
    error_types: tuple[type[BaseException], ...],
    *,
    now: datetime | None = None,
) -> DialCheck:
    """Answer `call` or `skip` for one number, on data no older than the practice's
    `check_max_age_minutes`: older, the PMS is read again first (what changed since the cursor);
    unreachable, the answer is `skip`, with the reason, and the miss is counted."""
    now = now or datetime.now(UTC)
    try:
        number = normalise_phone(phone).e164
    except InvalidValue as exc:
        raise ValueError(str(exc)) from None
    practice_id = practice.practice_id
    state = store.call_list_state(practice_id)
    refreshed = state.get("refreshed_at")
    if refreshed is None or now - refreshed > check_max_age(practice.settings) or not state.get("ok", True):
        caught: tuple[type[BaseException], ...] = (*error_types, NotYetSynced)
        try:
            client = open_client()
            try:
                refresh(store, practice, client, now=now)
            finally:
                client.close()
        except caught as exc:
            reason = str(exc)
            store.mark_call_list_refreshed(practice_id, now, ok=False, error=reason)
            store.call_list_entry(practice_id, number, miss=True)
            age = f"last read {refreshed.isoformat()}" if refreshed else "never read during the day"
            return DialCheck(
                "skip", f"the PMS could not be read just now ({reason}); {age}: not calling on stale data", number,
                refreshed_at=refreshed, stale=True,
            )  # fmt: skip
        refreshed = now
    found = store.call_list_entry(practice_id, number, miss=False, now=now)
    if found["listed"]:
        people = tuple(p["pms_patient_id"] for p in found["listed"])
        earliest = max(p["earliest_call_at"] for p in found["listed"])
        if earliest > now:
            when = earliest.astimezone(UK_TZ).strftime("%a %d %b %H:%M")
            return DialCheck("skip", f"not before {when} (calling hours, retry spacing, once a day)", number, people,
                             refreshed)  # fmt: skip
        return DialCheck("call", f"due: {', '.join(people)}", number, people, refreshed)
    if found["not_listed"]:
        reasons = "; ".join(f"{p['pms_patient_id']}: {p['reason_code']} ({p['detail']})" for p in found["not_listed"])
        people = tuple(p["pms_patient_id"] for p in found["not_listed"])
        return DialCheck("skip", f"nobody on this number may be called now: {reasons}", number, people, refreshed)
    return DialCheck("skip", "no due patient has this number", number, (), refreshed)
