"""Recalls are recomputed only for patients whose data changed since their recall was computed.

`patients.change_seq` goes up whenever the patient's row, or any of their clinical records, changes
or is deactivated; `recall_seq` is the `change_seq` their current recall was computed from. A
patient is due a recomputation exactly when the two differ: no clocks, so a sync committing while
recalls are computed is never missed (its bump lands after the value the recall recorded).
`sync_cursors` row `(practice, 'recalls')` keeps the last computation (`cursor_at`), the last full
one (`last_full_sync_at`) and, new here, the fingerprint of the rules and recall logic used.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE sync_cursors ADD COLUMN fingerprint text;
        ALTER TABLE patients
            ADD COLUMN change_seq bigint NOT NULL DEFAULT 1,
            ADD COLUMN recall_seq bigint NOT NULL DEFAULT 0;
        CREATE INDEX patients_recall_due ON patients (practice_id) WHERE change_seq <> recall_seq;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX patients_recall_due;
        ALTER TABLE patients DROP COLUMN recall_seq, DROP COLUMN change_seq;
        ALTER TABLE sync_cursors DROP COLUMN fingerprint;
        """
    )
