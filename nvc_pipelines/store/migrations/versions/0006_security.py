"""Row-level security, an append-only audit log, and erasure suppressions.

Every table holding practice data gets `FORCE ROW LEVEL SECURITY` and a policy for the application
role `nvc_app`: rows are visible and writable only where `practice_id` equals the transaction's
`nvc.practice_id` setting (`SET LOCAL`, see `Store.begin`). `nvc_app` is neither superuser nor
BYPASSRLS, owns nothing, and may only insert into and read the audit log. The owner role (the one
that runs migrations) keeps an explicit policy for the registry and migrations.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PRACTICE_TABLES = (
    "patients",
    "recalls",
    "rejected_rows",
    "appointments",
    "clinical_records",
    "sync_cursors",
    "call_list",
    "patient_merges",
    "audit_log",
    "outbox",
    "suppressions",
)


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE suppressions (
            suppression_id  bigserial PRIMARY KEY,
            practice_id     text NOT NULL REFERENCES practices,
            kind            text NOT NULL CHECK (kind IN ('pms_patient_id', 'name_phone')),
            value_hash      text NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            UNIQUE (practice_id, kind, value_hash)
        );

        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nvc_app') THEN
                CREATE ROLE nvc_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
            END IF;
        END $$;
        """
    )
    op.execute("DO $$ BEGIN EXECUTE format('GRANT nvc_app TO %I', current_user); END $$")
    op.execute("GRANT USAGE ON SCHEMA public TO nvc_app")
    op.execute("GRANT SELECT, UPDATE (last_sync_at) ON practices TO nvc_app")
    op.execute("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO nvc_app")
    for table in PRACTICE_TABLES:
        privileges = "SELECT, INSERT" if table == "audit_log" else "SELECT, INSERT, UPDATE, DELETE"
        op.execute(f"GRANT {privileges} ON {table} TO nvc_app")
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY practice_scope ON {table} TO nvc_app "
            "USING (practice_id = current_setting('nvc.practice_id', true)) "
            "WITH CHECK (practice_id = current_setting('nvc.practice_id', true))"
        )
        op.execute(
            f"DO $$ BEGIN EXECUTE format('CREATE POLICY owner_all ON {table} TO %I USING (true) WITH CHECK (true)', "
            "current_user); END $$"
        )
    # The registry: nvc_app may read its own practice's row (not its credentials' plaintext, which
    # never exists in the database anyway).
    op.execute("ALTER TABLE practices ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE practices FORCE ROW LEVEL SECURITY")
    op.execute(
        "CREATE POLICY practice_scope ON practices TO nvc_app "
        "USING (practice_id = current_setting('nvc.practice_id', true))"
    )
    op.execute(
        "DO $$ BEGIN EXECUTE format('CREATE POLICY owner_all ON practices TO %I USING (true) WITH CHECK (true)', "
        "current_user); END $$"
    )
