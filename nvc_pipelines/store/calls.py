"""Building the call list: due people gathered in one query, placed by `nvc_pipelines.calling`, and
written back in the caller's transaction, for a whole practice or a scope of it. The nightly's
changed-only update is in `call_updates`, call events and suppressions in `call_events`, and the
list as it is read in `call_views`.

Everything in these modules runs inside a transaction scoped to one practice (`Store.begin(practice_id)`),
so row-level security applies, and an outcome, its suppression and the call list it changes commit
together: the list is never seen without the outcome's effect.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.calling import REASON_CODES, CallEvent, CallSettings, DuePerson, Placement, place
from nvc_pipelines.model import CallOutcome
from nvc_pipelines.store.db import copy_rows, driver

# The due people of a practice (or of a scope: patients by id, or those listed on given numbers), with the
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
# A scope is the patients by id and whoever is listed on its numbers: a placement depends only on the
# person's own record and calls and on the last call on the number they are listed on (`calling.place`),
# so of the others on a number only those listed on it can change with it. The list's own index on
# listed numbers finds them (`call_list_phone`); matching every patient's phones against the numbers
# unnested the phones of the whole practice (0.25-0.34 s a nightly at 200,000 patients).
_SCOPE_IDS = """
CREATE TEMP TABLE scope_ids ON COMMIT DROP AS
SELECT DISTINCT id AS patient_id FROM (
    SELECT unnest(CAST(:ids AS bigint[])) AS id
    UNION ALL
    SELECT c.patient_id FROM call_list c JOIN unnest(CAST(:phones AS text[])) AS s(phone) ON s.phone = c.phone
    WHERE c.practice_id = :p AND c.listed
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


def kept_ids(conn: Connection, practice_id: str, refs: Collection[str]) -> set[int]:
    """The patients these PMS ids name, each as the record it was merged into, if it was."""
    return set(
        conn.execute(
            text(
                "SELECT DISTINCT COALESCE(pt.merged_into, pt.patient_id) FROM patients pt "
                "WHERE pt.practice_id = :p AND pt.pms_patient_id = ANY(:refs)"
            ),
            {"p": practice_id, "refs": sorted(refs)},
        ).scalars()
    )


class Scope:
    """Part of a practice's list to place again: these patients, and whoever is listed on these numbers."""

    def __init__(self, patient_ids: Collection[int] = (), phones: Collection[str] = ()):
        self.patient_ids = set(patient_ids)
        self.phones = set(phones)

    def __bool__(self) -> bool:
        return bool(self.patient_ids or self.phones)


def household(conn: Connection, practice_id: str, ids: Collection[int]) -> Scope:
    """These (kept) patients and whoever is listed on any of their numbers or of records merged into them."""
    phones = conn.execute(
        text(
            "SELECT DISTINCT ph FROM patients pt CROSS JOIN LATERAL unnest(pt.phones) ph "
            "WHERE pt.practice_id = :p AND (pt.patient_id = ANY(:ids) OR pt.merged_into = ANY(:ids))"
        ),
        {"p": practice_id, "ids": sorted(ids)},
    ).scalars()
    return Scope(ids, set(phones))


def practice_call_settings(conn: Connection, practice_id: str) -> CallSettings:
    settings = conn.execute(
        text("SELECT settings FROM practices WHERE practice_id = :p"), {"p": practice_id}
    ).scalar_one()
    return CallSettings.from_settings(settings or {})


def lock_list(conn: Connection, practice_id: str) -> None:
    """Hold the practice's call list until this transaction ends: one build of a practice's list at a
    time. Two syncs of a practice may overlap (a Sync Now during the nightly, an intraday refresh); a
    second build that did not wait would delete only the rows its snapshot saw, then insert beside
    the rows the first build inserted and fail on the list's key."""
    # Two keys (this lock's name, the practice): a key space of its own, apart from single-key locks.
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('nvc.call_list'), hashtext(:p))"), {"p": practice_id})


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
    lock_list(conn, practice_id)
    _gather(conn, practice_id, today, now, scope)
    if scope is None:
        conn.execute(text("DELETE FROM call_list WHERE practice_id = :p"), {"p": practice_id})
    else:
        conn.execute(
            text(
                "DELETE FROM call_list WHERE practice_id = :p "
                # `IN (SELECT unnest(...))` is a hashed lookup; `= ANY(:array)` searched the whole array
                # for each of the practice's rows (a second at 200,000 patients)
                "AND (patient_id IN (SELECT unnest(CAST(:ids AS bigint[]))) "
                "OR patient_id IN (SELECT patient_id FROM due_people) "
                "OR (listed AND phone IN (SELECT unnest(CAST(:phones AS text[])))))"
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


_STAGE_CALL_COLUMNS = (
    "patient_id",
    "due_date",
    "reason",
    "listed",
    "phone",
    "ask_for",
    "earliest_call_at",
    "reason_code",
    "detail",
)


def _write(conn: Connection, practice_id: str, placements: Sequence[Placement], by_id: dict[int, DuePerson]) -> None:
    if not placements:
        return
    with driver(conn).cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS stage_call_list")
        cur.execute(
            "CREATE TEMP TABLE stage_call_list (patient_id bigint, due_date date, reason text, listed boolean, "
            "phone text, ask_for text, earliest_call_at timestamptz, reason_code text, detail text) ON COMMIT DROP"
        )
        people = (by_id[p.patient_id] for p in placements)
        copy_rows(
            cur,
            "stage_call_list",
            _STAGE_CALL_COLUMNS,
            (
                (p.patient_id, person.due_date, person.reason, p.listed, p.phone, p.ask_for, p.earliest_call_at,
                 p.reason_code, p.detail)
                for p, person in zip(placements, people, strict=True)
            ),
        )  # fmt: skip
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
    the due people not listed by reason: one pass over the practice's list, grouped by number (the
    listed) and by reason (the others)."""
    row = conn.execute(
        text(
            "SELECT coalesce(sum(n), 0) AS due, coalesce(sum(n) FILTER (WHERE listed), 0) AS people_listed, "
            "count(*) FILTER (WHERE listed) AS entries, count(*) FILTER (WHERE listed AND n > 1) AS households, "
            "json_object_agg(reason_code, n) FILTER (WHERE NOT listed AND reason_code IS NOT NULL) AS reasons FROM ("
            "SELECT listed, CASE WHEN listed THEN phone END AS phone, CASE WHEN NOT listed THEN reason_code END "
            "AS reason_code, count(*) AS n FROM call_list WHERE practice_id = :p GROUP BY 1, 2, 3) g"
        ),
        {"p": practice_id},
    ).one()
    reasons: dict[str, int] = row.reasons or {}
    return {
        "due": int(row.due),
        "people_listed": int(row.people_listed),
        "entries": row.entries,
        "households": row.households,
        "not_listed": {code: reasons.get(code, 0) for code in REASON_CODES if code != "not_due"},
    }
