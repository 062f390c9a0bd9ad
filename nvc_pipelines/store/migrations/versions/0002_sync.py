"""Appointments, clinical records, sync cursors, the call list; inferred flags and reasons on recalls.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE appointments (
            appointment_id      bigserial PRIMARY KEY,
            practice_id         text NOT NULL REFERENCES practices,
            pms_appointment_id  text NOT NULL,
            pms_patient_id      text NOT NULL,
            starts_at           timestamptz NOT NULL,
            ends_at             timestamptz NOT NULL,
            status              text NOT NULL CHECK (status IN ('booked', 'completed', 'cancelled', 'no_show')),
            appointment_type    text NOT NULL,
            clinician           text,
            notes               text,
            nvc_reference       text,
            source_updated_at   timestamptz,
            active              boolean NOT NULL DEFAULT true,
            content_hash        text NOT NULL,
            first_seen_at       timestamptz NOT NULL DEFAULT now(),
            updated_at          timestamptz NOT NULL DEFAULT now(),
            UNIQUE (practice_id, pms_appointment_id),
            CHECK (ends_at > starts_at)
        );
        CREATE INDEX appointments_patient ON appointments (practice_id, pms_patient_id, starts_at);
        CREATE INDEX appointments_nvc_reference ON appointments (practice_id, nvc_reference)
            WHERE nvc_reference IS NOT NULL;

        CREATE TABLE clinical_records (
            clinical_record_id  bigserial PRIMARY KEY,
            practice_id         text NOT NULL REFERENCES practices,
            pms_record_id       text NOT NULL,
            pms_patient_id      text NOT NULL,
            exam_date           date NOT NULL,
            record_type         text NOT NULL,
            flags               text[] NOT NULL DEFAULT '{}',
            unknown_flags       text[] NOT NULL DEFAULT '{}',
            notes               text,
            iop_right_mmhg      numeric(4, 1),
            iop_left_mmhg       numeric(4, 1),
            clinician           text,
            source_updated_at   timestamptz,
            active              boolean NOT NULL DEFAULT true,
            content_hash        text NOT NULL,
            first_seen_at       timestamptz NOT NULL DEFAULT now(),
            updated_at          timestamptz NOT NULL DEFAULT now(),
            UNIQUE (practice_id, pms_record_id)
        );
        CREATE INDEX clinical_records_patient ON clinical_records (practice_id, pms_patient_id, exam_date);

        -- Where each stream of each practice got to: committed in the same transaction as its data.
        CREATE TABLE sync_cursors (
            practice_id         text NOT NULL REFERENCES practices,
            stream              text NOT NULL,
            cursor_at           timestamptz,
            last_full_sync_at   timestamptz,
            last_sync_at        timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (practice_id, stream)
        );

        ALTER TABLE recalls
            ADD COLUMN reason text NOT NULL DEFAULT '',
            ADD COLUMN flags text[] NOT NULL DEFAULT '{}',
            ADD COLUMN inferred_flags text[] NOT NULL DEFAULT '{}';

        CREATE TABLE call_list (
            patient_id      bigint PRIMARY KEY REFERENCES patients ON DELETE CASCADE,
            practice_id     text NOT NULL REFERENCES practices,
            phone           text NOT NULL,
            due_date        date NOT NULL,
            days_overdue    integer NOT NULL,
            reason          text NOT NULL,
            listed_at       timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX call_list_practice ON call_list (practice_id, due_date);
        """
    )
