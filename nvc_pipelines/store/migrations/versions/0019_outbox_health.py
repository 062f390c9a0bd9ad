"""Every practice's writeback health in one read: `outbox_health`, a view for the health sensor;
and what `call_list.earliest_call_at` holds, said on the column.

The sensor judged each practice's outbox with two statements of its own (the oldest row waiting to
be sent, and how many ended without landing), every 5 minutes: 10,000 statements a tick at 5,000
practices. The view groups the outbox by practice once. Like the other views for reads across
practices (0014), it belongs to the owner and shows only what its reader needs: a time and a count.

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE VIEW outbox_health AS
            SELECT practice_id, min(oldest_waiting) AS oldest_waiting, sum(needs_action)::bigint AS needs_action
            FROM (
                -- each part reads one partial index's rows (outbox_due, outbox_needs_action), never
                -- the confirmed rows that make up nearly all of the outbox
                SELECT practice_id, min(created_at) AS oldest_waiting, 0 AS needs_action FROM outbox
                    WHERE status IN ('pending', 'sent') GROUP BY practice_id
                UNION ALL
                SELECT practice_id, NULL, count(*) FROM outbox
                    WHERE status IN ('failed', 'dead_letter', 'timed_out') GROUP BY practice_id
            ) parts GROUP BY practice_id;
        GRANT SELECT ON outbox_health TO nvc_app;
        COMMENT ON COLUMN call_list.earliest_call_at IS
            'When the person may first be rung, as placed (the nightly does not rewrite it). Once passed, '
            'read it as the opening of the reader''s calling window: calling.ReadMoment, which every '
            'reader in the code applies. Raw, it can be days old.';
        """
    )


def downgrade() -> None:
    op.execute("COMMENT ON COLUMN call_list.earliest_call_at IS NULL")
    op.execute("DROP VIEW outbox_health")
