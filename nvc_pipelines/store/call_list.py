"""The call list as the store's callers see it: each method one transaction around `calls`."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.calling import UK_TZ, CallSettings, ReadMoment
from nvc_pipelines.store import call_events, call_updates, call_views, calls
from nvc_pipelines.store.base import PracticeNotFound, StoreBase


class CallListMixin(StoreBase):
    """Build, read and update the call list (the rules and SQL are in `calls`)."""

    def rebuild_call_list(
        self,
        practice_id: str,
        today: date | None = None,
        *,
        now: datetime | None = None,
        settings: CallSettings | None = None,
    ) -> dict[str, Any]:
        """Place every due patient of the practice again (see `nvc_pipelines.calling`): listed on the
        entry of one number, or not listed with the reason. Replaced whole, in one transaction;
        returns people listed, entries, households and the due people not listed by reason.

        `today` decides who is due (default: today in the UK); `now`, when calls may be made."""
        now = now or datetime.now(UTC)
        today = today or now.astimezone(UK_TZ).date()
        with self.begin(practice_id) as conn:
            settings = settings or calls.practice_call_settings(conn, practice_id)
            counts = calls.rebuild(conn, practice_id, today=today, now=now, settings=settings)
            self.audit(conn, "pipeline", practice_id, "build_call_list", detail=counts)
        return counts

    def update_call_list(
        self, practice_id: str, *, settings: CallSettings, now: datetime | None = None, full: bool = False
    ) -> dict[str, Any]:
        """The nightly's call list: only the households whose placement may have changed since the last
        build are placed again (whole the first time, after a settings change, or when `full`); see
        `call_updates.update`. Returns the whole practice's counts, the mode and how many were placed again."""
        now = now or datetime.now(UTC)
        with self.begin(practice_id) as conn:
            counts = call_updates.update(conn, practice_id, now=now, settings=settings, full=full)
            self.audit(conn, "pipeline", practice_id, "build_call_list", detail=counts)
        return counts

    def call_list(self, practice_id: str, actor: str | None = None) -> list[dict[str, Any]]:
        """The people on the call list, one row each (most overdue first), with the number, whom to
        ask for and when; reading it as someone (`actor`) is recorded in the audit log."""
        with self.begin(practice_id) as conn:
            if actor:
                self.audit(conn, actor, practice_id, "read_call_list")
            moment = self._moment(conn, practice_id, None)
            rows = conn.execute(
                text(
                    "SELECT pt.pms_patient_id, pt.first_name, pt.last_name, c.phone, c.due_date, c.reason, c.ask_for, "
                    "c.earliest_call_at, c.listed FROM call_list c JOIN patients pt USING (patient_id) "
                    "WHERE c.practice_id = :p AND c.listed ORDER BY c.due_date, pt.pms_patient_id"
                ),
                {"p": practice_id},
            ).mappings()
            return [{k: v for k, v in call_views.as_read(r, moment).items() if k != "listed"} for r in rows]

    @staticmethod
    def _moment(conn: Connection, practice_id: str, now: datetime | None) -> ReadMoment:
        """`now` (default: this moment) with the practice's calling window then, to read the list at."""
        return calls.practice_call_settings(conn, practice_id).read_moment(now or datetime.now(UTC))

    def call_list_view(self, practice_id: str, actor: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """`{"entries": [...], "not_listed": [...]}`: one entry per number to dial, and every due
        patient who is not on the list with the reason."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            if actor:
                self.audit(conn, actor, practice_id, "read_call_list")
            return call_views.entries(conn, practice_id, self._moment(conn, practice_id, None))

    def call_list_why(self, practice_id: str, pms_patient_id: str, actor: str | None = None) -> dict[str, Any]:
        """Why one patient is, or is not, on the call list."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            now = datetime.now(UTC)
            found = call_views.why(
                conn, practice_id, pms_patient_id, now.astimezone(UK_TZ).date(), self._moment(conn, practice_id, now)
            )
            if found is None:
                raise PracticeNotFound(f"practice {practice_id} has no patient {pms_patient_id!r}")
            if actor:
                self.audit(conn, actor, practice_id, "read_call_list", [pms_patient_id])
        return found

    def call_list_state(self, practice_id: str) -> dict[str, Any]:
        """When the list was last built and last brought up to date during the day, and checks made."""
        with self.begin(practice_id) as conn:
            return call_views.state(conn, practice_id)

    def claim_call_list_refresh(self, practice_id: str, at: datetime) -> None:
        """Record that an intraday refresh was requested now, so the next sensor tick waits for it."""
        with self.begin(practice_id) as conn:
            call_views.claim(conn, practice_id, at)

    def mark_call_list_refreshed(self, practice_id: str, at: datetime, *, ok: bool, error: str | None = None) -> None:
        with self.begin(practice_id) as conn:
            call_views.mark_refreshed(conn, practice_id, at, ok=ok, error=error)

    def call_list_entry(
        self, practice_id: str, phone: str, *, miss: bool | None = None, now: datetime | None = None
    ) -> dict[str, Any]:
        """Who is on the entry of `phone` (and who on it is not listed), with when they may be rung
        as of `now` (default: this moment); `miss` counts a pre-dial check."""
        with self.begin(practice_id) as conn:
            if miss is not None:
                call_views.count_check(conn, practice_id, miss=miss)
            return call_views.entry_for(conn, practice_id, phone, self._moment(conn, practice_id, now))

    def call_list_violations(self, practice_id: str) -> list[dict[str, Any]]:
        with self.begin(practice_id) as conn:
            return call_views.violations(conn, practice_id)

    def lift_contact_suppression(self, practice_id: str, pms_patient_id: str, actor: str, why: str) -> list[str]:
        """Let a patient who asked not to be called (or was reported deceased on a call) be called
        again: audited, and their household placed again at once. Returns the reasons lifted."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            patient_id = conn.execute(
                text(
                    "SELECT COALESCE(merged_into, patient_id) FROM patients WHERE practice_id = :p "
                    "AND pms_patient_id = :ref"
                ),
                {"p": practice_id, "ref": pms_patient_id},
            ).scalar_one_or_none()
            if patient_id is None:
                raise PracticeNotFound(f"practice {practice_id} has no patient {pms_patient_id!r}")
            lifted = call_events.lift(conn, practice_id, pms_patient_id, actor, why)
            if not lifted:
                raise ValueError(f"patient {pms_patient_id} of {practice_id} has no call suppression to lift")
            self.audit(
                conn,
                actor,
                practice_id,
                "lift_contact_suppression",
                [pms_patient_id],
                detail={"lifted": lifted, "why": why},
            )
            call_events.refresh_patient(conn, practice_id, patient_id, datetime.now(UTC))
        return lifted
