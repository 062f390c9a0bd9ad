"""The executor every NVC job runs on: Dagster's in-process executor, with the run's Dagster storage
holding its database connections for the run.

dagster-postgres opens a new connection for every event it stores and every run record it reads
(SQLAlchemy's `NullPool`: a process holds no connection it might not use). A sync run stores a
hundred or more events (each step's start, output, materialisation, check and log line), and a
connection costs several milliseconds on loopback and more over TLS: measured here, a nightly of a
200,000-patient practice spent about 0.75 s of its 4-5 s opening connections. A run process uses
the storage all the time until it exits, so it keeps one connection per storage, as Dagster's own
webserver does (`DagsterInstance.optimize_for_webserver`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import DagsterInstance, Executor, ExecutorDefinition, executor, in_process_executor

# A connection older than this is replaced when next taken from the pool, so none is used after sitting
# idle for longer: under the idle cut of cloud load balancers and proxies (Azure's is about 4 minutes).
POOL_RECYCLE_SECONDS = 120
# Connections beyond the one held, opened only while several threads store events at once (and
# closed after): a run process holds at most one per storage for long.
POOL_MAX_OVERFLOW = 2
# The held connections' statement timeout (set on each: `optimize_for_webserver` always sets one).
# A storage statement of a run never takes minutes; the webserver's own default is 15 seconds.
STATEMENT_TIMEOUT_MS = 300_000

_holding: weakref.WeakSet[DagsterInstance] = weakref.WeakSet()


def hold_storage_connections(instance: DagsterInstance) -> None:
    """Make `instance`'s run, event-log and schedule storage keep one connection each (a pool of one)
    instead of opening one per statement; done once per instance. Storage without connections of its
    own (SQLite, in-memory) is unaffected."""
    if instance in _holding:
        return
    instance.optimize_for_webserver(
        statement_timeout=STATEMENT_TIMEOUT_MS, pool_recycle=POOL_RECYCLE_SECONDS, max_overflow=POOL_MAX_OVERFLOW
    )
    _holding.add(instance)


def release_storage_connections(instance: DagsterInstance) -> None:
    """Close the connections `instance`'s storage holds now, for a process that goes on after its
    run: a Dagster instance is freed only by the cycle collector, so its held connections would
    otherwise stay open for a while. The pools stay (a later use opens one connection again and
    holds it). Reads dagster-postgres's private `_engine`: a storage without one is left as it is
    (tests/test_executor.py fails if that attribute goes)."""
    for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
        engine = getattr(storage, "_engine", None)  # dagster-postgres's SQLAlchemy engine
        if engine is not None:
            engine.dispose()


@contextmanager
def storage_connections_held(instance: DagsterInstance) -> Iterator[DagsterInstance]:
    """`instance` holding its storage connections for the block (a run executed in this process),
    released after it."""
    hold_storage_connections(instance)
    try:
        yield instance
    finally:
        release_storage_connections(instance)


class _HoldingConnections(Executor):
    """Dagster's in-process executor, after `hold_storage_connections` on the run's instance."""

    def __init__(self, inner: Executor):
        self._inner = inner

    @property
    def retries(self) -> Any:
        return self._inner.retries

    @property
    def step_dependency_config(self) -> Any:
        return self._inner.step_dependency_config

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        hold_storage_connections(plan_context.instance)
        return self._inner.execute(plan_context, execution_plan)


def _create(init_context: Any) -> Executor:
    create = in_process_executor.executor_creation_fn
    assert create is not None
    return _HoldingConnections(create(init_context))


# Dagster's `in_process` executor under its own name and config (run config written for it still
# applies), with the instance's storage holding its connections for the run.
run_executor: ExecutorDefinition = executor(
    name=in_process_executor.name, config_schema=in_process_executor.config_schema.as_field()
)(_create)
