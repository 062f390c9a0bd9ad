"""The application logs in as `nvc_service`: not a superuser, cannot become one, owns nothing; the
owner's login runs migrations and administrative commands only. Against the real embedded PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import instance_for_test
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from nvc_pipelines.application.cli import main
from nvc_pipelines.definitions import defs
from nvc_pipelines.model import Patient, Phone, PhoneType, PmsKind, ReadResult
from nvc_pipelines.store import Store, StoreUnavailable
from nvc_pipelines.store.db import APP_LOGIN
from resources.csv_source import SEED_COLUMNS


def _owner(store: Store) -> str:
    assert store.owner_engine is not None
    return store.owner_engine.url.username


def _app_url(database_url: str) -> str:
    return make_url(database_url).set(username=APP_LOGIN, password=None).render_as_string(hide_password=False)


def _two_practices(store: Store) -> None:
    for pid in ("role-a", "role-b"):
        store.add_practice(pid, pid, PmsKind.CSV, {}, {"api_key": f"key-of-{pid}"})
        people = [Patient(pid, f"{pid}-1", "Ann", "Lee", [Phone("+447700900001", PhoneType.MOBILE)])]
        store.write_patients(pid, "csv", ReadResult(people), "r1", full=True)


def test_the_application_logs_in_as_a_role_that_is_not_a_superuser(store: Store) -> None:
    with store.begin("role-a") as conn:
        row = conn.execute(
            text(
                "SELECT session_user, current_user, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb "
                "FROM pg_roles WHERE rolname = session_user"
            )
        ).one()
        assert conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar_one() is False
    assert tuple(row) == (APP_LOGIN, APP_LOGIN, False, False, False, False)
    with store.begin_owner() as conn:  # the owner (here the embedded superuser) is another login
        assert conn.execute(text("SELECT current_user")).scalar_one() == _owner(store) != APP_LOGIN


def test_the_application_cannot_become_the_owner_or_change_the_safeguards(store: Store) -> None:
    _two_practices(store)
    refused = [
        f"SET ROLE {_owner(store)}",
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
        "ALTER TABLE patients DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE patients NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY practice_scope ON patients",
        "DROP TRIGGER audit_log_no_update_or_delete ON audit_log",
        "ALTER TABLE audit_log DISABLE TRIGGER ALL",
        "DROP TABLE audit_log",
        "CREATE TABLE public.shadow (x int)",
        "ALTER ROLE nvc_service BYPASSRLS",
        "CREATE ROLE nvc_sneaky SUPERUSER LOGIN",
    ]
    for statement in refused:
        with pytest.raises(StoreUnavailable) as info, store.begin("role-a") as conn:
            conn.execute(text(statement))
        message = str(info.value)
        assert "\n" not in message and f"The store refused {APP_LOGIN}" in message, statement
    with store.begin_owner() as conn:  # everything is as the migrations left it
        assert conn.execute(
            text("SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE relname = 'patients'")
        ).scalar_one()
        triggers = conn.execute(
            text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'audit_log'::regclass")
        ).scalar_one()
        assert triggers == 2
        owned = conn.execute(
            text("SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles WHERE rolname = :r)"),
            {"r": APP_LOGIN},
        ).scalar_one()
        assert owned == 0
        # nvc_service's only role is nvc_app, and nvc_app is a member of nothing.
        memberships = conn.execute(
            text(
                "SELECT r.rolname, g.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
                "JOIN pg_roles g ON g.oid = m.roleid WHERE r.rolname IN (:login, 'nvc_app')"
            ),
            {"login": APP_LOGIN},
        ).all()
        assert {tuple(m) for m in memberships} == {(APP_LOGIN, "nvc_app")}


def test_the_application_reads_no_other_practice_and_no_secret_across_practices(store: Store) -> None:
    _two_practices(store)
    with store.begin("role-a") as conn:
        assert conn.execute(text("SELECT DISTINCT practice_id FROM patients")).scalars().all() == ["role-a"]
        assert conn.execute(text("SELECT practice_id FROM practices")).scalars().all() == ["role-a"]
    with store.begin() as conn:  # scoped to no practice: no practice's rows at all
        for table in ("patients", "practices", "audit_log", "outbox", "alerts"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0, table
    # The registry, across practices, through its view: no settings, no credentials.
    assert [(p["practice_id"], p["patients"]) for p in store.list_practices()] == [("role-a", 1), ("role-b", 1)]
    with pytest.raises(ProgrammingError, match='column "credentials" does not exist'), store.begin() as conn:
        conn.execute(text("SELECT credentials FROM practice_registry"))
    # The statistics refresh is limited to the tables the application bulk-writes.
    with pytest.raises(StoreUnavailable, match="only the tables the application bulk-writes"), store.begin() as conn:
        conn.execute(text("SELECT nvc_analyze('audit_log')"))


def test_migrations_and_administration_run_as_the_owner(store: Store, database_url: str) -> None:
    with store.begin_owner() as conn:
        owners = set(
            conn.execute(text("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")).scalars()
        )
    assert owners == {_owner(store)}
    store.migrate()  # idempotent, as the owner
    app_only = Store.open(_app_url(database_url))  # a run pod: NVC_DATABASE_URL is nvc_service's, no owner
    assert app_only.owner_engine is None
    with pytest.raises(StoreUnavailable, match="administrative command.*NVC_OWNER_DATABASE_URL"):
        app_only.add_practice("role-c", "C", PmsKind.CSV, {}, {})
    with pytest.raises(StoreUnavailable, match="administrative command"):
        app_only.migrate()


def test_a_superuser_or_an_unmigrated_store_is_refused_for_the_application(store: Store, database_url: str) -> None:
    with pytest.raises(StoreUnavailable, match="a superuser or a role that bypasses row-level security"):
        Store.open(database_url, owner_url=database_url)  # both URLs the superuser's
    fresh = make_url(database_url).set(database=f"t_{uuid.uuid4().hex[:12]}")
    with pytest.raises(StoreUnavailable, match="run the migrations as the owner"):
        Store.open(fresh, migrate=False)
    Store.open(fresh)  # the owner migrates it; then the application's login is accepted
    with store.begin_owner() as conn:  # a run pod of the new release before the owner migrated
        conn.execute(text("UPDATE alembic_version SET version_num = '0012'"))
    behind = make_url(_app_url(database_url)).update_query_dict({"application_name": "behind"})
    with pytest.raises(StoreUnavailable, match="at revision 0012, this code needs .*nvc store migrate"):
        Store.open(behind)


def test_a_sync_and_the_call_list_run_as_the_application_alone(
    store: Store, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [("Ann", "Lee", "07700 900123"), ("Bo", "Kay", "07700 900555")]
    lines = [",".join(SEED_COLUMNS)] + [f"{f},{ln},{ph},15/01/2022,standard,," for f, ln, ph in rows]
    (tmp_path / "export.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    store.add_practice("role-sync", "Sync", PmsKind.CSV, {"path": str(tmp_path)}, {})  # administrative: owner
    monkeypatch.setenv("NVC_DATABASE_URL", _app_url(database_url))  # from here on: no owner login at all
    job = defs.resolve_job_def("practice_sync")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("practices", ["role-sync"])
        assert job.execute_in_process(partition_key="role-sync", instance=instance).success
    app_only = Store.open()
    assert app_only.owner_engine is None
    assert app_only.recall_summary("role-sync", date.today())["total"] == 2
    view = app_only.call_list_view("role-sync", actor="test")
    assert len(view["entries"]) + len(view["not_listed"]) == 2
    runner = CliRunner()
    listed = runner.invoke(main, ["call-list", "role-sync"])
    assert listed.exit_code == 0, listed.output
    practices = runner.invoke(main, ["practice", "list"])
    assert practices.exit_code == 0 and "role-sync" in practices.output
    # An administrative command without the owner's login: one line that says what to set.
    refused = runner.invoke(main, ["practice", "disconnect", "role-sync"])
    assert refused.exit_code == 1 and "NVC_OWNER_DATABASE_URL" in refused.output
    assert "Traceback" not in refused.output
