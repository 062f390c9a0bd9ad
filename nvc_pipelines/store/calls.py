"""The call list's tables: due people gathered in one query, placed by `nvc_pipelines.calling`, and
written back in the caller's transaction; call events, and suppressions an operator can lift.

Everything here runs inside a transaction scoped to one practice (`Store.begin(practice_id)`), so
row-level security applies, and an outcome, its suppression and the call list it changes commit
together: the list is never seen without the outcome's effect.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.calling import (
    REASON_CODES,
    SUPPRESSING,
    UK_TZ,
    CallEvent,
    CallSettings,
    DuePerson,
    Placement,
    entry_ask_for,
    place,
)
from nvc_pipelines.model import CallOutcome
from nvc_pipelines.store.db import driver

# The due people of a practice (or of a scope: patients by id, or anyone on given numbers), with the
# references and phones of records merged into them. Whether each is booked or suppressed is added
# in separate steps against an indexed, analysed table of their references: a practice's rows that
# were just bulk-loaded have no statistics yet, and one big statement then got a plan that ran for
# minutes at 200,000 patients; each step here is a plain join the planner cannot get wrong.
_GATHER = """
CREATE TEMP TABLE due_people ON COMMIT DROP AS
SELECT pt.patient_id, pt.pms_patient_id, pt.first_name, pt.last_name, pt.date_of_birth, pt.pms_status,
    pt.status_date, pt.phone_recall, pt.no_recall, pt.contact_channels, pt.guardian_name, r.due_date, r.reason,
    pt.phones || COALESCE((SELECT array_agg(ph) FROM patients m, unnest(m.phones) ph
        WHERE m.merged_into = pt.patient_id), '{}') AS phones,
    ARRAY[pt.pms_patient_id] || COALESCE((SELECT array_agg(m.pms_patient_id) FROM patients m
        WHERE m.merged_into = pt.patient_id), '{}') AS refs,
    false AS booked, CAST(NULL AS text) AS suppressed
FROM recalls r JOIN patients pt ON pt.patient_id = r.patient_id
WHERE r.practice_id = :p AND pt.practice_id = :p AND pt.active AND r.due_date <= :today {scope}
"""
# The references are rows, so "booked" and "suppressed" are plain equality joins that use the
# indexes: `= ANY(array)` is not leakproof, so under row-level security it scanned every row.
_REFS = [
    "CREATE TEMP TABLE due_refs ON COMMIT DROP AS "
    "SELECT d.patient_id, u.ref FROM due_people d CROSS JOIN LATERAL unnest(d.refs) AS u(ref)",
    "CREATE INDEX ON due_refs (ref)",
    "CREATE INDEX ON due_refs (patient_id)",
    "ANALYZE due_refs",
]
_BOOKED = """
UPDATE due_people d SET booked = true FROM (
    SELECT r.patient_id FROM due_refs r JOIN appointments a ON a.practice_id = :p AND a.pms_patient_id = r.ref
    WHERE a.active AND a.status = 'booked' AND a.starts_at > :now
    UNION
    SELECT r.patient_id FROM due_refs r JOIN outbox o ON o.practice_id = :p AND o.pms_patient_id = r.ref
    WHERE o.kind = 'booking' AND o.status IN ('pending', 'sent', 'confirmed')
        AND (o.payload->>'starts_at')::timestamptz > :now
) b WHERE d.patient_id = b.patient_id
"""
_SUPPRESSED = """
UPDATE due_people d SET suppressed = s.reason FROM (
    SELECT r.patient_id, CASE WHEN bool_or(c.reason = 'deceased') THEN 'deceased' ELSE min(c.reason) END AS reason
    FROM due_refs r JOIN contact_suppressions c ON c.practice_id = :p AND c.pms_patient_id = r.ref
    WHERE c.lifted_at IS NULL GROUP BY r.patient_id
) s WHERE d.patient_id = s.patient_id
"""
# A scope is the patients by id and anyone on its numbers (a merged-away record on one of them brings
# in the patient it was merged into). The numbers are matched by joining each patient's unnested
# phones to them, a hash join: `phones && :phones` was a linear search of thousands of numbers for
# every patient of the practice, and cannot use an index under row-level security.
_SCOPE_IDS = """
CREATE TEMP TABLE scope_ids ON COMMIT DROP AS
SELECT DISTINCT id AS patient_id FROM (
    SELECT unnest(CAST(:ids AS bigint[])) AS id
    UNION ALL
    SELECT unnest(ARRAY[pt.patient_id, pt.merged_into]) FROM patients pt
        CROSS JOIN LATERAL unnest(pt.phones) AS ph(phone)
        JOIN unnest(CAST(:phones AS text[])) AS s(phone) ON s.phone = ph.phone
    WHERE pt.practice_id = :p
) found WHERE id IS NOT NULL
"""
_SCOPE = " AND pt.patient_id IN (SELECT patient_id FROM scope_ids)"


GATHER_BATCH = 5000  # due people placed and written at a time


def _gather(conn: Connection, practice_id: str, today: date, now: datetime, scope: Scope | None) -> None:
    """Fill the `due_people` and `due_refs` temp tables: who is due, booked, or suppressed."""
    conn.execute(text("DROP TABLE IF EXISTS due_people, due_refs, scope_ids"))
    if scope:
        conn.execute(
            text(_SCOPE_IDS), {"p": practice_id, "ids": sorted(scope.patient_ids), "phones": sorted(scope.phones)}
        )
        conn.execute(text("ANALYZE scope_ids"))
    conn.execute(
        text(_GATHER.replace("{scope}", _SCOPE if scope else "")), {"p": practice_id, "today": today, "now": now}
    )
    conn.execute(text("CREATE UNIQUE INDEX ON due_people (patient_id)"))
    conn.execute(text("ANALYZE due_people"))  # a temp table has no statistics: the joins below need them
    for statement in _REFS:
        conn.execute(text(statement))
    conn.execute(text(_BOOKED), {"p": practice_id, "now": now})
    conn.execute(text(_SUPPRESSED), {"p": practice_id})


def _due_batches(conn: Connection, practice_id: str, size: int) -> Iterator[list[DuePerson]]:
    """The gathered due people, `size` at a time in patient order, each with their call events: a
    person's placement needs only their own record and calls, so a practice is placed a batch at a
    time and never held whole."""
    after = 0
    while True:
        rows = conn.execute(
            text("SELECT * FROM due_people WHERE patient_id > :after ORDER BY patient_id LIMIT :n"),
            {"after": after, "n": size},
        ).all()
        if not rows:
            return
        after = rows[-1].patient_id
        people = {
            r.patient_id: DuePerson(
                patient_id=r.patient_id,
                pms_patient_id=r.pms_patient_id,
                first_name=r.first_name,
                last_name=r.last_name,
                date_of_birth=r.date_of_birth,
                due_date=r.due_date,
                reason=r.reason,
                phones=list(r.phones),
                status=r.pms_status,
                status_date=r.status_date,
                phone_recall=r.phone_recall,
                no_recall=r.no_recall,
                channels=None if r.contact_channels is None else list(r.contact_channels),
                guardian_name=r.guardian_name,
                booked=r.booked,
                suppressed=r.suppressed,
            )
            for r in rows
        }
        events = conn.execute(
            text(
                "SELECT r.patient_id, e.outcome, e.occurred_at, e.phone, e.recall_due_date FROM due_refs r "
                "JOIN call_events e ON e.practice_id = :p AND e.pms_patient_id = r.ref "
                "WHERE r.patient_id > :first AND r.patient_id <= :last ORDER BY e.occurred_at"
            ),
            {"p": practice_id, "first": rows[0].patient_id - 1, "last": after},
        )
        for r in events:
            people[r.patient_id].events.append(
                CallEvent(CallOutcome(r.outcome), r.occurred_at, r.phone, r.recall_due_date)
            )
        yield list(people.values())


class Scope:
    """Part of a practice's list to place again: these patients, and everyone on these numbers."""

    def __init__(self, patient_ids: Collection[int] = (), phones: Collection[str] = ()):
        self.patient_ids = set(patient_ids)
        self.phones = set(phones)

    def __bool__(self) -> bool:
        return bool(self.patient_ids or self.phones)


def practice_call_settings(conn: Connection, practice_id: str) -> CallSettings:
    settings = conn.execute(
        text("SELECT settings FROM practices WHERE practice_id = :p"), {"p": practice_id}
    ).scalar_one()
    return CallSettings.from_settings(settings or {})


def rebuild(
    conn: Connection,
    practice_id: str,
    *,
    today: date,
    now: datetime,
    settings: CallSettings,
    scope: Scope | None = None,
) -> dict[str, Any]:
    """Place the practice's due people again (all of them, or those in `scope`) and replace their
    rows of the call list; returns counts by reason (for the whole practice)."""
    _gather(conn, practice_id, today, now, scope)
    if scope is None:
        conn.execute(text("DELETE FROM call_list WHERE practice_id = :p"), {"p": practice_id})
    else:
        conn.execute(
            text(
                "DELETE FROM call_list WHERE practice_id = :p AND (patient_id = ANY(:ids) "
                "OR patient_id IN (SELECT patient_id FROM due_people) OR (listed AND phone = ANY(:phones)))"
            ),
            {"p": practice_id, "ids": sorted(scope.patient_ids), "phones": sorted(scope.phones)},
        )
    for people in _due_batches(conn, practice_id, GATHER_BATCH):
        numbers = sorted({p for person in people for p in person.phones})
        last_calls: dict[str, datetime] = dict(
            conn.execute(
                text(
                    "SELECT phone, max(occurred_at) FROM call_events WHERE practice_id = :p AND phone = ANY(:phones) "
                    "AND occurred_at > :since GROUP BY phone"
                ),
                {"p": practice_id, "phones": numbers, "since": now - timedelta(days=2)},
            ).all()
        )
        _write(conn, practice_id, place(people, last_calls, settings, now), {p.patient_id: p for p in people})
    return counts(conn, practice_id)


# --- the nightly: only what changed since the list was last built --------------------------------

# A row carries its writer's transaction start as `updated_at` (`now()`), so a mark is the start of
# the oldest transaction still open when the mark is taken (`safe_mark`): a row it has not seen yet
# cannot be older. The app writes through one login, whose sessions it can see. Both times come from
# the database's one clock; the millisecond only makes the oldest open transaction's own rows (stamped
# exactly the mark) count, as `updated_at > mark - margin`. (A whole second made every row of a sync
# count as changed when its checks ran within a second of its writes.)
CHANGE_MARGIN = timedelta(milliseconds=1)
_SAFE_MARK = (
    "SELECT LEAST(now(), (SELECT min(xact_start) FROM pg_stat_activity WHERE datname = current_database() "
    "AND xact_start IS NOT NULL))"
)


def safe_mark(conn: Connection) -> datetime:
    """The database time before which every row written by a transaction not yet committed started."""
    mark: datetime = conn.execute(text(_SAFE_MARK)).scalar_one()
    return mark


# Bump when the placing rules change in a way that must place everyone again.
RULES_VERSION = "1"
MARK = "call_list"  # the row of `sync_cursors` that says when (and with which settings) the list was built


def settings_fingerprint(settings: CallSettings) -> str:
    return hashlib.sha1(f"{RULES_VERSION}:{settings!r}".encode()).hexdigest()[:16]


def _changed_ids(conn: Connection, practice_id: str, *, since: datetime, last_today: date, today: date,
                 now: datetime, settings: CallSettings) -> set[int]:  # fmt: skip
    """The (kept) patients whose placement may differ from the last build's: their row, recall,
    appointments or outbox bookings changed since; they became due, or turned 16 (whom to ask for);
    a booking of theirs started, or a hold or snooze from a call ran out, since."""
    p = {"p": practice_id, "since": since, "last_today": last_today, "today": today, "now": now}
    refs: set[str] = set()
    refs.update(
        conn.execute(
            text(
                "SELECT DISTINCT pms_patient_id FROM appointments WHERE practice_id = :p AND (updated_at > :since "
                "OR (active AND status = 'booked' AND starts_at > :since AND starts_at <= :now))"
            ),
            p,
        ).scalars()
    )
    refs.update(
        conn.execute(
            text(
                "SELECT DISTINCT pms_patient_id FROM outbox WHERE practice_id = :p AND kind = 'booking' AND "
                "(updated_at > :since OR finished_at > :since OR ((payload->>'starts_at')::timestamptz > :since "
                "AND (payload->>'starts_at')::timestamptz <= :now))"
            ),
            p,
        ).scalars()
    )
    refs.update(
        conn.execute(
            text(
                "SELECT DISTINCT pms_patient_id FROM call_events WHERE practice_id = :p AND ("
                "(outcome = 'booked' AND occurred_at + make_interval(secs => :hold) BETWEEN :since AND :now) OR "
                "(outcome = 'declined' AND occurred_at + make_interval(secs => :declined) BETWEEN :since AND :now) OR "
                "(outcome = 'call_back_later' AND occurred_at + make_interval(secs => :back) BETWEEN :since AND :now))"
            ),
            p
            | {
                "hold": settings.booked_hold.total_seconds(),
                "declined": settings.snooze_declined.total_seconds(),
                "back": settings.snooze_call_back.total_seconds(),
            },
        ).scalars()
    )
    ids = set(
        conn.execute(
            text(
                "SELECT DISTINCT COALESCE(pt.merged_into, pt.patient_id) FROM patients pt WHERE pt.practice_id = :p "
                "AND (pt.updated_at > :since OR (pt.date_of_birth IS NOT NULL "
                "AND CAST(pt.date_of_birth + interval '16 years' AS date) > :last_today "
                "AND CAST(pt.date_of_birth + interval '16 years' AS date) <= :today))"
            ),
            p,
        ).scalars()
    )
    ids.update(
        conn.execute(
            text(
                "SELECT patient_id FROM recalls WHERE practice_id = :p AND (computed_at > :since "
                "OR (due_date > :last_today AND due_date <= :today))"
            ),
            p,
        ).scalars()
    )
    if refs:
        ids.update(
            conn.execute(
                text(
                    "SELECT DISTINCT COALESCE(pt.merged_into, pt.patient_id) FROM patients pt "
                    "WHERE pt.practice_id = :p AND pt.pms_patient_id = ANY(:refs)"
                ),
                {"p": practice_id, "refs": sorted(refs)},
            ).scalars()
        )
    return ids


def update(
    conn: Connection, practice_id: str, *, now: datetime, settings: CallSettings, full: bool = False
) -> dict[str, Any]:
    """The nightly's call list: placed whole the first time, when the practice's calling settings or
    the rules changed, or when asked (`full`); otherwise only the households of the patients whose
    placement may have changed since the last build (`_changed_ids`), and every other listed entry's
    `earliest_call_at` moved to the next opening when it has passed (nothing else in a placement
    depends on the clock). Returns `counts` (whole practice) with the mode and how many were placed.

    The build's mark is written in the same transaction as the list, so a killed build is redone."""
    today = now.astimezone(UK_TZ).date()
    fingerprint = settings_fingerprint(settings)
    built_at = safe_mark(conn)
    mark = conn.execute(
        text("SELECT cursor_at, fingerprint FROM sync_cursors WHERE practice_id = :p AND stream = :s"),
        {"p": practice_id, "s": MARK},
    ).one_or_none()
    if full or mark is None or mark.cursor_at is None or mark.fingerprint != fingerprint:
        out = rebuild(conn, practice_id, today=today, now=now, settings=settings)
        out |= {"mode": "full", "placed_again": out["due"]}
    else:
        since = mark.cursor_at - CHANGE_MARGIN
        ids = _changed_ids(
            conn, practice_id, since=since, last_today=since.astimezone(UK_TZ).date(), today=today,
            now=now, settings=settings,
        )  # fmt: skip
        phones = conn.execute(
            text(
                "SELECT DISTINCT ph FROM patients pt CROSS JOIN LATERAL unnest(pt.phones) ph "
                "WHERE pt.practice_id = :p AND (pt.patient_id = ANY(:ids) OR pt.merged_into = ANY(:ids))"
            ),
            {"p": practice_id, "ids": sorted(ids)},
        ).scalars()
        scope = Scope(ids, set(phones))
        rebuilt = rebuild(conn, practice_id, today=today, now=now, settings=settings, scope=scope) if scope else None
        placed = conn.execute(text("SELECT count(*) FROM due_people")).scalar_one() if scope else 0
        conn.execute(
            text(
                "UPDATE call_list SET earliest_call_at = :open WHERE practice_id = :p AND listed "
                "AND earliest_call_at < :now"
            ),
            {"p": practice_id, "now": now, "open": settings.next_open(now)},
        )
        out = (rebuilt or counts(conn, practice_id)) | {"mode": "changed", "placed_again": placed}
    conn.execute(
        text(
            "INSERT INTO sync_cursors (practice_id, stream, cursor_at, last_full_sync_at, fingerprint) "
            "VALUES (:p, :s, :at, CASE WHEN :full THEN CAST(:at AS timestamptz) END, :fp) "
            "ON CONFLICT (practice_id, stream) DO UPDATE SET cursor_at = EXCLUDED.cursor_at, "
            "last_full_sync_at = COALESCE(EXCLUDED.last_full_sync_at, sync_cursors.last_full_sync_at), "
            "fingerprint = EXCLUDED.fingerprint, last_sync_at = now()"
        ),
        {"p": practice_id, "s": MARK, "at": built_at, "full": out["mode"] == "full", "fp": fingerprint},
    )
    return out


def _write(conn: Connection, practice_id: str, placements: Sequence[Placement], by_id: dict[int, DuePerson]) -> None:
    if not placements:
        return
    with driver(conn).cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS stage_call_list")
        cur.execute(
            "CREATE TEMP TABLE stage_call_list (patient_id bigint, due_date date, reason text, listed boolean, "
            "phone text, ask_for text, earliest_call_at timestamptz, reason_code text, detail text) ON COMMIT DROP"
        )
        with cur.copy("COPY stage_call_list FROM STDIN") as copy:
            for p in placements:
                person = by_id[p.patient_id]
                copy.write_row(
                    (
                        p.patient_id,
                        person.due_date,
                        person.reason,
                        p.listed,
                        p.phone,
                        p.ask_for,
                        p.earliest_call_at,
                        p.reason_code,
                        p.detail,
                    )
                )
    conn.execute(
        text(
            "INSERT INTO call_list (patient_id, practice_id, due_date, reason, listed, phone, ask_for, earliest_call_at, "
            "reason_code, detail) SELECT patient_id, :p, due_date, reason, listed, phone, ask_for, earliest_call_at, "
            "reason_code, detail FROM stage_call_list"
        ),
        {"p": practice_id},
    )


def counts(conn: Connection, practice_id: str) -> dict[str, Any]:
    """People listed, entries (numbers to call), households (entries covering several people), and
    the due people not listed by reason."""
    row = conn.execute(
        text(
            "SELECT count(*) AS due, count(*) FILTER (WHERE listed) AS people_listed, "
            "count(DISTINCT phone) FILTER (WHERE listed) AS entries FROM call_list WHERE practice_id = :p"
        ),
        {"p": practice_id},
    ).one()
    households = conn.execute(
        text(
            "SELECT count(*) FROM (SELECT phone FROM call_list WHERE practice_id = :p AND listed GROUP BY phone "
            "HAVING count(*) > 1) h"
        ),
        {"p": practice_id},
    ).scalar_one()
    reasons: Counter[str] = Counter(
        dict(
            conn.execute(
                text(
                    "SELECT reason_code, count(*) FROM call_list WHERE practice_id = :p AND NOT listed "
                    "GROUP BY reason_code"
                ),
                {"p": practice_id},
            ).all()
        )
    )
    return {
        "due": row.due,
        "people_listed": row.people_listed,
        "entries": row.entries,
        "households": households,
        "not_listed": {code: reasons.get(code, 0) for code in REASON_CODES if code != "not_due"},
    }


def record_event(
    conn: Connection,
    practice_id: str,
    *,
    kind: str,
    pms_patient_id: str,
    outcome: CallOutcome,
    occurred_at: datetime,
    phone: str | None,
    outbox_id: int | None,
    actor: str,
    now: datetime,
) -> dict[str, Any]:
    """Record what a call came to and apply its effect on the list in this same transaction:
    suppress (asked not to be called, deceased), set the number aside (wrong number), count the
    attempt or snooze; then place the patient's household again."""
    patient = conn.execute(
        text(
            "SELECT pt.patient_id, COALESCE(pt.merged_into, pt.patient_id) AS kept_id, pt.phones, "
            "(SELECT r.due_date FROM recalls r WHERE r.patient_id = COALESCE(pt.merged_into, pt.patient_id)) AS due, "
            "(SELECT c.phone FROM call_list c WHERE c.patient_id = COALESCE(pt.merged_into, pt.patient_id) "
            " AND c.listed) AS listed_phone "
            "FROM patients pt WHERE pt.practice_id = :p AND pt.pms_patient_id = :ref"
        ),
        {"p": practice_id, "ref": pms_patient_id},
    ).one_or_none()
    dialled: str | None = phone or (
        (patient.listed_phone or (patient.phones[0] if patient.phones else None)) if patient is not None else None
    )
    event_id = conn.execute(
        text(
            "INSERT INTO call_events (practice_id, pms_patient_id, kind, outcome, phone, recall_due_date, occurred_at, "
            "outbox_id, actor) VALUES (:p, :ref, :kind, :outcome, :phone, :due, :at, :outbox, :actor) RETURNING event_id"
        ),
        {
            "p": practice_id,
            "ref": pms_patient_id,
            "kind": kind,
            "outcome": str(outcome),
            "phone": dialled,
            "due": patient.due if patient else None,
            "at": occurred_at,
            "outbox": outbox_id,
            "actor": actor,
        },
    ).scalar_one()
    if outcome in SUPPRESSING:
        conn.execute(
            text(
                "INSERT INTO contact_suppressions (practice_id, pms_patient_id, reason, event_id) "
                "VALUES (:p, :ref, :reason, :event) "
                "ON CONFLICT (practice_id, pms_patient_id, reason) WHERE lifted_at IS NULL DO NOTHING"
            ),
            {"p": practice_id, "ref": pms_patient_id, "reason": str(outcome), "event": event_id},
        )
    if patient is None:
        return {"event_id": event_id, "phone": dialled, "placed": None}
    return {
        "event_id": event_id,
        "phone": dialled,
        "placed": refresh_patient(conn, practice_id, patient.kept_id, now, dialled),
    }


def refresh_patient(
    conn: Connection, practice_id: str, patient_id: int, now: datetime, extra_phone: str | None = None
) -> dict[str, Any]:
    """Place one patient's household again (everyone on any of their numbers, and `extra_phone`)."""
    return _refresh_ids(conn, practice_id, {patient_id}, now, {extra_phone} if extra_phone else set())


def refresh_refs(conn: Connection, practice_id: str, refs: Collection[str], now: datetime) -> dict[str, Any] | None:
    """Place again the households of the patients with these PMS ids (read just now from the PMS):
    a booking, a death or an opt-out the practice recorded today takes them off the list at once."""
    if not refs:
        return None
    ids = set(
        conn.execute(
            text(
                "SELECT DISTINCT COALESCE(pt.merged_into, pt.patient_id) FROM patients pt "
                "WHERE pt.practice_id = :p AND pt.pms_patient_id = ANY(:refs)"
            ),
            {"p": practice_id, "refs": sorted(refs)},
        ).scalars()
    )
    return _refresh_ids(conn, practice_id, ids, now, set()) if ids else None


def _refresh_ids(
    conn: Connection, practice_id: str, ids: set[int], now: datetime, extra_phones: set[str]
) -> dict[str, Any]:
    """Place these (kept) patients again, with everyone on any of their numbers or of records merged
    into them: their households' entries are rebuilt whole."""
    phones = conn.execute(
        text(
            "SELECT DISTINCT ph FROM patients pt CROSS JOIN LATERAL unnest(pt.phones) ph "
            "WHERE pt.practice_id = :p AND (pt.patient_id = ANY(:ids) OR pt.merged_into = ANY(:ids))"
        ),
        {"p": practice_id, "ids": sorted(ids)},
    ).scalars()
    settings = practice_call_settings(conn, practice_id)
    today = now.astimezone(UK_TZ).date()
    scope = Scope(ids, {*phones, *extra_phones})
    return rebuild(conn, practice_id, today=today, now=now, settings=settings, scope=scope)


def mark_refreshed(conn: Connection, practice_id: str, at: datetime, *, ok: bool, error: str | None = None) -> None:
    conn.execute(
        text(
            "INSERT INTO call_list_state (practice_id, refreshed_at, attempted_at, ok, error) "
            "VALUES (:p, CASE WHEN :ok THEN CAST(:at AS timestamptz) END, :at, :ok, :error) "
            "ON CONFLICT (practice_id) DO UPDATE SET attempted_at = EXCLUDED.attempted_at, ok = EXCLUDED.ok, "
            "error = EXCLUDED.error, refreshed_at = COALESCE(EXCLUDED.refreshed_at, call_list_state.refreshed_at)"
        ),
        {"p": practice_id, "at": at, "ok": ok, "error": error},
    )


def claim(conn: Connection, practice_id: str, at: datetime) -> None:
    conn.execute(
        text(
            "INSERT INTO call_list_state (practice_id, attempted_at) VALUES (:p, :at) "
            "ON CONFLICT (practice_id) DO UPDATE SET attempted_at = EXCLUDED.attempted_at"
        ),
        {"p": practice_id, "at": at},
    )


def state(conn: Connection, practice_id: str) -> dict[str, Any]:
    row = (
        conn.execute(text("SELECT * FROM call_list_state WHERE practice_id = :p"), {"p": practice_id})
        .mappings()
        .one_or_none()
    )
    built = conn.execute(
        text("SELECT max(listed_at) FROM call_list WHERE practice_id = :p"), {"p": practice_id}
    ).scalar_one()
    out = dict(row) if row else {"refreshed_at": None, "attempted_at": None, "ok": True, "error": None,
                                 "checks": 0, "check_misses": 0}  # fmt: skip
    out["built_at"] = built
    return out


def count_check(conn: Connection, practice_id: str, *, miss: bool) -> None:
    conn.execute(
        text(
            "INSERT INTO call_list_state (practice_id, checks, check_misses) VALUES (:p, 1, :m) "
            "ON CONFLICT (practice_id) DO UPDATE SET checks = call_list_state.checks + 1, "
            "check_misses = call_list_state.check_misses + EXCLUDED.check_misses"
        ),
        {"p": practice_id, "m": int(miss)},
    )


def entry_for(conn: Connection, practice_id: str, phone: str) -> dict[str, Any]:
    """The entry on this number, if any, and everyone due on this number who is not listed."""
    rows = conn.execute(
        text(
            "SELECT c.*, pt.pms_patient_id, pt.first_name, pt.last_name FROM call_list c JOIN patients pt "
            "USING (patient_id) WHERE c.practice_id = :p AND (c.phone = :phone OR (NOT c.listed "
            "AND :phone = ANY(pt.phones))) ORDER BY pt.pms_patient_id"
        ),
        {"p": practice_id, "phone": phone},
    ).mappings()
    listed: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for r in rows:
        (listed if r["listed"] else off).append(dict(r))
    return {"listed": listed, "not_listed": off}


def lift(conn: Connection, practice_id: str, pms_patient_id: str, actor: str, why: str) -> list[str]:
    """Lift a patient's open suppressions (theirs and those of records merged into them); returns
    the reasons lifted."""
    rows = conn.execute(
        text(
            "UPDATE contact_suppressions s SET lifted_at = now(), lifted_by = :actor, lift_reason = :why "
            "WHERE s.practice_id = :p AND s.lifted_at IS NULL AND s.pms_patient_id IN ("
            " SELECT pt.pms_patient_id FROM patients pt WHERE pt.practice_id = :p AND (pt.pms_patient_id = :ref"
            " OR pt.merged_into = (SELECT patient_id FROM patients WHERE practice_id = :p AND pms_patient_id = :ref)))"
            " RETURNING s.reason"
        ),
        {"p": practice_id, "ref": pms_patient_id, "actor": actor, "why": why},
    ).scalars()
    return sorted(set(rows))


def entries(conn: Connection, practice_id: str) -> dict[str, list[dict[str, Any]]]:
    """The list as the caller dials it: one entry per number (most overdue first), and every due
    patient not listed with the reason."""
    rows = conn.execute(
        text(
            "SELECT c.*, pt.pms_patient_id, pt.first_name, pt.last_name FROM call_list c JOIN patients pt "
            "USING (patient_id) WHERE c.practice_id = :p ORDER BY c.due_date, pt.pms_patient_id"
        ),
        {"p": practice_id},
    ).mappings()
    by_phone: dict[str, list[dict[str, Any]]] = {}
    not_listed: list[dict[str, Any]] = []
    for r in rows:
        if r["listed"]:
            by_phone.setdefault(r["phone"], []).append(dict(r))
        else:
            not_listed.append(
                {
                    "pms_patient_id": r["pms_patient_id"],
                    "first_name": r["first_name"],
                    "last_name": r["last_name"],
                    "due_date": r["due_date"],
                    "reason_code": r["reason_code"],
                    "detail": r["detail"],
                }
            )
    out = [
        {
            "phone": phone,
            "ask_for": entry_ask_for(people),
            "earliest_call_at": max(p["earliest_call_at"] for p in people),
            "people": [
                {
                    "pms_patient_id": p["pms_patient_id"],
                    "first_name": p["first_name"],
                    "last_name": p["last_name"],
                    "due_date": p["due_date"],
                    "reason": p["reason"],
                }
                for p in people
            ],
        }
        for phone, people in by_phone.items()
    ]
    out.sort(key=lambda e: (min(p["due_date"] for p in e["people"]), e["phone"]))
    not_listed.sort(key=lambda n: (REASON_CODES.index(n["reason_code"]), n["pms_patient_id"]))
    return {"entries": out, "not_listed": not_listed}


def why(conn: Connection, practice_id: str, pms_patient_id: str, today: date) -> dict[str, Any] | None:
    """Why one patient is or is not on the list (None: the practice has no such patient)."""
    row = conn.execute(
        text(
            "SELECT pt.patient_id, pt.pms_patient_id, pt.first_name, pt.last_name, pt.active, pt.phones, "
            "k.pms_patient_id AS merged_into, r.due_date, r.reason AS recall_reason, c.listed, c.phone, c.ask_for, "
            "c.earliest_call_at, c.reason_code, c.detail FROM patients pt "
            "LEFT JOIN patients k ON k.patient_id = pt.merged_into "
            "LEFT JOIN recalls r ON r.patient_id = pt.patient_id "
            "LEFT JOIN call_list c ON c.patient_id = pt.patient_id "
            "WHERE pt.practice_id = :p AND pt.pms_patient_id = :ref"
        ),
        {"p": practice_id, "ref": pms_patient_id},
    ).one_or_none()
    if row is None:
        return None
    out: dict[str, Any] = {
        "pms_patient_id": row.pms_patient_id,
        "first_name": row.first_name,
        "last_name": row.last_name,
        "due_date": row.due_date,
        "recall_reason": row.recall_reason,
    }
    if row.merged_into:
        return out | {
            "listed": False,
            "reason_code": "inactive",
            "detail": f"merged into {row.merged_into}: look that patient up",
        }
    if not row.active:
        return out | {"listed": False, "reason_code": "inactive", "detail": "no longer in the PMS's records"}
    if row.listed is None:
        if row.due_date is None:
            detail = "no recall: no last eye test on record"
        elif row.due_date > today:
            detail = f"not due until {row.due_date.isoformat()}"
        else:
            detail = "due, but the call list has not been rebuilt since (next sync)"
        return out | {"listed": False, "reason_code": "not_due", "detail": detail}
    if row.listed:
        household = conn.execute(
            text(
                "SELECT pt.pms_patient_id, c.ask_for, c.earliest_call_at FROM call_list c JOIN patients pt "
                "USING (patient_id) WHERE c.practice_id = :p AND c.listed AND c.phone = :phone "
                "ORDER BY pt.pms_patient_id"
            ),
            {"p": practice_id, "phone": row.phone},
        ).mappings()
        people = [dict(h) for h in household]
        return out | {
            "listed": True,
            "phone": row.phone,
            "ask_for": entry_ask_for(people),
            "earliest_call_at": max(p["earliest_call_at"] for p in people),
            "same_call": [p["pms_patient_id"] for p in people if p["pms_patient_id"] != row.pms_patient_id],
        }
    return out | {"listed": False, "reason_code": row.reason_code, "detail": row.detail}


def violations(conn: Connection, practice_id: str) -> list[dict[str, Any]]:
    """Listed people whom nobody may call: deceased, gone away, inactive, no phone recall, or an open
    suppression on them or a record merged into them. Written apart from the placing rules, in SQL,
    so the asset check holds those rules to account."""
    rows = conn.execute(
        text(
            "SELECT pt.pms_patient_id, pt.pms_status, pt.phone_recall, pt.no_recall, "
            "(SELECT string_agg(DISTINCT s.reason, ',') FROM contact_suppressions s JOIN patients r "
            " ON r.practice_id = s.practice_id AND r.pms_patient_id = s.pms_patient_id "
            " WHERE s.practice_id = :p AND s.lifted_at IS NULL "
            " AND (r.patient_id = pt.patient_id OR r.merged_into = pt.patient_id)) AS suppressed "
            "FROM call_list c JOIN patients pt USING (patient_id) WHERE c.practice_id = :p AND c.listed"
        ),
        {"p": practice_id},
    ).mappings()
    return [
        dict(r)
        for r in rows
        if r["pms_status"] != "active" or not r["phone_recall"] or r["no_recall"] or r["suppressed"]
    ]
