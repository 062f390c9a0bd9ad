"""The patients due a recall recomputation, as rows of their own (`recall_due`), not a column of theirs.

A patient's recall was stale when `patients.change_seq <> patients.recall_seq`, and a recall pass
marked each patient it computed by raising `recall_seq`: an `UPDATE` of the whole, wide patient row,
which wrote a new version of it and an entry in each of its indexes (the phones' GIN index
included), since the stale index named the column. At 200,000 patients that `UPDATE` took 3-8 s of
a first sync's recall pass (a probe on a kept store), to record one number a patient.

Now a patient is due exactly while `recall_due` holds a row for them. `seq` is a stamp drawn from
the sequence `recall_due_seq` each time they are queued (the row inserted, or its stamp replaced):
no two queueings share one. Two statement triggers on `patients` queue every patient inserted and
every patient whose `change_seq` an update changes, whatever the statement (a sync's merge, a
deactivation, a merge of duplicates, an operator's fix that raises it). An update that leaves
`change_seq` alone queues no one: the columns a recall reads change only with it. A clinical
record's merge queues the patients of the records it adds, changes or deactivates itself, in the
same statement (`store/streams.py`): it no longer rewrites their patient rows to bump `change_seq`
(at 200,000 patients, one clinical record each, that bump took 4.7-5.3 s of a first sync in a
probe). A recall pass reads each patient's stamp (0 for one not queued) with the patient, and
deletes the rows of those it computed whose stamp is still the one it read, in the transaction that
writes their recalls. A change that commits meanwhile has stamped the row anew (holding it until
then), so the patient stays queued: ADR 0004's guarantee, with no clock and no window. A row is
narrow (practice, PMS id, stamp), never part of the patient row.

`recall_due` has no foreign keys: it is written for every patient a sync inserts, where a check of
each would cost more than the row. Erasure deletes the patient's row with the rest
(`store/erasure.py`).

Revision ID: 0021
Revises: 0020
"""

from alembic import op

from nvc_pipelines.store.migrations.rls import practice_scoped

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE recall_due (
            practice_id     text NOT NULL,
            pms_patient_id  text NOT NULL,
            seq             bigint NOT NULL,
            PRIMARY KEY (practice_id, pms_patient_id)
        );
        -- Only ever compared for equality: a session may take its stamps a block at a time.
        CREATE SEQUENCE recall_due_seq CACHE 100;
        GRANT USAGE ON SEQUENCE recall_due_seq TO nvc_app;
        INSERT INTO recall_due (practice_id, pms_patient_id, seq)
            SELECT practice_id, pms_patient_id, nextval('recall_due_seq') FROM patients WHERE change_seq <> recall_seq;

        CREATE FUNCTION queue_inserted_patients() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO recall_due (practice_id, pms_patient_id, seq)
                SELECT practice_id, pms_patient_id, nextval('recall_due_seq') FROM inserted
                ON CONFLICT (practice_id, pms_patient_id) DO UPDATE SET seq = EXCLUDED.seq;
            RETURN NULL;
        END $$;
        CREATE FUNCTION queue_changed_patients() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO recall_due (practice_id, pms_patient_id, seq)
                SELECT n.practice_id, n.pms_patient_id, nextval('recall_due_seq') FROM updated n
                JOIN previous o ON o.patient_id = n.patient_id
                WHERE n.change_seq IS DISTINCT FROM o.change_seq
                ON CONFLICT (practice_id, pms_patient_id) DO UPDATE SET seq = EXCLUDED.seq;
            RETURN NULL;
        END $$;
        CREATE TRIGGER patients_queue_inserted AFTER INSERT ON patients
            REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION queue_inserted_patients();
        CREATE TRIGGER patients_queue_changed AFTER UPDATE ON patients
            REFERENCING OLD TABLE AS previous NEW TABLE AS updated
            FOR EACH STATEMENT EXECUTE FUNCTION queue_changed_patients();

        DROP INDEX patients_recall_stale;
        ALTER TABLE patients DROP COLUMN recall_seq;
        """
    )
    practice_scoped("recall_due")


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER patients_queue_changed ON patients;
        DROP TRIGGER patients_queue_inserted ON patients;
        ALTER TABLE patients ADD COLUMN recall_seq bigint NOT NULL DEFAULT 0;
        UPDATE patients p SET recall_seq = p.change_seq
            WHERE NOT EXISTS (SELECT 1 FROM recall_due q
                              WHERE q.practice_id = p.practice_id AND q.pms_patient_id = p.pms_patient_id);
        CREATE INDEX patients_recall_stale ON patients (practice_id, pms_patient_id) WHERE change_seq <> recall_seq;
        DROP FUNCTION queue_changed_patients();
        DROP FUNCTION queue_inserted_patients();
        DROP TABLE recall_due;
        DROP SEQUENCE recall_due_seq;
        """
    )
