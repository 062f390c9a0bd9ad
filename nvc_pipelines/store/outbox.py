"""The outbox: bookings and call notes on their way to the PMS, and the worklist of those that need action."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text

from nvc_pipelines.store.base import StoreBase


class OutboxMixin(StoreBase):
    """The outbox's rows and their states."""

    def oldest_waiting_writeback(self, practice_id: str) -> datetime | None:
        """When the practice's oldest booking or note still on its way to the PMS was written to the
        outbox (None when nothing waits)."""
        with self.begin(practice_id) as conn:
            return conn.execute(
                text("SELECT min(created_at) FROM outbox WHERE practice_id = :p AND status IN ('pending', 'sent')"),
                {"p": practice_id},
            ).scalar_one()
