"""Patient merges (undoable), the audit log of data access, and practice groups.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE patients ADD COLUMN merged_into bigint REFERENCES patients;
        CREATE INDEX patients_merged_into ON patients (merged_into) WHERE merged_into IS NOT NULL;

        CREATE TABLE patient_merges (
            merge_id            bigserial PRIMARY KEY,
            practice_id         text NOT NULL REFERENCES practices,
            keep_patient_id     bigint NOT NULL REFERENCES patients,
            merged_patient_id   bigint NOT NULL REFERENCES patients,
            merged_at           timestamptz NOT NULL DEFAULT now(),
            merged_by           text NOT NULL,
            undone_at           timestamptz,
            undone_by           text
        );

        -- Who read or wrote which patient data, when, and under which run. Append-only.
        CREATE TABLE audit_log (
            audit_id     bigserial PRIMARY KEY,
            at           timestamptz NOT NULL DEFAULT now(),
            actor        text NOT NULL,
            practice_id  text NOT NULL,
            action       text NOT NULL,
            record_refs  text[] NOT NULL DEFAULT '{}',
            run_id       text,
            detail       jsonb NOT NULL DEFAULT '{}'::jsonb
        );
        CREATE INDEX audit_log_practice ON audit_log (practice_id, at);

        -- One owner's several locations (Sycle Location IDs, or a chain): each location is its own
        -- practice and partition; the group lists and exports them together.
        CREATE TABLE practice_groups (
            group_id      text PRIMARY KEY CHECK (group_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
            display_name  text NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now()
        );
        ALTER TABLE practices ADD COLUMN group_id text REFERENCES practice_groups;
        """
    )
