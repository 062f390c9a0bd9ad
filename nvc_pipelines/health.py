"""Sync health per practice, as ops read it: the read side (is the store as fresh as the schedule
promises?) and the write side (do bookings and notes reach the PMS, or do they wait?).

`nvc practice list` shows both; `sync_health_sensor` turns them red or green in the Dagster UI
between runs (a check that only runs with a sync could never notice that syncs stopped).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from nvc_pipelines.quality import FRESHNESS_HOURS

if TYPE_CHECKING:
    from nvc_pipelines.store import Store

# The nightly runs every 24 h; two hours of grace for a long queue before a practice is stale.
READ_MAX_AGE = timedelta(hours=FRESHNESS_HOURS)
# Bookings land within a minute; a row still waiting after this means deliveries fail or stopped.
WRITE_MAX_WAIT = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class PracticeHealth:
    practice_id: str
    read_ok: bool
    read_detail: str
    write_ok: bool
    write_detail: str
    # Writebacks that ended without landing (failed, dead letter, timed out): none waits to be sent,
    # but each needs a person (`nvc outbox PRACTICE --needs-action`).
    needs_action: int = 0


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h" if minutes < 48 * 60 else f"{minutes // 1440} days"


def read_health(last_sync_at: datetime | None, now: datetime) -> tuple[bool, str]:
    """Whether the practice's last successful sync is as recent as the nightly schedule promises."""
    if last_sync_at is None:
        return False, "never synced successfully"
    ok = now - last_sync_at <= READ_MAX_AGE
    return ok, f"last successful sync {_age(now - last_sync_at)} ago" + (
        "" if ok else f", over the {FRESHNESS_HOURS} h the nightly schedule allows"
    )


def write_health(oldest: datetime | None, practice_id: str, now: datetime) -> tuple[bool, str]:
    """Whether the practice's outbox delivers: nothing has waited longer than `WRITE_MAX_WAIT` (`oldest`:
    when its oldest writeback still waiting was written, None when nothing waits)."""
    if oldest is None:
        return True, "nothing waiting"
    ok = now - oldest <= WRITE_MAX_WAIT
    return ok, f"oldest writeback waiting {_age(now - oldest)}" + (
        "" if ok else f", over the {_age(WRITE_MAX_WAIT)} allowed (see `nvc outbox {practice_id}`)"
    )


def practice_health(
    practice: dict[str, Any], writes: tuple[datetime | None, int], now: datetime | None = None
) -> PracticeHealth:
    """One practice's health from its registry row (`Store.practice_states`) and its outbox's
    (oldest waiting, needing action) (`Store.writeback_health`)."""
    now = now or datetime.now(UTC)
    read_ok, read = read_health(practice["last_sync_at"], now)
    write_ok, write = write_health(writes[0], practice["practice_id"], now)
    return PracticeHealth(practice["practice_id"], read_ok, read, write_ok, write, writes[1])


def fleet_health(store: Store, now: datetime | None = None) -> list[PracticeHealth]:
    """Every connected practice's health, in two reads whatever the number of practices (the sensor
    runs this every 5 minutes)."""
    writes = store.writeback_health()
    return [
        practice_health(p, writes.get(p["practice_id"], (None, 0)), now)
        for p in store.practice_states()
        if p["status"] == "connected"
    ]
