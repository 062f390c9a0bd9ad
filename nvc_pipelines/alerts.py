"""Alerts: every failed practice run is recorded (the third failure in a row is critical), and so is
every writeback that needs action and the daily digest of writebacks still waiting.

Delivery is optional: `NVC_ALERT_WEBHOOK_URL` receives a JSON POST (Slack-compatible `text` field),
and `NVC_ALERT_EMAIL_TO` with `NVC_SMTP_HOST` (and optional `NVC_SMTP_PORT`, `NVC_ALERT_EMAIL_FROM`)
sends an email. A delivery failure is logged and recorded, never raised: alerting must not fail a run.
"""

from __future__ import annotations

import logging
import os
import smtplib
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import httpx

from nvc_pipelines.store.alerts import insert_keyed_alert

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from nvc_pipelines.store import Store

log = logging.getLogger(__name__)
CRITICAL_AFTER = 3


def record_failure(
    store: Store, practice_id: str, run_id: str, job_name: str, message: str, consecutive: int
) -> dict[str, Any]:
    """Record the alert for a failed run (once per run) and deliver it where configured."""
    severity = "critical" if consecutive >= CRITICAL_AFTER else "warning"
    headline = f"[{severity.upper()}] {job_name} failed for practice {practice_id}"
    if consecutive > 1:
        headline += f" ({consecutive} failures in a row)"
    body = f"{headline}\n{message}\nrun {run_id}"
    delivered = deliver(headline, body)
    store.record_run_alert(practice_id, run_id, job_name, message, consecutive, severity, delivered)
    return {"severity": severity, "headline": headline, "delivered_to": delivered}


def record_keyed(
    conn: Connection, practice_id: str, key: str, job_name: str, message: str, severity: str
) -> int | None:
    """Record an alert not tied to one failed run, once per `key`, inside the caller's transaction
    (so it commits with the change it reports); returns its id, or None if `key` was seen before."""
    return insert_keyed_alert(conn, practice_id, key, job_name, message, severity)


def mark_delivered(store: Store, practice_id: str, alert_ids: list[int], delivered: list[str]) -> None:
    """Note where recorded alerts were sent (delivery happens after their transaction commits)."""
    if not alert_ids or not delivered:
        return
    store.mark_alerts_delivered(practice_id, alert_ids, delivered)


def deliver(headline: str, body: str) -> list[str]:
    delivered: list[str] = []
    webhook = os.environ.get("NVC_ALERT_WEBHOOK_URL")
    if webhook:
        try:
            httpx.post(webhook, json={"text": body}, timeout=10).raise_for_status()
            delivered.append("webhook")
        except httpx.HTTPError as exc:
            log.warning("alert webhook failed: %s", exc)
    to = os.environ.get("NVC_ALERT_EMAIL_TO")
    host = os.environ.get("NVC_SMTP_HOST")
    if to and host:
        message = EmailMessage()
        message["Subject"] = headline
        message["From"] = os.environ.get("NVC_ALERT_EMAIL_FROM", "nvc-pipelines@localhost")
        message["To"] = to
        message.set_content(body)
        try:
            with smtplib.SMTP(host, int(os.environ.get("NVC_SMTP_PORT", "25")), timeout=10) as smtp:
                smtp.send_message(message)
            delivered.append("email")
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("alert email failed: %s", exc)
    return delivered


def recent_alerts(store: Store, practice_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """One practice's alerts, or every practice's (see `Store.recent_alerts`)."""
    return store.recent_alerts(practice_id, limit)
