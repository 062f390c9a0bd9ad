"""Fresh before every call: when each practice's call list was last brought up to date with its PMS
during the day, whether that worked, and how the calling system's pre-dial checks went.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

from nvc_pipelines.store.migrations.rls import practice_scoped

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
    practice_scoped("call_list_state", "SELECT, INSERT, UPDATE")
