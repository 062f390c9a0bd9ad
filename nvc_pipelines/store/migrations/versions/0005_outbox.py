"""The outbox: bookings, call outcomes and call attempts the AI calling system made, to be written
into the practice's PMS exactly once.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE outbox (
            outbox_id        bigserial PRIMARY KEY,
            practice_id      text NOT NULL REFERENCES practices,
            kind             text NOT NULL CHECK (kind IN ('booking', 'call_outcome', 'call_attempt')),
            idempotency_key  text NOT NULL CHECK (idempotency_key ~ '^[A-Za-z0-9_.:-]{1,80}$'),
            pms_patient_id   text NOT NULL,
            payload          jsonb NOT NULL,
            status           text NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'sent', 'confirmed', 'failed', 'dead_letter')),
            attempts         integer NOT NULL DEFAULT 0,
            next_attempt_at  timestamptz NOT NULL DEFAULT now(),
            problem          text,
            last_error       text,
            pms_record_id    text,
            created_at       timestamptz NOT NULL DEFAULT now(),
            sent_at          timestamptz,
            finished_at      timestamptz,
            updated_at       timestamptz NOT NULL DEFAULT now(),
            UNIQUE (practice_id, idempotency_key)
        );
        CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status IN ('pending', 'sent');
        CREATE INDEX outbox_patient ON outbox (practice_id, pms_patient_id);
        """
    )
