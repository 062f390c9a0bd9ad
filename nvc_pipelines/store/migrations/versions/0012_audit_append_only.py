"""The audit log refuses UPDATE, DELETE and TRUNCATE from everyone, its owner included.

The application role could only ever INSERT and SELECT it (0006); these triggers also stop the
owner role that runs migrations, so tampering needs a deliberate, visible step (dropping the
trigger, which is itself a DDL statement a database's own logs record).

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the audit log is append-only: % is refused', TG_OP
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'audit rows are never changed or removed; see docs/security.md';
        END $$;
        CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
            FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
        CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
            FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
        """
    )
