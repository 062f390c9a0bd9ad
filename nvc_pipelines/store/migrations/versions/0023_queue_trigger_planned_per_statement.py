"""The recall queue's update trigger plans its join for each statement.

`queue_changed_patients` (migration 0021) joins the statement's old and new rows to queue the
patients whose `change_seq` moved. PL/pgSQL plans a statement once per session and keeps the plan,
made with the row counts of the first firing: a merge that changed no patient (any nightly) left a
nested loop over the two transition tables, which the next merge on that connection reused. A full
read that changed every patient then compared every new row with every old one: 2.7 s at 5,000
patients, 75 s at 20,000, hours at 200,000 (a probe; without the trigger, 0.2-0.9 s). Run through
`EXECUTE`, the join is planned with each statement's own counts (a hash join).

Revision ID: 0023
Revises: 0022
"""

from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION queue_changed_patients() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE 'INSERT INTO recall_due (practice_id, pms_patient_id, seq)
                SELECT n.practice_id, n.pms_patient_id, nextval(''recall_due_seq'') FROM updated n
                JOIN previous o ON o.patient_id = n.patient_id
                WHERE n.change_seq IS DISTINCT FROM o.change_seq
                ON CONFLICT (practice_id, pms_patient_id) DO UPDATE SET seq = EXCLUDED.seq';
            RETURN NULL;
        END $$;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION queue_changed_patients() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO recall_due (practice_id, pms_patient_id, seq)
                SELECT n.practice_id, n.pms_patient_id, nextval('recall_due_seq') FROM updated n
                JOIN previous o ON o.patient_id = n.patient_id
                WHERE n.change_seq IS DISTINCT FROM o.change_seq
                ON CONFLICT (practice_id, pms_patient_id) DO UPDATE SET seq = EXCLUDED.seq;
            RETURN NULL;
        END $$;
        """
    )
