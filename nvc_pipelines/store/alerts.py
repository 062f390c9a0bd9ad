"""Alerts: one row per failed run (once per run id) or per keyed event (once per key), and where each
was delivered. Across practices they are read through the owner's view `alert_log`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.store.base import StoreBase


def insert_keyed_alert(
    conn: Connection, practice_id: str, key: str, job_name: str, message: str, severity: str
) -> int | None:
    """Record an alert not tied to one failed run, once per `key`, inside the caller's transaction
    (so it commits with the change it reports); returns its id, or None if `key` was seen before."""
    return conn.execute(
        text(
            "INSERT INTO alerts (practice_id, alert_key, job_name, message, consecutive, severity) "
            "VALUES (:p, :k, :j, :m, 1, :s) ON CONFLICT (alert_key) DO NOTHING RETURNING alert_id"
        ),
        {"p": practice_id, "k": key, "j": job_name, "m": message, "s": severity},
    ).scalar_one_or_none()


class AlertsMixin(StoreBase):
    """Recording, marking and reading alerts (delivering them is `nvc_pipelines.alerts`')."""

    def record_run_alert(
        self,
        practice_id: str,
        run_id: str,
        job_name: str,
        message: str,
        consecutive: int,
        severity: str,
        delivered: list[str],
    ) -> None:
        """Record the alert of a failed run; a second one for the same run is ignored."""
        with self.begin(practice_id) as conn:
            conn.execute(
                text(
                    "INSERT INTO alerts (practice_id, run_id, job_name, message, consecutive, severity, delivered_to) "
                    "VALUES (:p, :r, :j, :m, :c, :s, :d) ON CONFLICT (run_id) DO NOTHING"
                ),
                {
                    "p": practice_id,
                    "r": run_id,
                    "j": job_name,
                    "m": message,
                    "c": consecutive,
                    "s": severity,
                    "d": delivered,
                },
            )

    def record_keyed_alert(self, practice_id: str, key: str, job_name: str, message: str, severity: str) -> int | None:
        """`insert_keyed_alert` in a transaction of its own (an alert that reports no change of its own)."""
        with self.begin(practice_id) as conn:
            return insert_keyed_alert(conn, practice_id, key, job_name, message, severity)

    def mark_alerts_delivered(self, practice_id: str, alert_ids: list[int], delivered: list[str]) -> None:
        """Note where recorded alerts were sent (delivery happens after their transaction commits)."""
        with self.begin(practice_id) as conn:
            conn.execute(
                text("UPDATE alerts SET delivered_to = :d WHERE alert_id = ANY(:ids)"),
                {"d": delivered, "ids": alert_ids},
            )

    def recent_alerts(self, practice_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """One practice's alerts, or every practice's through the view `alert_log` (the application's
        role sees no practice's rows outside a transaction scoped to it)."""
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(
                    f"SELECT * FROM {'alerts' if practice_id else 'alert_log'} "
                    "WHERE (CAST(:p AS text) IS NULL OR practice_id = :p) "
                    "ORDER BY raised_at DESC LIMIT :n"
                ),
                {"p": practice_id, "n": limit},
            ).mappings()
            return [dict(r) for r in rows]
