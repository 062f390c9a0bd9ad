"""Alerts raised by failed runs, per practice, with the count of consecutive failures.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE alerts (
            alert_id      bigserial PRIMARY KEY,
            practice_id   text NOT NULL REFERENCES practices,
            run_id        text NOT NULL UNIQUE,
            job_name      text NOT NULL,
            message       text NOT NULL,
            consecutive   integer NOT NULL,
            severity      text NOT NULL CHECK (severity IN ('warning', 'critical')),
            delivered_to  text[] NOT NULL DEFAULT '{}',
            raised_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX alerts_practice ON alerts (practice_id, raised_at);
        GRANT SELECT, INSERT, UPDATE ON alerts TO nvc_app;
        GRANT USAGE, SELECT ON SEQUENCE alerts_alert_id_seq TO nvc_app;
        ALTER TABLE alerts ENABLE ROW LEVEL SECURITY;
        ALTER TABLE alerts FORCE ROW LEVEL SECURITY;
        CREATE POLICY practice_scope ON alerts TO nvc_app
            USING (practice_id = current_setting('nvc.practice_id', true))
            WITH CHECK (practice_id = current_setting('nvc.practice_id', true));
        """
    )
    op.execute(
        "DO $$ BEGIN EXECUTE format('CREATE POLICY owner_all ON alerts TO %I USING (true) WITH CHECK (true)', "
        "current_user); END $$"
    )
