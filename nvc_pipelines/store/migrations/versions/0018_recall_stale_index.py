"""The patients whose recall is stale, by key: the recall pass pages through them in PMS id order.

`recall_batches` reads the stale patients `size` at a time after the last key read; the partial
index on the practice alone made each page either a scan of the practice's key index (filtering out
the up-to-date) or a sort of every stale row.

Revision ID: 0018
Revises: 0017
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX patients_recall_stale ON patients (practice_id, pms_patient_id) WHERE change_seq <> recall_seq"
    )
    op.execute("DROP INDEX patients_recall_due")


def downgrade() -> None:
    op.execute("CREATE INDEX patients_recall_due ON patients (practice_id) WHERE change_seq <> recall_seq")
    op.execute("DROP INDEX patients_recall_stale")
