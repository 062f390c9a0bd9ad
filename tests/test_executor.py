"""Every job runs on `run_executor`: Dagster's in-process executor, with the run's storage holding its
connections for the run instead of opening one per event (dagster-postgres, real PostgreSQL)."""

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from dagster import (
    Config,
    DagsterInstance,
    OpExecutionContext,
    execute_job,
    in_process_executor,
    instance_for_test,
    job,
    op,
    reconstructable,
)
from psycopg import sql
from sqlalchemy import Pool, event
from sqlalchemy.engine import make_url

from nvc_pipelines.definitions import defs
from resources.executor import run_executor, storage_connections_held


class Lines(Config):
    lines: int


@op
def chatty(context: OpExecutionContext, config: Lines) -> None:
    for n in range(config.lines):
        context.log.info(f"line {n}")  # each an event the run stores


@job(executor_def=run_executor)
def chatty_on_run_executor() -> None:
    chatty()


@job(executor_def=in_process_executor)
def chatty_on_dagster_executor() -> None:
    chatty()


@pytest.fixture
def dagster_db(pg_server) -> Iterator[str]:
    """A fresh database on the session server for Dagster's own storage; its URL (psycopg2)."""
    url = make_url(pg_server.get_uri()).set(database=f"d_{uuid.uuid4().hex[:12]}")
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
    yield url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(url.database)))


@pytest.fixture
def pg_instance(dagster_db: str) -> Iterator[DagsterInstance]:
    with instance_for_test(overrides={"storage": {"postgres": {"postgres_url": dagster_db}}}) as instance:
        yield instance


def _connections_opened(run) -> int:
    """How many database connections this process opened while `run()` ran."""
    opened = []

    def count(*_args) -> None:
        opened.append(1)

    event.listen(Pool, "connect", count)
    try:
        run()
    finally:
        event.remove(Pool, "connect", count)
    return len(opened)


def test_every_job_runs_on_the_executor_that_holds_connections() -> None:
    jobs = list(defs.resolve_all_job_defs())
    assert jobs
    assert {j.name: j.executor_def for j in jobs} == {j.name: run_executor for j in jobs}


def test_a_run_stores_its_events_over_held_connections_not_one_each(pg_instance: DagsterInstance) -> None:
    def run(job_fn, lines: int):
        def go() -> None:
            config = {"ops": {"chatty": {"config": {"lines": lines}}}}
            with execute_job(reconstructable(job_fn), instance=pg_instance, run_config=config) as result:
                assert result.success
                stored = pg_instance.all_logs(result.run_id)
                assert sum(1 for e in stored if e.user_message.startswith("line ")) == lines  # every event kept

        return go

    # Dagster's own executor: dagster-postgres opens a connection for each statement, so one or more an event.
    assert _connections_opened(run(chatty_on_dagster_executor, 80)) > 80
    # On `run_executor` the run opens as many connections for 80 more events as for none: the ones
    # it opens are the run's setup's, before the executor takes over.
    few = _connections_opened(run(chatty_on_run_executor, 0))
    many = _connections_opened(run(chatty_on_run_executor, 80))
    assert many - few <= 1, (few, many)
    assert many < 80 / 4


def test_a_run_in_this_process_gives_its_connections_back(pg_instance: DagsterInstance, dagster_db: str) -> None:
    database = make_url(dagster_db).database
    admin = make_url(dagster_db).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)

    def sessions() -> int:
        with psycopg.connect(admin, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()
            assert row is not None
            return int(row[0])

    with storage_connections_held(pg_instance):
        pg_instance.get_runs(limit=1)
        assert sessions() >= 1  # held open between uses
    assert sessions() == 0
