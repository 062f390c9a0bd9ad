"""Practice registry, patients, recalls and the quarantine of rejected rows.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE practices (
            practice_id   text PRIMARY KEY CHECK (practice_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
            display_name  text NOT NULL,
            pms_kind      text NOT NULL CHECK (pms_kind IN ('csv', 'optix', 'acuitas', 'optisoft', 'sycle')),
            settings      jsonb NOT NULL DEFAULT '{}'::jsonb,
            credentials   bytea,
            status        text NOT NULL DEFAULT 'connected' CHECK (status IN ('connected', 'disconnected')),
            connected_at  timestamptz NOT NULL DEFAULT now(),
            last_sync_at  timestamptz
        );

        CREATE TABLE patients (
            patient_id              bigserial PRIMARY KEY,
            practice_id             text NOT NULL REFERENCES practices,
            pms_patient_id          text NOT NULL,
            first_name              text NOT NULL,
            last_name               text NOT NULL,
            date_of_birth           date,
            email                   text,
            address                 text,
            phones                  text[] NOT NULL DEFAULT '{}',
            phone_types             text[] NOT NULL DEFAULT '{}',
            last_eye_test_date      date,
            last_clinical_test_date date,
            risk_flags              text[] NOT NULL DEFAULT '{}',
            unknown_risk_values     text[] NOT NULL DEFAULT '{}',
            clinical_notes          text,
            pms_recall_due_date     date,
            source_updated_at       timestamptz,
            active                  boolean NOT NULL DEFAULT true,
            content_hash            text NOT NULL,
            first_seen_at           timestamptz NOT NULL DEFAULT now(),
            updated_at              timestamptz NOT NULL DEFAULT now(),
            UNIQUE (practice_id, pms_patient_id)
        );
        CREATE INDEX patients_phones_gin ON patients USING gin (phones);

        CREATE TABLE recalls (
            patient_id      bigint PRIMARY KEY REFERENCES patients ON DELETE CASCADE,
            practice_id     text NOT NULL REFERENCES practices,
            due_date        date NOT NULL,
            recall_source   text NOT NULL CHECK (recall_source IN ('pms', 'computed')),
            rule            text NOT NULL,
            interval_months integer,
            computed_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX recalls_practice_due ON recalls (practice_id, due_date);

        CREATE TABLE rejected_rows (
            rejected_id  bigserial PRIMARY KEY,
            practice_id  text NOT NULL REFERENCES practices,
            source       text NOT NULL,
            source_ref   text NOT NULL DEFAULT '',
            row_ref      text NOT NULL,
            reason       text NOT NULL,
            raw          jsonb NOT NULL,
            run_id       text,
            rejected_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX rejected_rows_practice ON rejected_rows (practice_id, source);
        """
    )
