"""Row-level security for a table that holds one practice's rows (used by the migrations).

The application role `nvc_app` (the login `nvc_service` is its member, see 0014) sees and writes only
rows whose `practice_id` is the transaction's `nvc.practice_id` (`SET LOCAL`, see `Store.begin`); the
owner role that runs migrations keeps an
explicit policy of its own, and `FORCE` makes the policies apply to the table's owner too.
"""

from alembic import op


def practice_scoped(table: str, privileges: str = "SELECT, INSERT, UPDATE, DELETE") -> None:
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
