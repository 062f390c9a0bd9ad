"""The nightly's call list: placed whole the first time or when the settings or rules change, and
otherwise only for the patients whose placement may have changed since the last build (`calls`
places them). Runs inside the caller's practice-scoped transaction, as `calls` does.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.calling import UK_TZ, CallSettings
from nvc_pipelines.store.calls import counts, household, kept_ids, lock_list, rebuild

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
                # turned 16 since: the birth dates 16 years before (last_today, today], the shift done
                # once on the bounds, not on every patient's date (a leap day maps to a leap day)
                "AND (pt.updated_at > :since OR (pt.date_of_birth > CAST(:last_today - interval '16 years' AS date) "
                "AND pt.date_of_birth <= CAST(:today - interval '16 years' AS date)))"
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
        ids.update(kept_ids(conn, practice_id, refs))
    return ids


def update(
    conn: Connection, practice_id: str, *, now: datetime, settings: CallSettings, full: bool = False
) -> dict[str, Any]:
    """The nightly's call list: placed whole the first time, when the practice's calling settings or
    the rules changed, or when asked (`full`); otherwise only the households of the patients whose
    placement may have changed since the last build (`_changed_ids`). Nothing else in a placement
    depends on the clock: an entry's `earliest_call_at` that has passed is read as the opening of the
    reader's calling window (`calling.ReadMoment`), not rewritten. Returns `counts` (whole practice) with the mode and
    how many were placed.

    The build's mark is written in the same transaction as the list, so a killed build is redone."""
    lock_list(conn, practice_id)  # before the mark is read: a build that waited reads the mark after the other's
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
        scope = household(conn, practice_id, ids)
        rebuilt = rebuild(conn, practice_id, today=today, now=now, settings=settings, scope=scope) if scope else None
        placed = conn.execute(text("SELECT count(*) FROM due_people")).scalar_one() if scope else 0
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
