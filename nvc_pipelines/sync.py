"""How much a sync reads: the first sync of a stream is full, later ones read what changed since
the stream's cursor, and a periodic full read reconciles records deleted or merged in the PMS."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

T = TypeVar("T")

DEFAULT_FULL_EVERY = timedelta(days=7)
# Re-read a little before the cursor: PMS clocks drift and rows committed late carry older stamps.
CURSOR_OVERLAP = timedelta(minutes=10)
DEFAULT_MAX_DROP_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class SyncPlan:
    full: bool
    since: datetime | None
    reason: str


def plan_sync(
    cursor_at: datetime | None,
    last_full_sync_at: datetime | None,
    now: datetime,
    *,
    force_full: bool = False,
    full_every: timedelta = DEFAULT_FULL_EVERY,
) -> SyncPlan:
    if force_full:
        return SyncPlan(True, None, "full sync requested")
    if last_full_sync_at is None:
        return SyncPlan(True, None, "first sync")
    if cursor_at is None:
        return SyncPlan(True, None, "source has no change cursor")
    if now - last_full_sync_at >= full_every:
        return SyncPlan(True, None, f"periodic reconcile (every {full_every.days} days)")
    return SyncPlan(False, cursor_at - CURSOR_OVERLAP, "incremental since cursor")


def next_cursor(stamps: Iterable[datetime | None]) -> datetime | None:
    """The newest change stamp read (None when the source has none: the old cursor stays)."""
    return max((s for s in stamps if s is not None), default=None)


def full_every(settings: dict[str, str]) -> timedelta:
    """`full_sync_every_days` setting, default 7."""
    return timedelta(days=float(settings.get("full_sync_every_days", DEFAULT_FULL_EVERY.days)))


def max_drop_share(settings: dict[str, str]) -> float:
    """`max_drop_share` setting: the share of active rows a full read may deactivate (default 20%)."""
    return float(settings.get("max_drop_share", DEFAULT_MAX_DROP_SHARE))


_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items` produced by a background thread at most `depth` ahead of the consumer (a bounded
    queue): the next PMS page is fetched and normalised while this one is written. An exception in
    the producer is raised in the consumer, in order; when the consumer stops early (a failed write),
    the producer stops after the item at hand."""
    handoff: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="nvc-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = handoff.get()
            if not ok:
                assert isinstance(item, BaseException)
                raise item
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
