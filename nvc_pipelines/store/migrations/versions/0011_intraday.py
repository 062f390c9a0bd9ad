"""Fresh before every call: when each practice's call list was last brought up to date with its PMS
during the day, whether that worked, and how the calling system's pre-dial checks went.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE call_list_state (
            practice_id      text PRIMARY KEY REFERENCES practices,
            refreshed_at     timestamptz,  -- the last intraday read that reached the list
            attempted_at     timestamptz,  -- the last intraday read tried, whatever came of it
            ok               boolean NOT NULL DEFAULT true,
            error            text,
            checks           bigint NOT NULL DEFAULT 0,
            check_misses     bigint NOT NULL DEFAULT 0  -- pre-dial checks answered skip: PMS unreachable
        );
        """
    )
    op.execute("GRANT SELECT, INSERT, UPDATE ON call_list_state TO nvc_app")
    op.execute("ALTER TABLE call_list_state ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE call_list_state FORCE ROW LEVEL SECURITY")
    op.execute(
        "CREATE POLICY practice_scope ON call_list_state TO nvc_app "
        "USING (practice_id = current_setting('nvc.practice_id', true)) "
        "WITH CHECK (practice_id = current_setting('nvc.practice_id', true))"
    )
    op.execute(
        "DO $$ BEGIN EXECUTE format('CREATE POLICY owner_all ON call_list_state TO %I USING (true) "
        "WITH CHECK (true)', current_user); END $$"
    )
