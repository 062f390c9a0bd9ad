"""Each practice's clinicians as its PMS lists them, with their GOC registration as last checked.

The register's answer is cached here (`checked_at`): the sync checks every clinician, and a booking
naming one is checked again when the cached answer is older than a day.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

from nvc_pipelines.store.migrations.rls import practice_scoped

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE clinicians (
            practice_id        text NOT NULL REFERENCES practices,
            pms_clinician_ref  text NOT NULL,          -- what a booking's clinician_ref names
            name               text NOT NULL DEFAULT '',
            role               text NOT NULL DEFAULT '',
            goc_number         text,                   -- as the PMS holds it (None: it holds none)
            state              text NOT NULL,          -- nvc_pipelines.goc.RegistrationState
            registrant_type    text,                   -- the register's: optometrist, dispensing_optician, ...
            register_name      text,
            reason             text NOT NULL DEFAULT '',
            listed             boolean NOT NULL DEFAULT true,  -- in the PMS's list at the last sync
            checked_at         timestamptz,            -- when the register last answered for this number
            updated_at         timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (practice_id, pms_clinician_ref)
        );
        """
    )
    practice_scoped("clinicians", "SELECT, INSERT, UPDATE")


def downgrade() -> None:
    op.execute("DROP TABLE clinicians")
