"""A call list that is safe to dial: patient status, contact preferences and guardians from the PMS;
what calls came to; objections and other suppressions; one entry per phone number.

- `patients` gains the PMS's status (`pms_status`, not to be confused with `active`, which says
  whether the source still sends the record), contact preferences and a guardian's name.
- `call_events`: every call attempt and outcome the calling system reported, with the number
  dialled and the recall cycle (due date) it was made for; attempts, retry spacing, snoozes and
  wrong numbers are all read from here.
- `contact_suppressions`: a patient who asked not to be called (or was reported deceased on a call)
  stays off the list until an operator lifts it; rows are never deleted, a lift is recorded.
- `call_list` is rebuilt around households: a row per due patient, either listed on the entry of
  one phone number (`phone`, `ask_for`, `earliest_call_at`) or not listed with a reason code.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

from nvc_pipelines.store.migrations.rls import practice_scoped

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

OUTCOMES = (
    "booked",
    "no_answer",
    "voicemail",
    "busy",
    "wrong_number",
    "declined",
    "call_back_later",
    "asked_not_to_be_called",
    "deceased",
)
REASON_CODES = (
    "deceased",
    "gone_away",
    "inactive",
    "do_not_call",
    "asked_not_to_be_called",
    "no_callable_number",
    "attempts_exhausted",
    "snoozed",
    "booked",
    "not_due",
)
NEW_TABLES = ("call_events", "contact_suppressions", "call_list")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def upgrade() -> None:
    op.execute(
        f"""
        ALTER TABLE patients
            ADD COLUMN pms_status text NOT NULL DEFAULT 'active'
                CHECK (pms_status IN ('active', 'deceased', 'gone_away', 'inactive')),
            ADD COLUMN status_date date,
            ADD COLUMN phone_recall boolean NOT NULL DEFAULT true,
            ADD COLUMN no_recall boolean NOT NULL DEFAULT false,
            ADD COLUMN contact_channels text[],
            ADD COLUMN guardian_name text;

        CREATE TABLE call_events (
            event_id        bigserial PRIMARY KEY,
            practice_id     text NOT NULL REFERENCES practices,
            pms_patient_id  text NOT NULL,
            kind            text NOT NULL CHECK (kind IN ('call_attempt', 'call_outcome')),
            outcome         text NOT NULL CHECK (outcome IN ({_in(OUTCOMES)})),
            phone           text,
            recall_due_date date,
            occurred_at     timestamptz NOT NULL,
            recorded_at     timestamptz NOT NULL DEFAULT now(),
            outbox_id       bigint,
            actor           text NOT NULL
        );
        CREATE INDEX call_events_patient ON call_events (practice_id, pms_patient_id, occurred_at);
        CREATE INDEX call_events_phone ON call_events (practice_id, phone, occurred_at);

        CREATE TABLE contact_suppressions (
            suppression_id  bigserial PRIMARY KEY,
            practice_id     text NOT NULL REFERENCES practices,
            pms_patient_id  text NOT NULL,
            reason          text NOT NULL CHECK (reason IN ('asked_not_to_be_called', 'deceased')),
            event_id        bigint REFERENCES call_events,
            created_at      timestamptz NOT NULL DEFAULT now(),
            lifted_at       timestamptz,
            lifted_by       text,
            lift_reason     text
        );
        CREATE UNIQUE INDEX contact_suppressions_open
            ON contact_suppressions (practice_id, pms_patient_id, reason) WHERE lifted_at IS NULL;

        DROP TABLE call_list;
        CREATE TABLE call_list (
            patient_id        bigint PRIMARY KEY REFERENCES patients ON DELETE CASCADE,
            practice_id       text NOT NULL REFERENCES practices,
            due_date          date NOT NULL,
            reason            text NOT NULL,
            listed            boolean NOT NULL,
            phone             text,
            ask_for           text,
            earliest_call_at  timestamptz,
            reason_code       text CHECK (reason_code IN ({_in(REASON_CODES)})),
            detail            text,
            listed_at         timestamptz NOT NULL DEFAULT now(),
            CHECK (listed = (phone IS NOT NULL AND earliest_call_at IS NOT NULL AND reason_code IS NULL))
        );
        CREATE INDEX call_list_practice ON call_list (practice_id, listed, due_date);
        CREATE INDEX call_list_phone ON call_list (practice_id, phone) WHERE listed;
        """
    )
    for table in NEW_TABLES:
        practice_scoped(table)
    op.execute("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO nvc_app")
