"""The application logs in as `nvc_service`, a role that is not a superuser and cannot become one.

Until now the application connected as the owner (the embedded server's superuser) and switched to
`nvc_app` with `SET LOCAL ROLE`, so it could as well have switched back: row-level security only
guarded against bugs. `nvc_service` (LOGIN, member of `nvc_app` and of nothing else) owns nothing,
so it cannot ALTER a table, disable its row-level security, or drop the audit log's triggers, and
has no role it could `SET ROLE` to but `nvc_app`. Migrations and administrative commands use the
owner's connection (`NVC_OWNER_DATABASE_URL`; see docs/security.md and docs/adr/0006).

What the application reads across practices (the sensors, the schedule, `nvc practice list`,
`nvc alerts`) goes through views owned by the owner that show only what those readers need, and
the statistics refresh after a bulk write through one SECURITY DEFINER function limited to the
tables the application bulk-writes.

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

APP_LOGIN = "nvc_service"
ANALYZED_TABLES = ("patients", "appointments", "clinical_records", "recalls", "call_list")


def upgrade() -> None:
    # Roles are per server: another store database on it may have created the role already.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_LOGIN}') THEN
                CREATE ROLE {APP_LOGIN} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created concurrently by the migration of another database on the same server
        END $$;
        GRANT nvc_app TO {APP_LOGIN};
        """
    )
    # On servers older than PostgreSQL 15 everyone may create objects in `public`, which would let
    # the application shadow a table or function; nothing of the application needs it.
    op.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    # Read by the application to refuse running against a schema older than its code.
    op.execute("GRANT SELECT ON alembic_version TO nvc_app")
    # Views run with their owner's rights (its row-level security policy sees every practice) and
    # show only these columns: the registry without settings or credentials, with each practice's
    # count of active patients.
    op.execute(
        """
        CREATE VIEW practice_registry AS
            SELECT p.practice_id, p.display_name, p.pms_kind, p.status, p.group_id, p.connected_at,
                   p.last_sync_at,
                   (SELECT count(*) FROM patients pt WHERE pt.practice_id = p.practice_id AND pt.active) AS patients
            FROM practices p;
        CREATE VIEW outbox_due_rows AS
            SELECT practice_id, outbox_id, attempts, next_attempt_at FROM outbox WHERE status IN ('pending', 'sent');
        CREATE VIEW alert_log AS
            SELECT alert_id, practice_id, run_id, job_name, message, consecutive, severity, delivered_to, raised_at
            FROM alerts;
        GRANT SELECT ON practice_registry, outbox_due_rows, alert_log, practice_groups TO nvc_app;
        """
    )
    tables = ", ".join(f"'{t}'" for t in ANALYZED_TABLES)
    op.execute(
        f"""
        CREATE FUNCTION nvc_analyze(target text) RETURNS void
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            IF target NOT IN ({tables}) THEN
                RAISE EXCEPTION 'permission denied: nvc_analyze refreshes only the tables the application bulk-writes, not %', target
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            EXECUTE format('ANALYZE public.%I', target);
        END $$;
        REVOKE ALL ON FUNCTION nvc_analyze(text) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION nvc_analyze(text) TO nvc_app;
        """
    )
