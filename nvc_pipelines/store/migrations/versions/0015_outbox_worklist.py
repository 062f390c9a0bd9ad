"""The writeback worklist: a booking or note that ends failed, dead-lettered or timed out waits for
someone to retry or dismiss it, and raises one alert.

- `outbox.status` gains `timed_out` (a booking still not in the PMS when its appointment started:
  never sent again) and `dismissed` (an operator gave up on it, with a reason).
- `outbox.retries` counts operator retries; it is part of the sensor's run key, so a retried row
  (attempts back to 0) launches a run again instead of matching the key of its first run.
- `outbox.alerted_at`: when the alert for the row's current failure was raised (once per failure).
- `alerts.alert_key`: alerts not tied to one failed run (a writeback that needs action, the daily
  digest) are recorded once per key; `run_id` is null for them.
- What the sensor, the digest and `nvc outbox retry|dismiss ID` read across practices goes through
  owner-owned views (0014): `outbox_due_rows` gains retries, state, kind and a booking's start;
  `outbox_states` shows every row's id, kind, state and times; `alert_log` gains `alert_key`.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE outbox DROP CONSTRAINT outbox_status_check;
        ALTER TABLE outbox ADD CONSTRAINT outbox_status_check CHECK (
            status IN ('pending', 'sent', 'confirmed', 'failed', 'dead_letter', 'timed_out', 'dismissed'));
        ALTER TABLE outbox
            ADD COLUMN retries        integer NOT NULL DEFAULT 0,
            ADD COLUMN alerted_at     timestamptz,
            ADD COLUMN dismissed_at   timestamptz,
            ADD COLUMN dismissed_by   text,
            ADD COLUMN dismissed_why  text;
        CREATE INDEX outbox_needs_action ON outbox (practice_id, outbox_id)
            WHERE status IN ('failed', 'dead_letter', 'timed_out');
        CREATE INDEX outbox_dismissed ON outbox (dismissed_at) WHERE dismissed_at IS NOT NULL;

        ALTER TABLE alerts ALTER COLUMN run_id DROP NOT NULL;
        ALTER TABLE alerts ADD COLUMN alert_key text UNIQUE;
        ALTER TABLE alerts ADD CONSTRAINT alerts_run_or_key CHECK (run_id IS NOT NULL OR alert_key IS NOT NULL);
        """
    )
    op.execute(
        """
        CREATE OR REPLACE VIEW outbox_due_rows AS
            SELECT practice_id, outbox_id, attempts, next_attempt_at, retries, status, kind,
                   CASE WHEN kind = 'booking' THEN CAST(payload->>'starts_at' AS timestamptz) END AS starts_at
            FROM outbox WHERE status IN ('pending', 'sent');
        CREATE VIEW outbox_states AS
            SELECT practice_id, outbox_id, kind, status, finished_at, dismissed_at FROM outbox;
        CREATE OR REPLACE VIEW alert_log AS
            SELECT alert_id, practice_id, run_id, job_name, message, consecutive, severity, delivered_to, raised_at,
                   alert_key
            FROM alerts;
        GRANT SELECT ON outbox_states TO nvc_app;
        """
    )
