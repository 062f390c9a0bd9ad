"""Recalls and the call list are written without a foreign-key check a row.

Both tables are derived: every row is recomputed from `patients` by one writer at a time per
practice (`recalls` under `store.recalls.lock_recalls`, `call_list` under `store.calls.lock_list`).
A recall's insert reads the patient it names in the same statement; a list build reads its
patients after taking the list's lock, and inserts from what it read. Their foreign keys to `patients`
and `practices` checked every row again, one look-up and one row lock (`FOR KEY SHARE`) each: in a
probe on a kept 200,000-patient store, inserting a first sync's 196,338 recalls took 4.7-6.9 s with
them and 2.4-2.5 s without.

What the keys also gave is kept another way. `ON DELETE CASCADE` is erasure's explicit delete of
the patient's recall and list rows (`store/erasure.py`, which already did it), and erasure now takes
both practice locks first, so a recall or list write that read the patient before it was erased
commits before the erasure's deletes run, and one that starts after it no longer sees the patient.
Nothing else deletes patients or practices. The recalls check counts a recall whose patient is gone
whenever it validates every row (`patient_exists`, `store/checks.py`: after a full read of the
patients, at least weekly), as the key would have refused it.

Revision ID: 0022
Revises: 0021
"""

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE recalls DROP CONSTRAINT recalls_patient_id_fkey, DROP CONSTRAINT recalls_practice_id_fkey;
        ALTER TABLE call_list DROP CONSTRAINT call_list_patient_id_fkey, DROP CONSTRAINT call_list_practice_id_fkey;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DELETE FROM recalls r WHERE NOT EXISTS (SELECT 1 FROM patients p WHERE p.patient_id = r.patient_id);
        DELETE FROM call_list c WHERE NOT EXISTS (SELECT 1 FROM patients p WHERE p.patient_id = c.patient_id);
        ALTER TABLE recalls
            ADD CONSTRAINT recalls_patient_id_fkey FOREIGN KEY (patient_id) REFERENCES patients ON DELETE CASCADE,
            ADD CONSTRAINT recalls_practice_id_fkey FOREIGN KEY (practice_id) REFERENCES practices;
        ALTER TABLE call_list
            ADD CONSTRAINT call_list_patient_id_fkey FOREIGN KEY (patient_id) REFERENCES patients ON DELETE CASCADE,
            ADD CONSTRAINT call_list_practice_id_fkey FOREIGN KEY (practice_id) REFERENCES practices;
        """
    )
